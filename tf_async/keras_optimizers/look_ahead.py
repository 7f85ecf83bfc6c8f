"""DANA-style look-ahead: the gradient is computed where the weights will be.

Hakimi, Barkai, Gabel, Schuster, "Taming Momentum in a Distributed
Asynchronous Environment" (DANA, arXiv 1907.11612): a worker's gradient is
applied after the other workers' pending updates, so the master sends it a
*prediction* of the weights at apply time (a Nesterov-style look-ahead) and the
gradient is computed there. DANA keeps one momentum buffer per worker and
predicts θ̂ = θ − ηγ·Σ_j v^j (every pending worker's next momentum step).
These optimizers keep Keras' single buffer and predict each of the ``h``
pending updates as one momentum step of that buffer (``h`` = the expected
staleness, supplied by the strategy)::

    DanaSGD    (Keras SGD, m ← μm − lr·g, w ← w + m):
        ŵ = w + h·μ·m
    DanaAdam   (Keras Adam / AdamW, step lr_t·m/(√v+ε), lr_t = lr·√(1−β2^t)/(1−β1^t),
                t = applies so far; optimizer-aware prediction as in FTPipe /
                PipeOptim):
        ŵ = w − h·lr_t·m/(√v + ε)             (ŵ = w while t = 0)

The update itself is Keras' (``update_step`` is not overridden), so without a
strategy that asks for predictions — and with ``h = 0`` — both equal
``keras.optimizers.SGD`` / ``Adam`` / ``AdamW`` bit for bit.

Protocol (``tf_async.staleness.predicted_reads``): a strategy that reads the
weights for a stale step calls ``optimizer.predict_weights(variable, value,
horizon, ids=None)`` with the value it read (the rows ``ids`` of a table read
row by row) and computes the gradient at the returned prediction; that
prediction is the step's ``w_read`` for compensating optimizers.
"""

from __future__ import annotations

from typing import Any, Optional

import keras
import tensorflow as tf

from tf_async.keras_optimizers import _sparse_rows
from tf_async.keras_optimizers._arguments import check_learning_rate

__all__ = ["DanaSGD", "DanaAdam"]


def _slot(optimizer, slots, variable, ids):
    slot = slots[optimizer._get_variable_index(variable)]
    if ids is None:
        return tf.convert_to_tensor(slot)
    return _sparse_rows.gather(slot, ids)


@keras.saving.register_keras_serializable(package="tf_async")
class DanaSGD(keras.optimizers.SGD):
    """Keras SGD (momentum, Nesterov) whose stale gradients are computed at the
    DANA look-ahead ŵ = w + h·μ·m (see the module docstring).

    Args: as ``keras.optimizers.SGD``; ``momentum`` defaults to 0.9 (with
    momentum 0 there is nothing to predict: ŵ = w).
    """

    predicts_weights = True

    def __init__(self, learning_rate: Any = 0.01, momentum: float = 0.9,
                 nesterov: bool = False, name: Optional[str] = None, **kwargs):
        learning_rate = check_learning_rate(learning_rate)
        if isinstance(momentum, int) and not isinstance(momentum, bool):
            momentum = float(momentum)
        super().__init__(learning_rate=learning_rate, momentum=momentum,
                         nesterov=nesterov, name=name, **kwargs)

    def predict_weights(self, variable, value, horizon, ids=None):
        """ŵ = value + h·μ·m (rows ``ids`` of m for a table read by rows)."""
        if self.momentum == 0 or not self.momentums:
            return value
        dtype = value.dtype
        m = _slot(self, self.momentums, variable, ids)
        return value + tf.cast(horizon, dtype) * tf.cast(self.momentum, dtype) * m


@keras.saving.register_keras_serializable(package="tf_async")
class DanaAdam(keras.optimizers.Adam):
    """Keras Adam (``weight_decay=None``) or AdamW whose stale gradients are
    computed at the look-ahead ŵ = w − h·lr_t·m/(√v+ε) (module docstring).

    Args: as ``keras.optimizers.Adam``; ``weight_decay`` (default None:
    Adam) as ``keras.optimizers.AdamW``.
    """

    predicts_weights = True

    def __init__(self, learning_rate: Any = 0.001, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7, amsgrad: bool = False,
                 weight_decay: Optional[float] = None, name: Optional[str] = None,
                 **kwargs):
        learning_rate = check_learning_rate(learning_rate)
        # Keras' AdamW is Adam with a default weight_decay (decoupled decay
        # lives in the base optimizer), so weight_decay= makes this AdamW.
        super().__init__(
            learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
            epsilon=epsilon, amsgrad=amsgrad, weight_decay=weight_decay,
            name=name, **kwargs)

    def predict_weights(self, variable, value, horizon, ids=None):
        """ŵ = value − h·lr_t·m/(√v + ε), t = applies so far (ŵ = value at t = 0)."""
        if not self._momentums:
            return value
        dtype = value.dtype
        t = tf.cast(self.iterations, dtype)
        lr = tf.cast(self.learning_rate, dtype)
        b1, b2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        alpha = tf.math.divide_no_nan(lr * tf.sqrt(1 - tf.pow(b2, t)), 1 - tf.pow(b1, t))
        m = _slot(self, self._momentums, variable, ids)
        v = _slot(self, self._velocities, variable, ids)
        if self.amsgrad:
            v = tf.maximum(v, _slot(self, self._velocity_hats, variable, ids))
        step = alpha * m / (tf.sqrt(v) + tf.cast(self.epsilon, dtype))
        return value - tf.cast(horizon, dtype) * step
