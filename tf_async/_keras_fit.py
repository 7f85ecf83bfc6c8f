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
