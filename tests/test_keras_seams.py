"""Pins every Keras/TF private attribute tf_async relies on (tf_async/_keras_fit.py).

If one of these fails after a Keras or TensorFlow upgrade, the seam moved:
update ``tf_async/_keras_fit.py`` (and its "written against" version) first.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_async import _keras_fit


def test_written_against_keras_3():
    assert keras.__version__.startswith("3."), keras.__version__
    assert _keras_fit.KERAS_VERSION_WRITTEN_AGAINST.startswith("3.")


def test_variable_key_matches_keras_optimizer_var_key():
    optimizer = keras.optimizers.Adam()
    assert hasattr(optimizer, "_var_key"), "Keras optimizer lost _var_key"
    v = keras.Variable(np.zeros(3, np.float32))
    assert _keras_fit.variable_key(v) == optimizer._var_key(v)
    assert _keras_fit.variable_key(v.value) == optimizer._var_key(v)


def test_variable_key_maps_mirrored_components_to_container(logical_devices):
    strategy = tf.distribute.MirroredStrategy(logical_devices)
    with strategy.scope():
        v = keras.Variable(np.zeros(3, np.float32))
        optimizer = keras.optimizers.Adam()
    container = v.value
    assert isinstance(container, tf.distribute.DistributedValues)
    keys = {_keras_fit.variable_key(c) for c in container.values}
    assert keys == {optimizer._var_key(v)}


# ---- sharded Adam seams (Keras 3.15) ----


def test_sharded_adam_override_points_exist_with_signatures():
    import inspect

    for name in _keras_fit.SHARDED_ADAM_OVERRIDES:
        assert hasattr(keras.optimizers.Adam, name), f"Keras optimizer lost {name}"
    params = list(inspect.signature(keras.optimizers.Adam._backend_update_step).parameters)
    assert params == ["self", "grads", "trainable_variables", "learning_rate"]
    params = list(inspect.signature(keras.optimizers.Adam._apply_weight_decay).parameters)
    assert params == ["self", "variables"]


def test_apply_routes_through_weight_decay_then_backend_update_step():
    calls = []

    class Probe(keras.optimizers.Adam):
        def _apply_weight_decay(self, variables):
            calls.append(("decay", len(variables)))

        def _backend_update_step(self, grads, trainable_variables, learning_rate):
            calls.append(("update", len(grads), len(trainable_variables)))

    a = keras.Variable(np.ones(2, np.float32))
    b = keras.Variable(np.ones(3, np.float32))
    optimizer = Probe(weight_decay=0.1)
    optimizer.apply([tf.ones(2), None], [a, b])  # None gradients are filtered first
    assert calls == [("decay", 1), ("update", 1, 1)]
    assert int(optimizer.iterations.numpy()) == 1


def test_uses_weight_decay_honours_exclusions():
    optimizer = keras.optimizers.AdamW()
    kernel = keras.Variable(np.ones(2, np.float32), name="kernel")
    bias = keras.Variable(np.ones(2, np.float32), name="bias")
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    assert _keras_fit.uses_weight_decay(optimizer, kernel)
    assert not _keras_fit.uses_weight_decay(optimizer, bias)


def test_checkpointed_tensor_saves_and_restores_through_checkpoint(tmp_path):
    store = {"value": tf.constant([1.0, 2.0, 3.0])}

    def write(value):
        store["value"] = tf.identity(value)

    root = tf.train.Checkpoint()
    root.entry = _keras_fit.CheckpointedTensor(lambda: store["value"], write)
    path = root.save(str(tmp_path / "ckpt"))
    assert dict(tf.train.list_variables(path))["entry/.ATTRIBUTES/VARIABLE_VALUE"] == [3]
    store["value"] = tf.zeros(3)
    root.restore(path).assert_consumed()
    np.testing.assert_array_equal(store["value"].numpy(), [1.0, 2.0, 3.0])
    # Deferred: restore first, attach the entry afterwards.
    store["value"] = tf.zeros(3)
    late = tf.train.Checkpoint()
    status = late.restore(path)
    late.entry = _keras_fit.CheckpointedTensor(lambda: store["value"], write)
    status.assert_consumed()
    np.testing.assert_array_equal(store["value"].numpy(), [1.0, 2.0, 3.0])
