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
