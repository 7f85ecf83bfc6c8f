"""The one module of tf_async that touches Keras/TF private internals.

Written against Keras 3.15 (TensorFlow 2.21). Every private attribute used by
the package goes through this module, and ``tests/test_keras_seams.py`` pins
each of them, so a Keras upgrade that moves one fails there, loudly, instead
of deep inside a training run.

Seams:
  * ``variable_key`` — identity of a variable as Keras' TF optimizer sees it
    (``keras/src/backend/tensorflow/optimizer.py::TFOptimizer._var_key``): a
    Keras variable, its backing ``tf.Variable`` and every per-device component
    of a distributed variable map to one key.
"""

from __future__ import annotations

import contextlib as _contextlib
import functools as _functools
import threading as _threading

import keras
import tensorflow as tf

KERAS_VERSION_WRITTEN_AGAINST = "3.15"


def variable_key(variable) -> int:
    """Key under which Keras' TF optimizer indexes ``variable``'s slots.

    Mirrors ``TFOptimizer._var_key`` (Keras 3.15): unwrap a ``keras.Variable``
    to its ``tf.Variable``, a per-replica component to its distributed
    container, and return the container's ``_unique_id``.
    """
    if isinstance(variable, keras.Variable):
        variable = variable.value  # keras.Variable -> tf.Variable
    if hasattr(variable, "_distributed_container"):
        variable = variable._distributed_container()
    elif (
        isinstance(variable, tf.__internal__.CompositeTensor)
        and hasattr(variable, "handle")
        and hasattr(variable.handle, "_distributed_container")
    ):
        variable = variable.handle._distributed_container()
    return variable._unique_id


# ---- optimizers seams (Keras 3.15) ----
# Used by tf_async/keras_optimizers/delay_compensated.py (DCAdam) and
# tf_async/strategies/simulated_async.py (SimulatedAsyncStrategy); pinned by
# the "optimizers seams" tests at the end of tests/test_keras_seams.py.
#
# * ``TFOptimizer._distributed_tf_update_step(distribution, grads_and_vars,
#   learning_rate)`` — called once per ``apply`` by
#   ``TFOptimizer._backend_update_step`` (through ``maybe_merge_call``, i.e.
#   in cross-replica context under MirroredStrategy), it loops
#   ``distribution.extended.update(var, update_step-like fn, ...)``. DCAdam
#   overrides it to bump its exact global step once per apply and hand the
#   returned value to every variable's update.
# * ``TensorFlowTrainer`` passes the bound ``model.train_step`` to
#   ``strategy.run`` (``_make_function``) and ``train_step`` applies with
#   ``self.optimizer.apply_gradients(...)`` after ``tape.gradient``. The
#   simulator recognises that call and, while tracing it, wraps the
#   optimizer's ``apply_gradients`` and ``apply`` on the instance (removed
#   afterwards), so the live weights are back before any optimizer code.

DISTRIBUTED_UPDATE_STEP_METHOD = "_distributed_tf_update_step"
TRAIN_STEP_NAME = "train_step"
APPLY_GRADIENTS_NAME = "apply_gradients"
# Wrapped by the simulator (a custom train_step may call either).
OPTIMIZER_APPLY_NAMES = (APPLY_GRADIENTS_NAME, "apply")
# ``train_step`` passes its loss through ``optimizer.scale_loss`` before
# ``tape.gradient``: the simulator's non-finite guard sees the loss there.
SCALE_LOSS_NAME = "scale_loss"


def raw_variable(variable):
    """The backing ``tf.Variable`` of a Keras variable (itself otherwise).

    Its ``assign_add`` is TF's atomic AssignAddVariableOp, unlike
    ``keras.Variable.assign_add`` (``assign(self + value)``).
    """
    if isinstance(variable, keras.Variable):
        return variable.value
    return variable


def keras_train_step_model(fn):
    """The Keras model if ``fn`` is the bound ``train_step`` Keras' ``fit``
    hands to ``strategy.run``; ``None`` otherwise (test/predict steps, user fns).
    """
    model = getattr(fn, "__self__", None)
    if (
        getattr(fn, "__name__", None) == TRAIN_STEP_NAME
        and isinstance(model, keras.Model)
    ):
        return model
    return None
