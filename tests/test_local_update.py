"""LocalUpdateStrategy over MirroredStrategy (4 logical CPU devices).

Every MirroredStrategy here uses ``ReductionToOneDevice``: with the default
``CollectiveAllReduce``, two MirroredStrategy objects over the same devices in
one process share collective group/instance keys, and a second model with
other shapes aborts with "Shape mismatch in the collective instance 100"
(stock TF 2.21, with or without tf_async). The collective path is exercised by
the 2-process MultiWorkerMirrored test and the benchmark.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_async.strategies import LocalUpdateStrategy
from tf_async.strategies import averagers

BATCH = 32


def _data(n=BATCH * 20, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(8, 1))).astype("float32")
    return x, y


def _model(strategy, optimizer, **compile_kwargs):
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="tanh"),
                keras.layers.Dense(1),
            ]
        )
        model.compile(optimizer=optimizer(), loss="mse", **compile_kwargs)
    return model


def _components(strategy, model):
    """Per-replica copies of every trainable weight: [weight][replica] arrays."""
    return [
        [c.numpy() for c in strategy.experimental_local_results(w.value)]
        for w in model.trainable_weights
    ]


def _spread(strategy, model):
    return max(
        float(np.abs(c - comps[0]).max())
        for comps in _components(strategy, model)
        for c in comps
    )


def _mirrored(devices):
    return tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def _local(devices, **kwargs):
    return LocalUpdateStrategy(_mirrored(devices), **kwargs)


@pytest.mark.parametrize(
    "optimizer, average_state",
    [
        (lambda: keras.optimizers.SGD(0.1), False),
        (lambda: keras.optimizers.SGD(0.05, momentum=0.9), True),
    ],
    ids=["sgd", "momentum_sgd_with_averaged_state"],
)
def test_h1_mean_equals_synchronous_mirrored(logical_devices, optimizer, average_state):
    """H=1 mean averaging after one local step = averaging the gradients.

    Exact for SGD; for momentum SGD only when the momentum buffers are averaged
    too (momentum is linear in the gradient). Adam is not: it is excluded.
    """
    x, y = _data()
    sync = _model(_mirrored(logical_devices), optimizer)
    sync.fit(x, y, batch_size=BATCH * 4, epochs=4, shuffle=False, verbose=0)  # 20 steps
    strategy = _local(logical_devices, sync_every=1, average_optimizer_state=average_state)
    local = _model(strategy, optimizer)
    local.fit(x, y, batch_size=BATCH * 4, epochs=4, shuffle=False, verbose=0)
    assert int(sync.optimizer.iterations.numpy()) == 20
    assert int(strategy.sync_count.numpy()) == 20
    for a, b in zip(sync.get_weights(), local.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert _spread(strategy, local) == 0.0


def test_h1_with_local_adam_state_differs_from_sync(logical_devices):
    """Honesty check: Adam's update is not linear in g, so H=1 != sync Adam."""
    x, y = _data()
    sync = _model(_mirrored(logical_devices), lambda: "adam")
    sync.fit(x, y, batch_size=BATCH * 4, epochs=1, shuffle=False, verbose=0)
    local = _model(_local(logical_devices, sync_every=1), lambda: "adam")
    local.fit(x, y, batch_size=BATCH * 4, epochs=1, shuffle=False, verbose=0)
    diff = max(np.abs(a - b).max() for a, b in zip(sync.get_weights(), local.get_weights()))
    assert diff > 1e-5


def test_h4_replicas_differ_inside_period_identical_after_sync(logical_devices):
    x, y = _data(n=BATCH * 40)
    strategy = _local(logical_devices, sync_every=4)
    model = _model(strategy, lambda: "adam")
    spreads, syncs, means = [], [], []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            spreads.append(_spread(strategy, model))
            syncs.append(int(strategy.sync_count.numpy()))
            means.append([np.mean(c, axis=0) for c in _components(strategy, model)])

    # 10 steps per epoch: syncs after steps 4 and 8, and at the epoch end (10).
    history = model.fit(
        x, y, batch_size=BATCH * 4, epochs=2,
        shuffle=False, verbose=0, callbacks=[Probe()],
    )
    for step, spread in enumerate(spreads, start=1):
        in_epoch = (step - 1) % 10 + 1
        if in_epoch in (4, 8):
            assert spread == 0.0, (step, spreads)
        else:
            assert spread > 1e-6, (step, spreads)
    assert syncs == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5]
    # After fit (forced sync at the epoch end): one model, the replicas' mean.
    assert int(strategy.sync_count.numpy()) == 6
    assert int(strategy.pending_steps.numpy()) == 0
    assert _spread(strategy, model) == 0.0
    for w, mean in zip(model.get_weights(), means[-1]):
        np.testing.assert_allclose(w, mean, atol=1e-6)
    divergence = history.history["local_divergence"]
    assert len(divergence) == 2 and all(np.isfinite(divergence)) and min(divergence) > 0


