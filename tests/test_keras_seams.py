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


# ---- LocalUpdateStrategy seams (Keras 3.15) ----


def test_local_update_per_replica_builds_distributed_value(logical_devices):
    strategy = tf.distribute.MirroredStrategy(logical_devices[:2])
    parts = [tf.constant(1.0), tf.constant(2.0)]
    value = _keras_fit.per_replica(parts)
    assert isinstance(value, tf.distribute.DistributedValues)
    assert list(strategy.experimental_local_results(value)) == parts


def test_local_update_extended_private_methods_exist():
    from tensorflow.python.distribute import (
        collective_all_reduce_strategy,
        mirrored_strategy,
        tpu_strategy,
    )

    for extended in (
        mirrored_strategy.MirroredExtended,
        collective_all_reduce_strategy.CollectiveAllReduceExtended,
        tpu_strategy.TPUExtended,
    ):
        assert callable(getattr(extended, "_use_merge_call", None)), extended
        assert callable(getattr(extended, "_create_variable", None)), extended


def test_local_update_keras_step_functions_are_recognised(logical_devices):
    strategy = tf.distribute.MirroredStrategy(
        logical_devices[:1], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    seen = []
    original_run = strategy.run

    def recording_run(fn, args=(), kwargs=None, options=None):
        seen.append(fn)
        return original_run(fn, args, kwargs, options)

    strategy.run = recording_run
    with strategy.scope():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    x = np.ones((4, 2), np.float32)
    y = np.ones((4, 1), np.float32)
    model.fit(x, y, verbose=0)
    train_fns = list(seen)
    seen.clear()
    model.evaluate(x, y, verbose=0)
    model.predict(x, verbose=0)
    assert train_fns and seen
    assert not any(_keras_fit.is_keras_inference_step(f) for f in train_fns)
    assert all(_keras_fit.is_keras_inference_step(f) for f in seen)


def test_local_update_slots_created_colocated_with_their_variable(logical_devices):
    from tf_async.strategies import LocalUpdateStrategy

    strategy = LocalUpdateStrategy(tf.distribute.MirroredStrategy(logical_devices[:2]))
    with strategy.scope():
        v = keras.Variable(np.zeros(3, np.float32))
        optimizer = keras.optimizers.Adam()
        optimizer.build([v])
    slots = strategy._lu_runtime.slots[_keras_fit.variable_key(v)]
    assert len(slots) == 2  # Adam's m and v