# ---- LocalUpdateStrategy seams (Keras 3.15) ----
# Used by tf_async/strategies/local_update.py; pinned at the end of
# tests/test_keras_seams.py.
#
#  * ``per_replica`` — builds a ``tf.distribute`` PerReplica value from
#    per-device tensors (``tensorflow.python.distribute.values.PerReplica``).
#  * ``is_keras_inference_step`` — Keras 3.15 ``TensorFlowTrainer`` passes its
#    bound ``test_step`` method to ``strategy.run`` for evaluate
#    (``backend/tensorflow/trainer.py::_make_function``) and, for predict, a
#    ``functools.wraps`` wrapper of the local ``one_step_on_data`` defined in
#    ``TensorFlowTrainer.make_predict_function``.
#  * ``LocalUpdateExtendedSeams`` — overrides two private methods shared by
#    ``MirroredExtended``, ``CollectiveAllReduceExtended`` and ``TPUExtended``:
#    ``_use_merge_call`` (``ReplicaContext.all_reduce`` goes through
#    ``merge_call`` -> ``extended.batch_reduce_to`` only when it returns True)
#    and ``_create_variable(next_creator, **kwargs)`` (receives
#    ``colocate_with=`` for Keras optimizer slots created by
#    ``TFOptimizer.add_variable_from_reference`` under
#    ``extended.colocate_vars_with``).

KERAS_INFERENCE_STEP_NAMES = ("test_step", "predict_step")


def per_replica(components):
    """A ``PerReplica`` distributed value holding ``components`` (one per device)."""
    from tensorflow.python.distribute import values as tf_distribute_values

    return tf_distribute_values.PerReplica(tuple(components))


KERAS_PREDICT_FUNCTION_QUALNAME = "TensorFlowTrainer.make_predict_function.<locals>."


def is_keras_inference_step(fn) -> bool:
    """True if ``fn`` is what Keras' evaluate/predict hand to ``strategy.run``."""
    seen = 0
    while fn is not None and seen < 8:
        name = getattr(fn, "__name__", "")
        owner = getattr(fn, "__self__", None)
        if name in KERAS_INFERENCE_STEP_NAMES and isinstance(owner, keras.Model):
            return True
        if getattr(fn, "__qualname__", "").startswith(KERAS_PREDICT_FUNCTION_QUALNAME):
            return True
        fn = getattr(fn, "__wrapped__", None)
        seen += 1
    return False


class LocalUpdateExtendedSeams:
    """Mixin for a ``tf.distribute`` extended class (placed before it in the MRO).

    Subclasses implement ``_lu_force_merge_call() -> bool`` and
    ``_lu_variable_created(variable, colocate_with)``.
    """

    def _use_merge_call(self):
        if self._lu_force_merge_call():
            return True
        return super()._use_merge_call()

    def _create_variable(self, next_creator, **kwargs):
        colocate_with = kwargs.get("colocate_with")
        variable = super()._create_variable(next_creator, **kwargs)
        self._lu_variable_created(variable, colocate_with)
        return variable
# ---- sharded Adam seams (Keras 3.15) ----
# ShardedAdam (tf_async/keras_optimizers/sharded_adam.py) relies on:
#   * ``TFOptimizer._backend_update_step(grads, trainable_variables,
#     learning_rate)`` — called by ``BaseOptimizer._backend_apply_gradients``
#     (from ``apply``, in replica context under ``strategy.run``) with the
#     clipped, *not yet all-reduced* gradients. ShardedAdam overrides it.
#   * ``TFOptimizer._apply_weight_decay(variables)`` — called right before
#     ``_backend_update_step`` with the same variables; ShardedAdam overrides
#     it to fold the decay into its sharded step.
#   * ``BaseOptimizer._use_weight_decay(variable)`` — honours
#     ``exclude_from_weight_decay``; wrapped by ``uses_weight_decay``.
#   * TF's checkpoint protocol ``Trackable._serialize_to_tensors`` /
#     ``_restore_from_tensors`` — ``CheckpointedTensor`` below.
# All pinned in tests/test_keras_seams.py (section "sharded Adam seams").

SHARDED_ADAM_OVERRIDES = (
    "_backend_update_step",
    "_apply_weight_decay",
    "_update_model_variables_moving_average",
    "_overwrite_model_variables_with_average_value",
)
#   * ``BaseOptimizer._update_model_variables_moving_average`` /
#     ``_overwrite_model_variables_with_average_value`` — called by
#     ``_backend_apply_gradients`` after the update when ``use_ema``;
#     ShardedAdam folds the EMA (sharded like m and v) into its step.
#   * TF (not Keras): ``CollectiveAllReduce._launchers`` — one
#     ``cross_device_utils.CollectiveReplicaLauncher`` per local device, with
#     ``_group_size``, ``_group_key``, ``_device``, ``_options``,
#     ``_next_instance_key()``, ``_get_ordering_token()`` and ``_all_gather``;
#     ZeRO-1's all-to-all / all-gather use the strategy's own collective keys
#     (``collective_launchers`` and below).
#   * TF (not Keras): ``StrategyExtended._get_replica_id_in_sync_group(0)`` —
#     the global id of this worker's first local replica, to map a global
#     shard to (worker, local replica) under MultiWorkerMirroredStrategy
#     (``first_local_replica_id``).


