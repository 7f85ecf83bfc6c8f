"""StepContext: τ and the weights read reach an optimizer's update_step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_async import staleness


class ProbeSGD(keras.optimizers.SGD):
    """SGD whose step also pulls the variable back toward w_read, scaled by τ.

    w <- w - lr * g - tau * (w - w_read): an update that depends on both
    published quantities, so a lost context changes the result.
    """

    def update_step(self, gradient, variable, learning_rate):
        tau = tf.cast(staleness.current_tau(), variable.dtype)
        w_read = staleness.read_value(variable)
        lr = tf.cast(learning_rate, variable.dtype)
        self.assign(variable, variable - lr * gradient - tau * (variable - w_read))


def _step(optimizer, variable, grad, tau=None, w_read=None):
    if tau is None:
        optimizer.apply([grad], [variable])
        return
    with staleness.publish(tau, [variable], [w_read]):
        optimizer.apply([grad], [variable])


def test_no_context_means_fresh_gradient():
    v = keras.Variable(np.array([1.0, 2.0], np.float32))
    assert staleness.current() is None
    assert int(staleness.current_tau()) == 0
    assert staleness.current_tau().dtype == tf.int64
    np.testing.assert_array_equal(staleness.read_value(v), [1.0, 2.0])
    np.testing.assert_array_equal(staleness.read_value(v.value), [1.0, 2.0])


@pytest.mark.parametrize("mode", ["eager", "function", "jit"])
def test_published_context_reaches_update_step(mode):
    v = keras.Variable(np.array([1.0, 2.0], np.float32))
    opt = ProbeSGD(learning_rate=0.5)
    opt.build([v])
    grad = tf.constant([1.0, 1.0])
    w_read = tf.constant([0.0, 0.0])

    def step(tau):
        _step(opt, v, grad, tau, w_read)
        return v.value.read_value()

    if mode != "eager":
        step = tf.function(step, jit_compile=(mode == "jit"))
    # tau=2: w = w - 0.5*1 - 2*(w - 0)  => [1-0.5-2, 2-0.5-4]
    out = step(tf.constant(2, tf.int64))
    np.testing.assert_allclose(out, [-1.5, -2.5])
    # Outside the context: plain SGD again.
    assert staleness.current() is None


def test_publish_is_nested_and_restored():
    v = keras.Variable(np.zeros(2, np.float32))
    with staleness.publish(3, [v], [tf.ones(2)]):
        with staleness.publish(5, [v], [tf.fill([2], 2.0)]):
            assert int(staleness.current_tau()) == 5
            np.testing.assert_array_equal(staleness.read_value(v), [2.0, 2.0])
        assert int(staleness.current_tau()) == 3
        np.testing.assert_array_equal(staleness.read_value(v), [1.0, 1.0])
    assert staleness.current() is None


def test_unpublished_variable_reads_current_value():
    a = keras.Variable(np.ones(2, np.float32))
    b = keras.Variable(np.full(2, 7.0, np.float32))
    with staleness.publish(1, [a], [tf.zeros(2)]) as context:
        assert a in context and b not in context
        np.testing.assert_array_equal(staleness.read_value(b), [7.0, 7.0])


def test_context_under_one_device_strategy_run():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        v = keras.Variable(np.array([1.0, 2.0], np.float32))
        opt = ProbeSGD(learning_rate=0.5)
        opt.build([v])

    @tf.function
    def train():
        def replica_fn():
            _step(opt, v, tf.ones(2), tf.constant(1, tf.int64), tf.zeros(2))

        strategy.run(replica_fn)

    train()
    # tau=1: w - 0.5 - (w - 0) = -0.5
    np.testing.assert_allclose(v.numpy(), [-0.5, -0.5])


def test_without_context_probe_equals_sgd_under_mirrored(logical_devices):
    strategy = tf.distribute.MirroredStrategy(logical_devices)
    assert strategy.num_replicas_in_sync == 4
    with strategy.scope():
        v_probe = keras.Variable(np.array([1.0, -2.0], np.float32))
        v_sgd = keras.Variable(np.array([1.0, -2.0], np.float32))
        probe, sgd = ProbeSGD(0.1), keras.optimizers.SGD(0.1)
        probe.build([v_probe])
        sgd.build([v_sgd])

    @tf.function
    def train():
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            g = tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32) * tf.ones(2)
            probe.apply([g], [v_probe])
            sgd.apply([g], [v_sgd])

        strategy.run(replica_fn)

    for _ in range(3):
        train()
    np.testing.assert_allclose(v_probe.numpy(), v_sgd.numpy(), rtol=0, atol=1e-7)


def test_publish_from_multi_replica_mirrored_raises(logical_devices):
    strategy = tf.distribute.MirroredStrategy(logical_devices)
    with strategy.scope():
        v = keras.Variable(np.zeros(2, np.float32))

    @tf.function
    def train():
        def replica_fn():
            with staleness.publish(1, [v], [tf.zeros(2)]):
                pass

        strategy.run(replica_fn)

    with pytest.raises(ValueError, match="merge_call"):
        train()


def test_bad_arguments():
    v = keras.Variable(np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="read_values"):
        with staleness.publish(1, [v], [tf.zeros(2), tf.zeros(2)]):
            pass
    with pytest.raises(ValueError, match="shape"):
        with staleness.publish(1, [v], [tf.zeros(3)]):
            pass
    with pytest.raises(ValueError, match="tau"):
        with staleness.publish(tf.constant([1, 2]), [v], [tf.zeros(2)]):
            pass


def test_rows_read_of_a_table_are_published_as_indexed_slices():
    table = keras.Variable(np.arange(12, dtype=np.float32).reshape(6, 2))
    dense = keras.Variable(np.ones(3, np.float32))
    rows = tf.IndexedSlices(tf.constant([[9.0, 9.0], [8.0, 8.0]]), tf.constant([4, 1], tf.int64),
                            tf.constant([6, 2], tf.int64))
    with staleness.publish(1, [table, dense], [rows, tf.zeros(3)]):
        assert staleness.is_row_read(table)
        assert not staleness.is_row_read(dense)
        got = staleness.read_value(table)
        assert isinstance(got, tf.IndexedSlices)
        np.testing.assert_array_equal(got.indices, [4, 1])
        np.testing.assert_array_equal(got.values, [[9.0, 9.0], [8.0, 8.0]])
    assert not staleness.is_row_read(table)


def test_rows_read_with_wrong_row_shape_raise():
    table = keras.Variable(np.zeros((6, 2), np.float32))
    bad = tf.IndexedSlices(tf.zeros([2, 3]), tf.constant([0, 1], tf.int64))
    with pytest.raises(ValueError, match=r"rows read of variable .* \(shape \(6, 2\)\)"):
        with staleness.publish(0, [table], [bad]):
            pass
