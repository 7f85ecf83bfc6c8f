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
#   optimizer's ``apply_gradients`` and ``apply`` on the instance (removed
#   afterwards), so the live weights are back before any optimizer code.

DISTRIBUTED_UPDATE_STEP_METHOD = "_distributed_tf_update_step"
TRAIN_STEP_NAME = "train_step"
APPLY_GRADIENTS_NAME = "apply_gradients"
# Wrapped by the simulator (a custom train_step may call either).
OPTIMIZER_APPLY_NAMES = (APPLY_GRADIENTS_NAME, "apply")


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