def collective_launchers(strategy):
    """The per-device collective launchers of ``strategy``, or ``None``.

    ``None`` unless the strategy's cross-device ops are TF's
    ``CollectiveAllReduce`` (MultiWorkerMirrored; Mirrored's CPU default).
    """
    from tensorflow.python.distribute import cross_device_ops

    ops_ = getattr(strategy.extended, "_cross_device_ops", None)
    if ops_ is None:
        ops_ = getattr(strategy.extended, "_get_cross_device_ops", lambda _: None)(None)
    if isinstance(ops_, cross_device_ops.CollectiveAllReduce):
        return list(ops_._launchers)
    return None


def first_local_replica_id(strategy) -> int:
    """Sync-group id of this worker's first replica (0 on a single worker).

    TF's ``StrategyExtended._get_replica_id_in_sync_group(local_id)``
    (``MultiWorkerMirroredStrategy``: ``id_in_cluster · local replicas +
    local_id``); ``experimental_local_results`` lists this worker's replicas
    in that order.
    """
    return int(strategy.extended._get_replica_id_in_sync_group(0))


def launcher_device(launcher) -> str:
    return launcher._device


def collective_all_to_all(launcher, tensor):
    """All-to-all of ``tensor`` ([N, ...]): row j goes to replica j; returns [N, ...]."""
    from tensorflow.python.ops import collective_ops

    instance_key = launcher._next_instance_key()
    options = launcher._options
    with tf.device(launcher._device):
        return collective_ops.all_to_all_v2(
            tensor,
            launcher._group_size,
            launcher._group_key,
            instance_key,
            communication_hint=options.implementation.value,
            timeout=options.timeout_seconds,
            ordering_token=launcher._get_ordering_token(),
        )


def collective_all_gather(launcher, tensor):
    """All-gather of ``tensor`` (same static shape everywhere) along axis 0."""
    return launcher._all_gather(tensor, None)


def uses_weight_decay(optimizer, variable) -> bool:
    """``optimizer._use_weight_decay(variable)`` (Keras 3.15 BaseOptimizer)."""
    return bool(optimizer._use_weight_decay(variable))


class CheckpointedTensor(tf.__internal__.tracking.Trackable):
    """A checkpoint entry whose value is computed on save and scattered on restore.

    ``read_fn()`` returns the logical tensor to save; ``write_fn(tensor)``
    stores a restored tensor (returning the assign op(s)). Saved under the
    same key a variable uses (``.ATTRIBUTES/VARIABLE_VALUE``), via TF's
    ``_serialize_to_tensors`` / ``_restore_from_tensors`` protocol.
    """

    def __init__(self, read_fn, write_fn) -> None:
        self._read_fn = read_fn
        self._write_fn = write_fn

    def _serialize_to_tensors(self):
        return {"VARIABLE_VALUE": self._read_fn()}

    def _restore_from_tensors(self, restored_tensors):
        return self._write_fn(restored_tensors["VARIABLE_VALUE"])


def variable_shards(variable):
    """Shards of a partitioned (``ShardedVariable``) variable, else ``None``.

    Under ``ParameterServerStrategy(variable_partitioner=...)`` a Keras
    Variable wraps a ``tensorflow.python.distribute.sharded_variable.
    ShardedVariable`` (not public); it is recognised by its ``variables`` list
    of per-parameter-server ``tf.Variable`` shards, split along axis 0.
    """
    if isinstance(variable, keras.Variable):
        variable = variable.value
    if isinstance(variable, tf.Variable):
        return None
    shards = getattr(variable, "variables", None)
    if isinstance(shards, (list, tuple)) and shards and all(
        isinstance(s, tf.Variable) for s in shards
    ):
        return list(shards)
    return None