def _local_steps(strategy, model, x, y, steps):
    """Runs `steps` train steps without touching metrics (no eager flush)."""
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(128).repeat()
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    model.make_train_function()
    for _ in range(steps):
        model.train_function(iterator)


def test_evaluate_and_predict_see_the_average(logical_devices):
    x, y = _data()
    strategy = _local(logical_devices, sync_every=8)
    model = _model(strategy, lambda: keras.optimizers.SGD(0.1))
    model.fit(x[:128], y[:128], batch_size=128, epochs=1, verbose=0)  # builds; syncs
    _local_steps(strategy, model, x, y, 3)
    assert int(strategy.pending_steps.numpy()) == 3
    assert _spread(strategy, model) > 1e-6
    mean = [np.mean(c, axis=0) for c in _components(strategy, model)]

    reference = _model(_mirrored(logical_devices[:1]), lambda: "sgd")
    reference.set_weights(mean)
    expected = reference.predict(x, batch_size=128, verbose=0)

    predicted = model.predict(x, batch_size=128, verbose=0)
    np.testing.assert_allclose(predicted, expected, atol=1e-5)
    assert _spread(strategy, model) == 0.0
    assert int(strategy.pending_steps.numpy()) == 0

    _local_steps(strategy, model, x, y, 2)
    mean = [np.mean(c, axis=0) for c in _components(strategy, model)]
    reference.set_weights(mean)
    expected_loss = reference.evaluate(x, y, batch_size=128, verbose=0)
    loss = model.evaluate(x, y, batch_size=128, verbose=0)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    assert _spread(strategy, model) == 0.0


def test_save_after_fit_writes_the_averaged_model(logical_devices, tmp_path):
    x, y = _data()
    strategy = _local(logical_devices, sync_every=16)  # never reached: epoch-end sync only
    model = _model(strategy, lambda: keras.optimizers.SGD(0.1))
    model.fit(x, y, batch_size=BATCH * 4, epochs=1, shuffle=False, verbose=0)
    assert int(strategy.sync_count.numpy()) == 1
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert _spread(strategy, model) == 0.0


def test_diloco_outer_lr1_no_momentum_equals_mean(logical_devices):
    x, y = _data()
    results = []
    for kwargs in (
        dict(averaging="mean"),
        dict(averaging="diloco", outer_learning_rate=1.0, outer_momentum=0.0),
    ):
        strategy = _local(logical_devices, sync_every=3, **kwargs)
        model = _model(strategy, lambda: "adam")
        model.fit(x, y, batch_size=BATCH * 4, epochs=2, shuffle=False, verbose=0)
        results.append(model.get_weights())
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_diloco_with_momentum_differs_from_mean(logical_devices):
    x, y = _data()
    results = []
    for kwargs in (dict(averaging="mean"), dict(averaging="diloco")):
        strategy = _local(logical_devices, sync_every=3, **kwargs)
        model = _model(strategy, lambda: "adam")
        model.fit(x, y, batch_size=BATCH * 4, epochs=1, shuffle=False, verbose=0)
        results.append(model.get_weights())
    assert max(np.abs(a - b).max() for a, b in zip(*results)) > 1e-4


def _traced_steps(strategy):
    """Names of the step functions ``strategy.run`` is traced with (a list
    that fills as ``fit`` runs)."""
    traced = []
    run = strategy.run

    def counting_run(fn, *args, **kwargs):
        if not tf.executing_eagerly():
            traced.append(getattr(fn, "__name__", "?"))
        return run(fn, *args, **kwargs)

    strategy.run = counting_run
    return traced


