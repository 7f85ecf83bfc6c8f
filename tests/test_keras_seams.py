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


# ---- async parameter-server seams (Keras 3.15) ----


def test_aps_trainer_methods_and_model_internals_exist():
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    for name in ("fit", "evaluate", "predict"):
        assert name in TensorFlowTrainer.__dict__, f"TensorFlowTrainer.{name} moved"
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    for name in ("_loss_tracker", "_compile_metrics", "_call_has_training_arg",
                 "_distribute_strategy", "_initial_epoch"):
        assert hasattr(model, name), f"Keras model lost {name}"
    for name in ("_compute_loss", "_should_eval", "_get_metrics_result_or_logs",
                 "_symbolic_build", "_assert_compile_called"):
        assert callable(getattr(model, name, None)), f"Keras model lost {name}()"
    _keras_fit.symbolic_build(model, (tf.TensorSpec((None, 3)), tf.TensorSpec((None, 2))))
    assert model.built and model._compile_metrics.built
    assert _keras_fit.initial_epoch(model, 3) == 3


def test_aps_keras_variable_assign_add_internals():
    from keras.src.backend.tensorflow.core import Variable

    v = keras.Variable(np.zeros(2, np.float32))
    assert isinstance(v, Variable)
    for name in ("_value", "_dtype", "_convert_to_tensor"):
        assert hasattr(v, name), f"Keras TF Variable lost {name}"
    assert isinstance(v._value, tf.Variable)


def test_aps_tf_distribute_internals_exist():
    from tensorflow.python.distribute import distribute_lib, sharded_variable
    from tensorflow.python.distribute import parameter_server_strategy_v2
    from tensorflow.python.distribute.coordinator import values

    assert isinstance(distribute_lib._get_default_strategy(), tf.distribute.Strategy)
    assert hasattr(distribute_lib, "UpdateContext")
    for name in ("_push_per_thread_mode", "_pop_per_thread_mode", "_get_per_thread_mode"):
        assert callable(getattr(distribute_lib, name, None)), name
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        with _keras_fit.outside_strategy_scopes():
            assert not tf.distribute.has_strategy()
        assert tf.distribute.get_strategy() is strategy
    assert hasattr(sharded_variable, "ShardedVariable")
    assert "_values" in values.PerWorkerValues.__init__.__code__.co_names
    assert issubclass(values.PerWorkerDistributedIterator, values.PerWorkerValues)
    extended = parameter_server_strategy_v2.ParameterServerStrategyV2Extended
    assert hasattr(extended, "_update") and hasattr(extended, "colocate_vars_with")
    for op in ("ResourceCountUpTo", "ResourceScatterMax", "ResourceScatterUpdate",
               "DatasetToGraphV2"):
        assert hasattr(tf.raw_ops, op), op


def _child_installed_seams():
    from tf_async import _keras_fit as seams

    seams.install_trainer_dispatch()
    seams.install_atomic_assign_add()
    seams.install_trainer_dispatch()  # idempotent
    seams.install_atomic_assign_add()
    v = keras.Variable(np.ones(2, np.float32))
    v.assign_add(np.full(2, 2.0, np.float32))
    v.assign_sub(np.full(2, 0.5, np.float32))
    counter = keras.Variable(0, dtype="int64")

    @tf.function
    def bump():
        counter.assign_add(1)

    for _ in range(3):
        bump()
    shape_error = ""
    try:
        v.assign_add(np.ones(3, np.float32))
    except (ValueError, tf.errors.InvalidArgumentError) as error:  # as stock Keras
        shape_error = type(error).__name__
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(np.ones((8, 3)), np.ones((8, 1)), epochs=1, verbose=0)
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    return {
        "value": v.numpy().tolist(),
        "counter": int(counter.numpy()),
        "shape_error": shape_error,
        "plain_fit_loss": history.history["loss"][0],
        "dispatched": TensorFlowTrainer.fit._tf_async_dispatch,
    }


def test_aps_installed_seams_keep_keras_semantics(fresh_process):
    r = fresh_process(_child_installed_seams, timeout=120)
    assert r["value"] == [2.5, 2.5]
    assert r["counter"] == 3
    assert r["shape_error"]  # a shape mismatch still raises
    assert np.isfinite(r["plain_fit_loss"])  # no strategy hook: Keras' own fit
    assert r["dispatched"]
