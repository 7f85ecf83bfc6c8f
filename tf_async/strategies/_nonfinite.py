"""The non-finite guard: a step whose gradients or loss hold NaN/Inf is not applied.

One NaN gradient applied to shared weights poisons every worker's next read,
so the async strategies check each step where its update is applied (on the
parameter server in the fully asynchronous PS step, next to the ticket; in the
simulator inside the optimizer's apply) and either skip it
(``on_nonfinite="skip"``, counted exactly as ``nonfinite_skipped``) or stop
``fit`` (``"raise"``) with :class:`NonFiniteStepError` naming the step and the
worker. A skipped step changes nothing: no weight, optimizer state,
``optimizer.iterations``, version, τ statistic, non-trainable (BatchNorm)
update or metric contribution — as if its batch never existed.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import tensorflow as tf

ON_NONFINITE = ("skip", "raise")

# The marker inside the TF assertion message that ``from_tf_error`` parses.
_MARKER = "tf_async non-finite step"
_PATTERN = re.compile(re.escape(_MARKER) + r".*?\[(-?\d+)\].*?\[(-?\d+)\]", re.S)


class NonFiniteStepError(FloatingPointError):
    """``on_nonfinite="raise"``: a step's gradients or loss were NaN/Inf.

    Attributes: ``step`` (the step's index in the fit: the scheduled-step id
    under the PS strategy, the simulated step under the simulator) and
    ``worker`` (the worker that computed it).
    """

    def __init__(self, step: int, worker: int, where: str):
        self.step, self.worker = step, worker
        super().__init__(
            f"on_nonfinite='raise': step {step} (worker {worker}{where}) has NaN or "
            "Inf gradients or loss; it was not applied, and fit stopped. Pass "
            "on_nonfinite='skip' to skip such steps (counted as `nonfinite_skipped`)."
        )


def check_on_nonfinite(value) -> str:
    if value not in ON_NONFINITE:
        raise ValueError(
            f"`on_nonfinite` must be one of {ON_NONFINITE}, got {value!r}."
        )
    return value


def _float_values(tensors: Iterable) -> list:
    out = []
    for tensor in tensors:
        if isinstance(tensor, tf.IndexedSlices):  # Embedding: check the rows sent
            tensor = tensor.values
        if tensor is not None and tensor.dtype.is_floating:
            out.append(tensor)
    return out


def all_finite(tensors: Iterable) -> tf.Tensor:
    """Scalar bool: every float tensor (``IndexedSlices``: its values) is finite."""
    checks = [tf.reduce_all(tf.math.is_finite(t)) for t in _float_values(tensors)]
    if not checks:
        return tf.constant(True)
    return tf.reduce_all(tf.stack(checks))


def fold_loss_into(gradients: list, loss) -> list:
    """Gradients whose first float tensor also carries the loss's finiteness.

    ``g + 0·loss`` is exactly ``g`` for a finite loss and NaN for a NaN/Inf one,
    so a step whose loss is non-finite fails the check on the PS without the
    loss travelling there on its own (one elementwise op, no extra transfer).
    """
    gradients = list(gradients)
    for i, gradient in enumerate(gradients):
        values = gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient
        if values is None or not values.dtype.is_floating:
            continue
        values = values + tf.zeros([], values.dtype) * tf.cast(loss, values.dtype)
        if isinstance(gradient, tf.IndexedSlices):
            values = tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
        gradients[i] = values
        break
    return gradients


def assert_finite(finite, step, worker) -> tf.Operation:
    """The ``"raise"`` check: fails the step (and fit) naming step and worker."""
    return tf.debugging.Assert(
        finite,
        [tf.constant(_MARKER), tf.cast(step, tf.int64), tf.cast(worker, tf.int64)],
        name="tf_async_nonfinite_check",
    )


def from_tf_error(error: BaseException, where: str = "") -> Optional[NonFiniteStepError]:
    """The :class:`NonFiniteStepError` an ``assert_finite`` failure stands for."""
    match = _PATTERN.search(str(getattr(error, "message", error)))
    if match is None:
        return None
    return NonFiniteStepError(int(match.group(1)), int(match.group(2)), where)