def _fit_local(devices, make_model, build_ahead, **kwargs):
    """Weights and traced steps after ``fit`` (2 epochs, one mid-period
    evaluation); ``build_ahead=False``: the averaging state is built while
    the first step is traced (how ``fit`` did it before it built it ahead)."""
    x, y = _data()
    strategy = _local(devices, sync_every=3, **kwargs)
    if not build_ahead:
        strategy._build_averaging_for = lambda model: None
    traced = _traced_steps(strategy)
    model = make_model(strategy)
    model.fit(x, y, batch_size=BATCH * 2, epochs=2, shuffle=False, verbose=0,
              validation_data=(x[:64], y[:64]))
    return model.get_weights(), traced, strategy


@pytest.mark.parametrize("kwargs, lazy_traces", [
    (dict(averaging="mean"), 1),  # no averager state: never traced twice
    (dict(averaging="easgd", alpha=0.2), 2),
    (dict(averaging="diloco", average_optimizer_state=True), 2),
], ids=["mean", "easgd", "diloco_averaged_state"])
def test_fit_traces_the_train_step_once_with_the_same_result(
        logical_devices, kwargs, lazy_traces):
    """``fit`` builds the averager's centre / momentum before its first step:
    created while that step was traced, they made tf.function trace it (and
    with jit_compile, compile it) twice. Same weights as building them then."""
    make = lambda s: _model(s, lambda: keras.optimizers.Adam(0.01))  # noqa: E731
    ahead, traced, strategy = _fit_local(logical_devices[:2], make, True, **kwargs)
    lazy, lazy_traced, _ = _fit_local(logical_devices[:2], make, False, **kwargs)
    assert traced.count("train_step") == 1, traced
    assert lazy_traced.count("train_step") == lazy_traces, lazy_traced
    assert int(strategy.sync_count.numpy()) > 1
    for a, b in zip(ahead, lazy):
        np.testing.assert_array_equal(a, b)


class _WithUnusedWeight(keras.layers.Layer):
    """A dense layer with a trainable weight no loss depends on (no gradient)."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 1), name="kernel")
        self.unused = self.add_weight(shape=(3,), name="unused")

    def call(self, x):
        return x @ self.kernel


def test_fit_with_a_weight_that_gets_no_gradient_averages_the_updated_ones(logical_devices):
    """The group built ahead of ``fit`` (all trainable weights) is not the one
    the step updates: it is dropped, the step's own group is built when traced,
    and the result equals building it then."""

    def make(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            model = keras.Sequential([keras.Input((8,)), _WithUnusedWeight()])
            model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        return model

    kwargs = dict(averaging="diloco")
    ahead, traced, strategy = _fit_local(logical_devices[:2], make, True, **kwargs)
    lazy, _, _ = _fit_local(logical_devices[:2], make, False, **kwargs)
    (group,) = strategy._lu_runtime.groups.values()
    assert [v.shape for v in group.params] == [(8, 1)]
    assert len(strategy.state_variables()) == 3 + 2  # counters + one centre, one momentum
    for a, b in zip(ahead, lazy):
        np.testing.assert_array_equal(a, b)


def test_diloco_averager_is_keras_nesterov_sgd_on_the_outer_gradient():
    """DiLoCo's outer step (Douillard et al. 2023, Algorithm 1; PyTorch
    ``SGD(lr=0.7, momentum=0.9, nesterov=True)`` in their code) is Nesterov
    SGD on the centre with the outer gradient ``centre - mean``: compared, over
    several syncs, with Keras' own ``SGD(nesterov=True)``."""
    averager = averagers.DiLoCoAverager(outer_learning_rate=0.7, outer_momentum=0.9)
    start = np.array([1.0, -2.0, 0.5], np.float32)
    averager.build(tf.constant(start))
    reference = tf.Variable(start)
    outer = keras.optimizers.SGD(0.7, momentum=0.9, nesterov=True)
    rng = np.random.default_rng(3)
    for _ in range(4):
        centre = averager.centre.numpy()
        local = [tf.constant(centre + rng.normal(size=3).astype(np.float32)) for _ in range(2)]
        mean = tf.add_n(local) / 2.0
        new = averager.average(local, [mean, mean], num_replicas=2)
        outer.apply([tf.constant(reference.numpy() - mean.numpy())], [reference])
        np.testing.assert_allclose(averager.centre.numpy(), reference.numpy(), rtol=1e-6, atol=1e-6)
        for w in new:  # every replica restarts from the new centre
            np.testing.assert_array_equal(w.numpy(), averager.centre.numpy())