# ---- async parameter-server seams (Keras 3.15) ----
#
# * ``install_trainer_dispatch`` — Keras 3.15 ``TensorFlowTrainer.fit`` /
#   ``evaluate`` / ``predict`` cannot run under ParameterServerStrategy (they
#   wrap data with ``experimental_distribute_dataset`` and call
#   ``strategy.run`` directly). The dispatch wraps these three methods once: if
#   the model's strategy has ``_tf_async_<method>``, that hook runs instead
#   (it receives the original method so it can reuse Keras' own loop).
# * ``install_atomic_assign_add`` — Keras' ``Variable.assign_add`` is
#   ``assign(self + value)`` (read, then write), which loses increments when
#   several workers update one parameter-server variable concurrently (e.g.
#   ``optimizer.iterations``: 228 of 300 steps with 2 workers). The TF-backend
#   Variable gets an ``assign_add``/``assign_sub`` that issues the backing
#   ``tf.Variable``'s atomic ``AssignAddVariableOp`` (same value, one op).
# * ``install_update_guard`` — TF's ``StrategyExtended._update(var, fn, args,
#   kwargs, group)`` (``extended.update``'s implementation; Keras'
#   ``TFOptimizer._distributed_tf_update_step`` calls ``extended.update(var,
#   update_step-like fn, ...)`` once per variable) is wrapped per strategy
#   instance so a :func:`guarded_updates` guard can run a variable's update
#   inside a lock (embedding tables' row updates, ``strategies/_table_locks``).
# * ``allow_sharded_variable_updates`` — TF's ``_update`` (above) and
#   ``colocate_vars_with``: a slot of a ``ShardedVariable`` is created without
#   the colocation (partitioned like its variable), with the round robin
#   (``_variable_count`` % ``_num_ps`` in ``_create_variable_round_robin``)
#   started at the server of the variable's first shard, so each slot shard
#   lands beside its variable shard.
# * Trainer internals the plugin fit loop uses: ``_loss_tracker``,
#   ``_compute_loss``, ``_compile_metrics``, ``_call_has_training_arg``,
#   ``_distribute_strategy``, ``_initial_epoch`` (BackupAndRestore),
#   ``_should_eval``, ``_get_metrics_result_or_logs``,
#   ``_flatten_metrics_in_order`` (worker-side evaluate), the default strategy,
#   and ``PerWorkerDistributedIterator`` (per-worker iterators from per-worker
#   ``InputContext``s).

_DISPATCHED_METHODS = ("fit", "evaluate", "predict")


def _tensorflow_trainer_class():
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    return TensorFlowTrainer


def install_trainer_dispatch() -> None:
    """Routes ``model.fit/evaluate/predict`` to a strategy hook when present.

    Idempotent. For a model whose ``distribute_strategy`` defines
    ``_tf_async_fit`` (resp. ``_tf_async_evaluate``, ``_tf_async_predict``),
    ``model.fit(*args, **kwargs)`` calls
    ``strategy._tf_async_fit(model, original_fit, *args, **kwargs)``; all other
    models run Keras' method unchanged.
    """
    import functools

    trainer = _tensorflow_trainer_class()
    for name in _DISPATCHED_METHODS:
        original = trainer.__dict__[name]
        if getattr(original, "_tf_async_dispatch", False):
            continue

        def make(original=original, name=name):
            @functools.wraps(original)
            def dispatched(self, *args, **kwargs):
                hook = getattr(self.distribute_strategy, f"_tf_async_{name}", None)
                if hook is None:  # compiled in a plugin strategy's scope only?
                    optimizer_strategy = getattr(
                        getattr(self, "optimizer", None), "_distribution_strategy", None
                    )
                    hook = getattr(optimizer_strategy, f"_tf_async_{name}", None)
                if hook is None:
                    check_not_stranded(self, name, args, kwargs)
                    return original(self, *args, **kwargs)
                return hook(self, functools.partial(original, self), *args, **kwargs)

            dispatched._tf_async_dispatch = True
            dispatched._tf_async_original = original
            return dispatched

        setattr(trainer, name, make())



def fit_with_callback(original, args, kwargs, callback):
    """``fit``'s ``(args, kwargs)`` with ``callback`` appended to its callbacks
    (for a ``_tf_async_fit`` hook: ``original`` is the bound Keras ``fit``)."""
    import inspect

    bound = inspect.signature(original).bind(*args, **kwargs)
    callbacks = bound.arguments.get("callbacks")
    if callbacks is None:
        callbacks = [callback]
    elif isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks.append(callback)
    else:
        callbacks = list(callbacks) + [callback]
    bound.arguments["callbacks"] = callbacks
    return bound.args, bound.kwargs

# Set by AsyncParameterServerStrategy when it connects this process to a
# cluster (``tf.config.experimental_connect_to_cluster``): TF then renames this
# process's devices from ``/job:localhost`` to the chief's job, and cannot undo
# it. Variables and datasets made before live on devices that no longer exist.
_LOCAL_JOB = "/job:localhost/"
_connected = {"job": None}


def note_cluster_connected(job: str) -> None:
    _connected["job"] = job


def stranded_on_localhost(values) -> bool:
    """Whether any of ``values`` (variables, eager datasets) lives on
    ``/job:localhost`` after this process was connected to a cluster."""
    if _connected["job"] is None:
        return False
    for value in values:
        device = ""
        try:
            if isinstance(value, tf.data.Dataset):
                device = value._variant_tensor.device
            else:
                device = raw_variable(value).device
        except (AttributeError, RuntimeError, ValueError):
            continue
        if device and device.startswith(_LOCAL_JOB):
            return True
    return False


