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


# ---- optimizers seams (Keras 3.15) ----
# DCAdam and SimulatedAsyncStrategy (tf_async/_keras_fit.py, "optimizers seams").


def test_tf_optimizer_distributed_update_step_is_the_per_apply_hook():
    import inspect

    from keras.src.backend.tensorflow.optimizer import TFOptimizer

    name = _keras_fit.DISTRIBUTED_UPDATE_STEP_METHOD
    method = getattr(TFOptimizer, name, None)
    assert method is not None, f"TFOptimizer lost {name}"
    assert list(inspect.signature(method).parameters) == [
        "self", "distribution", "grads_and_vars", "learning_rate",
    ]
    assert f"self.{name}" in inspect.getsource(TFOptimizer._backend_update_step)
    assert isinstance(keras.optimizers.Adam(), TFOptimizer)


def test_fit_runs_bound_train_step_through_strategy_run():
    import inspect

    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    seen = []

    class Probe(tf.distribute.OneDeviceStrategy):
        def run(self, fn, args=(), kwargs=None, options=None):
            seen.append(_keras_fit.keras_train_step_model(fn))
            return super().run(fn, args=args, kwargs=kwargs, options=options)

    strategy = Probe("/cpu:0")
    with strategy.scope():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 2), np.float32), np.ones((4, 1), np.float32), verbose=0)
    assert seen and seen[0] is model, "fit no longer passes model.train_step to run"
    model.evaluate(np.ones((4, 2), np.float32), np.ones((4, 1), np.float32), verbose=0)
    assert seen[-1] is None  # test_step is not recognised as a train step
    source = inspect.getsource(TensorFlowTrainer.train_step)
    assert f"self.optimizer.{_keras_fit.APPLY_GRADIENTS_NAME}(" in source
    assert source.index("tape.gradient") < source.index("self.optimizer.apply_gradients")
    # The simulator's non-finite guard sees the loss in scale_loss, before the
    # gradient is taken of what it returns.
    scale = f"loss = self.optimizer.{_keras_fit.SCALE_LOSS_NAME}(loss)"
    assert scale in source
    assert source.index(scale) < source.index("tape.gradient(loss")
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


def test_first_local_replica_id_is_tf_replica_id_mapping():
    from tensorflow.python.distribute import collective_all_reduce_strategy as cars

    assert _keras_fit.first_local_replica_id(tf.distribute.get_strategy()) == 0
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    strategy = tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    assert _keras_fit.first_local_replica_id(strategy) == 0
    # MultiWorkerMirrored: id_in_cluster · local replicas + local id (TF 2.21).
    extended = cars.CollectiveAllReduceExtended
    assert "_id_in_cluster" in extended._get_replica_id_in_sync_group.__code__.co_names


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


def test_aps_flatten_metrics_in_order_is_evaluates_list_return():
    x, y = np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae", "mse"])
    listed = model.evaluate(x, y, verbose=0)
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    assert _keras_fit.flatten_metrics_in_order(model, logs) == listed
    assert listed[0] == logs["loss"] and len(listed) == 3
    single = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    single.compile(optimizer="sgd", loss="mse")
    assert _keras_fit.flatten_metrics_in_order(
        single, single.evaluate(x, y, verbose=0, return_dict=True)) == single.evaluate(
            x, y, verbose=0)


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
    # is_distributed_data: what create_per_worker_dataset returns, and TF's
    # distributed datasets/iterators.
    assert isinstance(values.PerWorkerDatasetFromDatasetFunction, type)
    one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
    data = tf.data.Dataset.range(2).batch(1)
    distributed = one_device.experimental_distribute_dataset(data)
    assert _keras_fit.is_distributed_data(distributed)
    assert _keras_fit.is_distributed_data(iter(distributed))
    assert not _keras_fit.is_distributed_data(data)
    assert not _keras_fit.is_distributed_data(lambda: data)
    # stranded_on_localhost reads an eager dataset's variant-tensor device.
    assert isinstance(data._variant_tensor.device, str)
    assert not _keras_fit.stranded_on_localhost([data])  # not connected to a cluster
    extended = parameter_server_strategy_v2.ParameterServerStrategyV2Extended
    assert hasattr(extended, "_update") and hasattr(extended, "colocate_vars_with")
    # allow_sharded_variable_updates starts a sharded variable's slots at the
    # server of its first shard: TF's round robin places variable k on
    # ps task ``_variable_count % _num_ps`` and then counts it.
    import inspect

    round_robin = inspect.getsource(extended._create_variable_round_robin)
    assert "self._variable_count % self._num_ps" in round_robin.replace("\n", " ")
    assert "self._variable_count += 1" in round_robin
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