def test_easgd_averager_alpha0_never_moves_centre():
    averager = averagers.EASGDAverager(alpha=0.0)
    centre0 = tf.constant([1.0, -2.0, 3.0])
    averager.build(centre0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        local = [tf.constant(rng.normal(size=3), tf.float32) for _ in range(4)]
        mean = tf.add_n(local) / 4.0
        new = averager.average(local, [mean] * 4, num_replicas=4)
        np.testing.assert_array_equal(averager.centre.numpy(), centre0.numpy())
        for a, b in zip(new, local):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_easgd_averager_formula():
    averager = averagers.EASGDAverager(alpha=0.2)
    averager.build(tf.constant([0.0, 0.0]))
    local = [tf.constant([1.0, 2.0]), tf.constant([3.0, -2.0])]
    mean = tf.constant([2.0, 0.0])
    new = averager.average(local, [mean, mean], num_replicas=2)
    np.testing.assert_allclose(new[0].numpy(), [0.8, 1.6])
    np.testing.assert_allclose(new[1].numpy(), [2.4, -1.6])
    # centre += alpha * sum_i (w_i - centre) = 0.2 * ([1,2] + [3,-2])
    np.testing.assert_allclose(averager.centre.numpy(), [0.8, 0.0])


def test_easgd_strategy_pulls_replicas_towards_centre(logical_devices):
    x, y = _data()
    strategy = _local(logical_devices, sync_every=2, averaging="easgd", alpha=0.2)
    model = _model(strategy, lambda: keras.optimizers.SGD(0.1))
    model.fit(x[:512], y[:512], batch_size=128, epochs=1, shuffle=False, verbose=0)
    (group,) = strategy._lu_runtime.groups.values()
    centre = group.averager.centre.numpy()
    initial = _model(_mirrored(logical_devices[:1]), lambda: "sgd")
    start = np.concatenate([w.ravel() for w in initial.get_weights()])
    assert np.abs(centre - start).max() > 1e-4  # the centre moved
    # Elastic, not exact, averaging: replicas stay apart after a sync.
    assert int(strategy.sync_count.numpy()) == 2
    assert _spread(strategy, model) > 1e-6


def test_bad_input_raises_value_error(logical_devices):
    def base():
        return _mirrored(logical_devices)

    with pytest.raises(ValueError, match="sync_every"):
        LocalUpdateStrategy(base(), sync_every=0)
    with pytest.raises(ValueError, match="sync_every"):
        LocalUpdateStrategy(base(), sync_every=2.5)
    with pytest.raises(ValueError, match="averaging.*mean.*easgd.*diloco"):
        LocalUpdateStrategy(base(), averaging="median")
    for alpha in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha.*\(0.0, 1.0\)"):
            LocalUpdateStrategy(base(), averaging="easgd", alpha=alpha)
    with pytest.raises(ValueError, match="outer_learning_rate"):
        LocalUpdateStrategy(base(), averaging="diloco", outer_learning_rate=0.0)
    with pytest.raises(ValueError, match="outer_momentum"):
        LocalUpdateStrategy(base(), averaging="diloco", outer_momentum=1.0)
    with pytest.raises(ValueError, match="OneDeviceStrategy"):
        LocalUpdateStrategy(tf.distribute.OneDeviceStrategy("/cpu:0"))
    with pytest.raises(ValueError, match="_DefaultDistributionStrategy"):
        LocalUpdateStrategy(tf.distribute.get_strategy())
    with pytest.raises(ValueError, match="already a LocalUpdateStrategy"):
        LocalUpdateStrategy(LocalUpdateStrategy(base()))
    with pytest.raises(ValueError, match=r"alpha.*\[0, 1\)"):
        averagers.EASGDAverager(alpha=1.0)


def test_isinstance_of_base_and_local_update(logical_devices):
    strategy = _local(logical_devices, sync_every=3)
    assert isinstance(strategy, LocalUpdateStrategy)
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == len(logical_devices)


def test_jit_compile_one_replica_matches_no_jit(logical_devices):
    """TPU readiness stand-in: the whole local step + sync compiles with XLA."""
    x, y = _data()
    weights = []
    for jit in (False, True):
        strategy = _local(logical_devices[:1], sync_every=3)
        model = _model(strategy, lambda: "adam", jit_compile=jit)
        assert model.jit_compile is jit
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        assert int(strategy.sync_count.numpy()) == 7  # 20 steps: 6 periodic + epoch end
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, atol=1e-5)