def stranded_message(what: str, method: str) -> str:
    job = _connected["job"]
    return (
        f"`{method}`: {what} created before AsyncParameterServerStrategy "
        f"connected this process to its cluster: it lives on /job:localhost, a "
        f"device that no longer exists (TF renames this process's devices to "
        f"{job} when it connects, and cannot disconnect). Create it after the "
        "strategy: a model built and compiled inside `with strategy.scope():` "
        "trains on the cluster; a plain Keras model (and its datasets) created "
        "after the strategy, outside its scope, trains normally in this process. "
        "Or run it in another process."
    )


def check_not_stranded(model, method: str, args, kwargs) -> None:
    """ValueError (at the call) if ``model``'s variables, or a dataset passed
    as ``x``/``validation_data``, predate this process's cluster connection."""
    if _connected["job"] is None:
        return
    if stranded_on_localhost(model.variables):
        raise ValueError(stranded_message("this model's variables were", method))
    data = list(args[:1]) + [kwargs.get("x"), kwargs.get("validation_data")]
    if stranded_on_localhost([d for d in data if isinstance(d, tf.data.Dataset)]):
        raise ValueError(stranded_message("this tf.data.Dataset was", method))


def _tf_backend_variable_class():
    from keras.src.backend.tensorflow.core import Variable

    return Variable


def _atomic_update(self, value, negate: bool):
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    original = _ORIGINAL_ASSIGN_SUB if negate else _ORIGINAL_ASSIGN_ADD
    if in_stateless_scope() or self._value is None:
        return original(self, value)
    value = self._convert_to_tensor(value, dtype=self._dtype)
    if not value.shape.is_compatible_with(tf.TensorShape(self.shape)):
        return original(self, value)  # raises Keras' shape-mismatch error
    value = tf.cast(value, self._value.dtype)
    if negate:
        return self._value.assign_sub(value)
    return self._value.assign_add(value)


_ORIGINAL_ASSIGN_ADD = None
_ORIGINAL_ASSIGN_SUB = None


def install_atomic_assign_add() -> None:
    """Makes Keras (TF backend) ``Variable.assign_add/assign_sub`` atomic. Idempotent."""
    global _ORIGINAL_ASSIGN_ADD, _ORIGINAL_ASSIGN_SUB
    variable_class = _tf_backend_variable_class()
    if getattr(variable_class.assign_add, "_tf_async_atomic", False):
        return
    _ORIGINAL_ASSIGN_ADD = variable_class.assign_add
    _ORIGINAL_ASSIGN_SUB = variable_class.assign_sub

    def assign_add(self, value):
        return _atomic_update(self, value, negate=False)

    def assign_sub(self, value):
        return _atomic_update(self, value, negate=True)

    assign_add._tf_async_atomic = True
    assign_sub._tf_async_atomic = True
    variable_class.assign_add = assign_add
    variable_class.assign_sub = assign_sub


def default_strategy() -> tf.distribute.Strategy:
    """TF's default (no-op) strategy object, even inside another strategy's scope."""
    from tensorflow.python.distribute import distribute_lib

    return distribute_lib._get_default_strategy()


def model_strategy(model):
    """The strategy ``model`` was created under (``None`` if none)."""
    return model._distribute_strategy


def set_model_strategy(model, strategy) -> None:
    model._distribute_strategy = strategy


def loss_tracker(model):
    return model._loss_tracker


def compute_loss(model, x, y, y_pred, sample_weight):
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )


def compile_metrics(model):
    return model._compile_metrics


def call_has_training_arg(model) -> bool:
    return model._call_has_training_arg


def initial_epoch(model, initial_epoch: int) -> int:
    """Keras' ``fit`` resumes at ``model._initial_epoch`` (set by BackupAndRestore)."""
    return model._initial_epoch or initial_epoch


def should_eval(model, epoch: int, validation_freq) -> bool:
    return model._should_eval(epoch, validation_freq)


def metrics_result_or_logs(model, logs):
    return model._get_metrics_result_or_logs(logs)


def flatten_metrics_in_order(model, logs):
    """Keras' ``evaluate`` return value without ``return_dict``: ``logs`` as a
    list in metric order (a scalar for one metric)."""
    return model._flatten_metrics_in_order(logs)


def per_worker_iterator(remote_values):
    """Wraps one iterator ``RemoteValue`` per worker (worker order) for ``schedule``."""
    from tensorflow.python.distribute.coordinator import values as coordinator_values

    return coordinator_values.PerWorkerDistributedIterator(tuple(remote_values))


def per_worker_remote_values(per_worker_value):
    """The per-worker ``RemoteValue``s inside a ``PerWorkerValues`` (worker order)."""
    return tuple(per_worker_value._values)


