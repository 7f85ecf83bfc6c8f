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
#   optimizer's ``apply_gradients`` on the instance (removed afterwards).

DISTRIBUTED_UPDATE_STEP_METHOD = "_distributed_tf_update_step"
TRAIN_STEP_NAME = "train_step"
APPLY_GRADIENTS_NAME = "apply_gradients"


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

SHARDED_ADAM_OVERRIDES = ("_backend_update_step", "_apply_weight_decay")


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