# ---- embedding tables seams (Keras 3.15) ----
# tf_async/_rows.py, strategies/_table_rows.py, keras_optimizers/row_sparse.py
# and lazy.py (tf_async/_keras_fit.py, "embedding tables seams").


def _built_embedding(rows=6, dim=2):
    layer = keras.layers.Embedding(rows, dim)
    layer.build()
    layer.embeddings.assign(np.arange(rows * dim, dtype=np.float32).reshape(rows, dim))
    return layer


def test_embedding_call_is_take_of_the_table_cast_to_compute_dtype():
    import inspect

    _keras_fit.install_embedding_lookup()
    _keras_fit.install_embedding_lookup()  # idempotent
    wrapped = vars(keras.layers.Embedding)["call"]
    assert wrapped._tf_async_rows
    original = wrapped.__wrapped__
    assert original is _keras_fit._ORIGINAL_EMBEDDING_CALL
    assert list(inspect.signature(original).parameters) == ["self", "inputs"]
    source = inspect.getsource(original)
    assert 'ops.cast(inputs, "int32")' in source  # ids not int32/int64
    assert "ops.take(self.embeddings, inputs, axis=0)" in source
    assert "ops.cast(outputs, dtype=self.compute_dtype)" in source
    # Negative ids count from the end (what _rows.checked_ids reproduces).
    layer = _built_embedding()
    table = layer.embeddings.numpy()
    ids = np.array([[0, -1], [5, -6]], np.int32)
    np.testing.assert_array_equal(_keras_fit.keras_embedding_call(layer, ids), table[ids])
    np.testing.assert_array_equal(_keras_fit.keras_embedding_call(layer, ids.astype("float32")),
                                  table[ids])


def test_embedding_handler_decides_each_call_and_falls_back_to_keras():
    layer = _built_embedding()
    table = layer.embeddings.numpy()
    ids = np.array([1, 4], np.int32)
    calls = []

    def handler(lay, inputs):
        calls.append(lay)
        return NotImplemented if len(calls) == 1 else tf.zeros((2, 2))

    with _keras_fit.embedding_lookup(handler):
        np.testing.assert_array_equal(layer(ids), table[ids])  # NotImplemented: Keras
        np.testing.assert_array_equal(layer(ids), np.zeros((2, 2)))
    assert calls == [layer, layer]
    # No handler active: the default one (remote tables only) leaves a local table to Keras.
    np.testing.assert_array_equal(layer(ids), table[ids])
    assert _keras_fit.default_embedding_handler is not None  # set by tf_async._rows


def test_plain_embedding_table_is_the_variable_only_without_lora_or_quantization():
    layer = _built_embedding()
    assert layer.lora_enabled is False and layer.quantization_mode is None
    assert _keras_fit.plain_embedding_table(layer) is layer._embeddings
    lora = _built_embedding()
    lora.enable_lora(1)
    assert lora.lora_enabled and _keras_fit.plain_embedding_table(lora) is None
    quantized = _built_embedding()
    quantized.quantize("int8")
    assert quantized.quantization_mode == "int8"
    assert _keras_fit.plain_embedding_table(quantized) is None


def test_variable_read_scope_sees_every_read_and_stateless_value_maps():
    v = keras.Variable(np.ones(3, np.float32))
    w = keras.Variable(np.zeros(3, np.float32))
    reads = []
    with _keras_fit.VariableReadScope([(v, tf.fill([3], 2.0))], on_read=reads.append):
        assert float(keras.ops.sum(v)) == 6.0  # the mapped value
        keras.ops.add(w, 1.0)
        assert _keras_fit.stateless_value(v) is not None
        assert _keras_fit.stateless_value(w) is None
        _ = v.value
    read_ids = [id(r) for r in reads]
    assert read_ids[0] == id(v) and id(w) in read_ids and read_ids.count(id(v)) >= 2
    assert _keras_fit.stateless_value(v) is None  # no scope