def is_distributed_data(x) -> bool:
    """Whether ``x`` is ``tf.distribute`` distributed data: a distributed
    dataset/iterator, or ``ClusterCoordinator.create_per_worker_dataset``'s
    per-worker dataset (``PerWorkerDatasetFromDatasetFunction``) or values."""
    from tensorflow.python.distribute.coordinator import values as coordinator_values

    return isinstance(x, (
        tf.distribute.DistributedDataset,
        tf.distribute.DistributedIterator,
        coordinator_values.PerWorkerDatasetFromDatasetFunction,
        coordinator_values.PerWorkerValues,
    ))


def symbolic_build(model, data_batch) -> None:
    """Builds model, compiled metrics/loss and optimizer from a batch structure
    (tensors or ``tf.TensorSpec``s), like Keras' ``fit`` does before training."""
    model._symbolic_build(data_batch=data_batch)


def assert_compile_called(model, method_name: str) -> None:
    model._assert_compile_called(method_name)


def run_in_single_replica_context(strategy, fn, *args):
    """Calls ``fn(*args)`` in ``strategy``'s replica 0, on the calling thread.

    ``strategy.run`` of ParameterServerStrategy traces the replica function on a
    separate replica thread (``mirrored_run``) and runs ``merge_call``s (Keras'
    optimizer update) back on the caller's thread, where a thread-local
    ``staleness.publish`` context would be invisible. With one replica per
    worker nothing needs merging across threads, so the step runs like
    ``OneDeviceStrategy`` does it: a ``ReplicaContext`` entered on this thread
    (its ``merge_call`` runs the merge function inline).
    """
    if strategy.num_replicas_in_sync != 1:
        raise ValueError(
            "AsyncParameterServerStrategy supports one replica (device) per worker; "
            f"this cluster has {strategy.num_replicas_in_sync} per worker."
        )
    with strategy.scope():
        with _SingleReplicaContext(
            strategy, replica_id_in_sync_group=tf.constant(0, tf.int32)
        ):
            return fn(*args)


class _SingleReplicaContext(tf.distribute.ReplicaContext):
    """Replica context of a one-replica step: all-reduce is the identity."""

    def all_reduce(self, reduce_op, value, options=None):
        del reduce_op, options  # SUM and MEAN over one replica are the value.
        return value


_update_guards = _threading.local()


@_contextlib.contextmanager
def guarded_updates(guard):
    """Inside (this thread): each ``strategy.extended.update(var, fn, ...)`` of
    a strategy set up by :func:`install_update_guard` runs as
    ``guard(var, run)`` where ``run()`` does the update; ``guard`` returns
    ``NotImplemented`` to leave an update as it is."""
    stack = getattr(_update_guards, "stack", None)
    if stack is None:
        stack = _update_guards.stack = []
    stack.append(guard)
    try:
        yield
    finally:
        stack.pop()


def install_update_guard(strategy) -> None:
    """Routes ``strategy.extended._update`` (each optimizer variable update:
    Keras' ``_distributed_tf_update_step`` calls ``extended.update(var, fn)``
    per variable) through the active :func:`guarded_updates` guard. Once per
    strategy instance."""
    extended = strategy.extended
    if getattr(extended._update, "_tf_async_guarded", False):
        return
    original = extended._update

    def _update(var, fn, args, kwargs, group):
        stack = getattr(_update_guards, "stack", None)
        if stack:
            result = stack[-1](var, lambda: original(var, fn, args, kwargs, group))
            if result is not NotImplemented:
                return result
        return original(var, fn, args, kwargs, group)

    _update._tf_async_guarded = True
    extended._update = _update


def allow_sharded_variable_updates(strategy) -> None:
    """Lets Keras 3 optimizers update ``ShardedVariable``s under ``strategy``.

    Keras' TF optimizer creates slots colocated with their variable and updates
    each variable with
    ``strategy.extended.update(var, fn)``; ParameterServerStrategy's
    ``_update`` colocates with ``var``, which a ``ShardedVariable`` (made by
    ``variable_partitioner``) refuses. ``ShardedVariable`` already splits
    ``assign``/``assign_add``/``assign_sub`` across its shards, each on its own
    parameter server, so ``fn`` runs without the colocation.
    """
    from tensorflow.python.distribute import distribute_lib
    from tensorflow.python.distribute import sharded_variable

    extended = strategy.extended
    original = extended._update

    def _update(var, fn, args, kwargs, group):
        if isinstance(var, sharded_variable.ShardedVariable):
            with distribute_lib.UpdateContext(var.variables[0].device):
                return fn(var, *args, **kwargs)
        return original(var, fn, args, kwargs, group)

    extended._update = _update

    # Keras creates optimizer slots in ``colocate_vars_with(variable)``; for a
    # ShardedVariable that would put the slot on the coordinator. Without the
    # colocation the slot goes through the partitioner like its variable, so
    # it is sharded across the parameter servers too; its shards land beside
    # the variable's when the strategy's round robin starts at the server of
    # the variable's first shard (same shape, same split, same order).
    import contextlib

    original_colocate = extended.colocate_vars_with

    @contextlib.contextmanager
    def round_robin_from(variable):
        count = getattr(extended, "_variable_count", None)
        task = tf.DeviceSpec.from_string(variable.variables[0].device).task
        num_ps = getattr(extended, "_num_ps", None)
        if count is None or task is None or not num_ps:
            yield
            return
        start = count + (task - count) % num_ps
        extended._variable_count = start
        try:
            yield
        finally:  # the round robin goes on as if not moved
            extended._variable_count = count + (extended._variable_count - start)

    def colocate_vars_with(colocate_with_variable):
        if isinstance(colocate_with_variable, sharded_variable.ShardedVariable):
            return round_robin_from(colocate_with_variable)
        return original_colocate(colocate_with_variable)

    extended.colocate_vars_with = colocate_vars_with
    cls = sharded_variable.ShardedVariable
    if not hasattr(cls, "__array__"):  # Keras' save_weights/get_weights need it

        def __array__(self, dtype=None, copy=None):
            del copy
            import numpy as np

            return np.asarray(tf.convert_to_tensor(self).numpy(), dtype=dtype)

        cls.__array__ = __array__
    if not hasattr(cls, "numpy"):
        cls.numpy = lambda self: tf.convert_to_tensor(self).numpy()


def outside_strategy_scopes():
    """Context manager: the calling thread temporarily leaves every entered
    ``strategy.scope()`` (TF's per-thread strategy stack), restoring it after.

    Used to run Keras' own ``evaluate``/``predict`` on the coordinator under
    the default strategy even when called inside the async strategy's scope
    (TF forbids nesting another strategy's scope there).
    """
    import contextlib

    from tensorflow.python.distribute import distribute_lib

    @contextlib.contextmanager
    def scope():
        saved = []
        while distribute_lib.has_strategy():
            saved.append(distribute_lib._get_per_thread_mode())
            distribute_lib._pop_per_thread_mode()
        try:
            yield
        finally:
            for mode in reversed(saved):
                distribute_lib._push_per_thread_mode(mode)

    return scope()


# ---- embedding tables seams (Keras 3.15) ----
# Used by tf_async/_rows.py and tf_async/strategies/_ps_train_step.py; pinned
# by the "embedding tables seams" tests in tests/test_keras_seams.py.
#
# * ``keras.layers.Embedding.call(inputs)`` (keras/src/layers/core/
#   embedding.py): ids not int32/int64 are cast to int32, then
#   ``ops.take(self.embeddings, ids, axis=0)`` (negative ids count from the
#   end), cast to ``compute_dtype``. ``ops.take`` converts the whole table to
#   a tensor first: a table on a parameter server travels whole to the caller.
#   ``install_embedding_lookup`` wraps ``Embedding.call`` once (class
#   attribute); while an ``embedding_lookup(handler)`` context is active on
#   this thread the handler decides each call (``NotImplemented``: Keras' own
#   call), otherwise ``default_handler`` does (tables on a parameter server:
#   rows gathered where they live).
# * ``layer.embeddings`` is the table itself (``layer._embeddings``) only
#   without LoRA and quantization (public ``lora_enabled`` /
#   ``quantization_mode``); ``plain_embedding_table`` returns it then.
# * ``keras.Variable.value`` asks the active ``StatelessScope`` for the
#   variable's value with ``scope.get_current_value(variable)`` (keras/src/
#   backend/common/variables.py): every read of a Keras variable inside the
#   scope goes through that call. ``VariableReadScope`` reports those reads.
# * Row-sparse optimizer updates (keras_optimizers/row_sparse.py, lazy.py):
#   ``TFOptimizer.apply`` calls ``self.update_step(gradient, variable, lr)``
#   per variable with an ``IndexedSlices`` gradient as given and the backing
#   ``tf.Variable`` (so an instance attribute ``update_step`` takes over);
#   Keras' slot lists ``Adam._momentums/_velocities/_velocity_hats``,
#   ``Adagrad._accumulators`` and ``SGD.momentums`` are indexed by
#   ``optimizer._get_variable_index(variable)``.
# * ``ShardedVariable.variables`` (TF) are the shards (``variable_shards``);
#   ``tf.nn.embedding_lookup`` dispatches per shard on it.

_embedding_local = _threading.local()


def _embedding_handlers() -> list:
    handlers = getattr(_embedding_local, "handlers", None)
    if handlers is None:
        handlers = _embedding_local.handlers = []
    return handlers


def plain_embedding_table(layer):
    """The table ``Embedding.call`` looks ids up in (a Keras variable), or
    ``None`` for a LoRA/quantized layer (whose lookup reads more than rows)."""
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return None
    return layer.embeddings