def test_apply_hands_indexed_slices_to_the_instance_update_step():
    """row_sparse.updates replaces ``update_step`` on the instance; Keras'
    apply calls it per variable with the IndexedSlices gradient as given."""
    for optimizer in (keras.optimizers.SGD(0.1), keras.optimizers.Adagrad(0.1),
                      keras.optimizers.Adam(0.1)):
        table = keras.Variable(np.ones((5, 2), np.float32))
        optimizer.build([table])
        seen = []
        vars(optimizer)["update_step"] = (
            lambda gradient, variable, learning_rate: seen.append((gradient, variable)))
        gradient = tf.IndexedSlices(tf.ones((2, 2)), tf.constant([0, 3]), tf.constant([5, 2]))
        optimizer.apply([gradient], [table])
        assert len(seen) == 1 and isinstance(seen[0][0], tf.IndexedSlices), optimizer
        # The backing tf.Variable (distribution.extended.update), which
        # _get_variable_index maps back to the slots.
        assert seen[0][1] is _keras_fit.raw_variable(table)
        assert optimizer._get_variable_index(seen[0][1]) == 0
        vars(optimizer).pop("update_step")
        assert type(optimizer).update_step is type(optimizer).__dict__["update_step"]


def test_optimizer_slot_lists_indexed_by_variable():
    """lazy.py / row_sparse.py read Keras' slot lists by ``_get_variable_index``."""
    a = keras.Variable(np.ones((4, 2), np.float32))
    b = keras.Variable(np.ones((3,), np.float32))
    adam = keras.optimizers.Adam(amsgrad=True)
    adagrad = keras.optimizers.Adagrad()
    sgd = keras.optimizers.SGD(momentum=0.9)
    for optimizer in (adam, adagrad, sgd):
        optimizer.build([a, b])
        assert optimizer._get_variable_index(b) == 1
        assert callable(optimizer._apply_weight_decay)
    for slots in (adam._momentums, adam._velocities, adam._velocity_hats,
                  adagrad._accumulators, sgd.momentums):
        assert [tuple(s.shape) for s in slots] == [(4, 2), (3,)]
    assert float(adagrad._accumulators[1].numpy()[0]) == np.float32(adagrad.initial_accumulator_value)


def test_sharded_variable_exposes_its_shards():
    from tensorflow.python.distribute import sharded_variable

    shards = [tf.Variable(np.zeros((2, 2), np.float32)), tf.Variable(np.ones((1, 2), np.float32))]
    table = sharded_variable.ShardedVariable(shards)
    assert _keras_fit.variable_shards(table) == shards
    assert _keras_fit.variable_shards(tf.Variable(1.0)) is None
    np.testing.assert_array_equal(tf.nn.embedding_lookup(table, [2, 0]), [[1, 1], [0, 0]])


# ---- partitioned initial values seams (Keras 3.15) ----
# tf_async/_partitioned_init.py (tf_async/_keras_fit.py, "partitioned initial
# values seams").


def test_keras_variable_is_made_from_a_shapeless_initial_value_callable():
    """``_initialize_with_initializer`` hands ``tf.Variable`` a callable and no
    ``shape=`` (so TF's ParameterServerStrategy makes the whole value)."""
    from keras.src.backend.tensorflow.core import Variable

    assert "_initialize_with_initializer" in vars(Variable) or hasattr(
        Variable, "_initialize_with_initializer")
    seen = []

    def creator(next_creator, **kwargs):
        seen.append((callable(kwargs.get("initial_value")), kwargs.get("shape")))
        return next_creator(**kwargs)

    initializer = keras.initializers.Constant(2.0)
    with tf.variable_creator_scope(creator):
        v = keras.Variable(initializer, shape=(3, 2), dtype="float32")
    assert seen == [(True, None)], seen
    np.testing.assert_array_equal(v.numpy(), np.full((3, 2), 2.0, np.float32))


def test_installed_partitioned_initial_values_keep_keras_outside_the_strategy():
    _keras_fit.install_partitioned_initial_values()
    _keras_fit.install_partitioned_initial_values()  # idempotent
    keras.utils.set_random_seed(5)
    a = keras.layers.Embedding(7, 3)
    a.build((None,))
    keras.utils.set_random_seed(5)
    with tf.variable_creator_scope(lambda next_creator, **kw: next_creator(**kw)):
        b = keras.layers.Embedding(7, 3)
        b.build((None,))
    np.testing.assert_array_equal(a.embeddings.numpy(), b.embeddings.numpy())


def test_initializer_fans_are_variance_scalings():
    shape = (10, 6)
    fan_in, fan_out = _keras_fit.initializer_fans(shape)
    assert (fan_in, fan_out) == (10, 6)
    assert _keras_fit.initializer_fans((3, 3, 4, 5)) == (36, 45)
    assert _keras_fit.initializer_fans((4, 5), input_axes=[], output_axes=[]) == (1, 1)
    values = keras.initializers.GlorotUniform(seed=1)(shape)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    assert float(np.abs(values).max()) <= limit