def keras_embedding_call(layer, inputs):
    """Keras' own ``Embedding.call`` (not the wrapped one)."""
    return _ORIGINAL_EMBEDDING_CALL(layer, inputs)


_ORIGINAL_EMBEDDING_CALL = None
default_embedding_handler = None  # set by tf_async._rows (rows of PS tables)


def install_embedding_lookup() -> None:
    """Routes ``keras.layers.Embedding.call`` through the active handler. Idempotent."""
    global _ORIGINAL_EMBEDDING_CALL
    cls = keras.layers.Embedding
    original = cls.__dict__["call"]
    if getattr(original, "_tf_async_rows", False):
        return
    _ORIGINAL_EMBEDDING_CALL = original

    @_functools.wraps(original)
    def call(self, inputs):
        handlers = _embedding_handlers()
        handler = handlers[-1] if handlers else default_embedding_handler
        if handler is not None:
            outputs = handler(self, inputs)
            if outputs is not NotImplemented:
                return outputs
        return original(self, inputs)

    call._tf_async_rows = True
    cls.call = call


@_contextlib.contextmanager
def embedding_lookup(handler):
    """Inside: ``Embedding.call`` asks ``handler(layer, inputs)`` first (this thread)."""
    install_embedding_lookup()
    handlers = _embedding_handlers()
    handlers.append(handler)
    try:
        yield
    finally:
        handlers.pop()


class VariableReadScope(keras.StatelessScope):
    """A ``StatelessScope`` that calls ``on_read(variable)`` for every read of
    a Keras variable inside it (``on_read`` may raise)."""

    def __init__(self, state_mapping=None, on_read=None):
        super().__init__(state_mapping=state_mapping)
        self._on_read = on_read

    def get_current_value(self, variable):
        if self._on_read is not None:
            self._on_read(variable)
        return super().get_current_value(variable)


def stateless_value(variable):
    """The value the active ``StatelessScope`` maps ``variable`` to, or ``None``."""
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    scope = get_stateless_scope()
    if scope is None:
        return None
    return keras.StatelessScope.get_current_value(scope, variable)


# ---- partitioned initial values seams (Keras 3.15) ----
# Used by tf_async/_partitioned_init.py and AsyncParameterServerStrategy with a
# ``variable_partitioner``; pinned by the "partitioned initial values seams"
# tests in tests/test_keras_seams.py.
#
# * The TF backend ``Variable._initialize_with_initializer(initializer)``
#   (keras/src/backend/tensorflow/core.py) is how a Keras variable with a
#   callable initializer is made (``KerasVariable.__init__``, also deferred):
#   it calls ``self._initialize(lambda: initializer(self._shape,
#   dtype=self._dtype))``, i.e. ``tf.Variable(callable, dtype=...)`` without
#   ``shape=``. TF's ``ParameterServerStrategy`` then calls the callable for
#   the whole value on the coordinator and slices it per shard.
#   ``install_partitioned_initial_values`` wraps that method once: under a
#   strategy marked ``_tf_async_partitioned_init``, the callable is
#   ``_partitioned_init.initial_value(...)`` (takes ``partition_shape`` /
#   ``partition_offset``) and a variable creator adds ``shape=`` for it, so
#   each shard's value is made on its parameter server. Elsewhere: Keras' own.
# * ``compute_fans`` (keras/src/initializers/random_initializers.py): the fans
#   ``VarianceScaling`` scales by (``initializer_fans``).


def initializer_fans(shape, input_axes=None, output_axes=None):
    """Keras' ``(fan_in, fan_out)`` of ``shape`` (``VarianceScaling``'s)."""
    from keras.src.initializers.random_initializers import compute_fans

    return compute_fans(shape, input_axes=input_axes, output_axes=output_axes)


def install_partitioned_initial_values() -> None:
    """Lets TF's ``ParameterServerStrategy`` make Keras variables shard by
    shard (see the section comment). Idempotent."""
    from tf_async import _partitioned_init

    variable_class = _tf_backend_variable_class()
    original = variable_class._initialize_with_initializer
    if getattr(original, "_tf_async_partitioned", False):
        return

    @_functools.wraps(original)
    def _initialize_with_initializer(self, initializer):
        strategy = tf.distribute.get_strategy()
        if not getattr(strategy, "_tf_async_partitioned_init", False):
            return original(self, initializer)
        value = _partitioned_init.initial_value(initializer, self._shape, self._dtype)

        def add_shape(next_creator, **kwargs):
            if kwargs.get("initial_value") is value and kwargs.get("shape") is None:
                kwargs["shape"] = value.shape
            return next_creator(**kwargs)

        with tf.variable_creator_scope(add_shape):
            self._initialize(value)

    _initialize_with_initializer._tf_async_partitioned = True
    variable_class._initialize_with_initializer = _initialize_with_initializer
