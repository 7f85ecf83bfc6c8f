"""StepContext: the seam between a strategy that measures staleness and an
optimizer that compensates for it (DESIGN.md §3).

A train step that knows its gradient is stale publishes, around its call to
``optimizer.apply``::

    with tf_async.staleness.publish(tau=tau, variables=model.trainable_variables,
                                    read_values=w_read):
        optimizer.apply(grads, model.trainable_variables)

* ``tau`` — int64 scalar: number of updates other workers applied between this
  step's read of the weights and its apply (``version_at_apply -
  version_at_read``).
* ``read_values`` — per variable, the value the gradient was computed at. For
  an embedding table whose step read only the rows its batch looks up (the
  asynchronous parameter-server step does), a ``tf.IndexedSlices`` of those
  rows: ``values[i]`` is row ``indices[i]`` as read, the indices are unique and
  are the same indices as the table's ``IndexedSlices`` gradient.

Inside ``update_step(gradient, variable, learning_rate)`` an optimizer reads::

    tau = staleness.current_tau()                 # int64 scalar tensor
    w_read = staleness.read_value(variable)       # tensor, variable's dtype
                                                  # (IndexedSlices of rows for a
                                                  # table read row by row)

and, for an optimizer that keeps state per worker (DANA-Zero's momentum
buffers), ``staleness.current_worker()`` — the int64 index of the worker the
step came from (published as ``publish(..., worker=i)``; 0 without one).

With no published context (ordinary synchronous training) ``current_tau()``
is 0 and ``read_value(v)`` is ``v``'s current value, so delay compensation
vanishes and compensating optimizers equal their base optimizers exactly.

The context is a *trace-time* object: it only holds symbolic (or eager)
tensors and is consulted while the step is traced, so it works unchanged
inside ``tf.function``, under ``strategy.run`` and with ``jit_compile=True``;
nothing in it runs Python at step time.

It is kept per thread. Keras applies updates of a multi-replica
``MirroredStrategy`` in a ``merge_call`` on another thread, where no replica's
context would be visible; publishing from such a replica therefore raises
instead of being silently ignored (synchronous all-reduce training has τ = 0
and needs no context).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Mapping, Optional, Sequence

import keras
import tensorflow as tf

from tf_async import _keras_fit

__all__ = [
    "StepContext",
    "publish",
    "current",
    "current_tau",
    "read_value",
    "is_row_read",
    "predicts_weights",
    "predicted_read",
    "current_worker",
    "worker_slots",
    "check_worker_slots",
]


class StepContext:
    """Staleness of the step being traced: ``tau`` and the weights read.

    Args:
      tau: integer scalar tensor (cast to int64), τ ≥ 0.
      read_values: mapping from variable key (see ``_keras_fit.variable_key``)
        to the tensor the gradient was computed at.
    """

    __slots__ = ("tau", "worker", "_read_values")

    def __init__(self, tau: tf.Tensor, read_values: Mapping[int, tf.Tensor],
                 worker: Optional[tf.Tensor] = None):
        self.tau = tau
        self.worker = worker
        self._read_values = dict(read_values)

    def read_value(self, variable) -> tf.Tensor:
        """The value ``variable`` had when the gradient was computed.

        A ``tf.IndexedSlices`` of the rows read for a table whose step read
        only some rows (see :func:`is_row_read`). Falls back to the variable's
        current value if the step did not publish a read value for it (its
        gradient is then treated as fresh).
        """
        value = self._read_values.get(_keras_fit.variable_key(variable))
        if value is None:
            return _current_value(variable)
        return value

    def __contains__(self, variable) -> bool:
        return _keras_fit.variable_key(variable) in self._read_values

    def __repr__(self) -> str:
        return f"StepContext(tau={self.tau!r}, variables={len(self._read_values)})"


_local = threading.local()


def _stack() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _current_value(variable) -> tf.Tensor:
    if isinstance(variable, keras.Variable):
        variable = variable.value  # keras.Variable -> tf.Variable
    return tf.convert_to_tensor(variable)


def _check_publishable() -> None:
    if not tf.distribute.in_cross_replica_context():
        replica_context = tf.distribute.get_replica_context()
        strategy = replica_context.strategy
        if (
            replica_context.num_replicas_in_sync > 1
            and isinstance(strategy, tf.distribute.MirroredStrategy)
        ):
            raise ValueError(
                "tf_async.staleness.publish() was called inside a replica of a "
                f"{type(strategy).__name__} with "
                f"{replica_context.num_replicas_in_sync} replicas. Keras applies "
                "those updates in a merge_call on another thread, where the "
                "context would be lost. Publish staleness only from "
                "single-replica-per-worker strategies (parameter server, "
                "simulated async, one device)."
            )


@contextlib.contextmanager
def publish(
    tau,
    variables: Sequence = (),
    read_values: Sequence = (),
    worker=None,
) -> Iterator[StepContext]:
    """Publishes ``tau`` and the read weights for the enclosed optimizer apply.

    Args:
      tau: integer scalar (tensor or Python int), the step's staleness τ.
      variables: the variables the gradient is for (Keras or tf variables).
      read_values: for each of ``variables``, the value the gradient was
        computed at (same shape), or a ``tf.IndexedSlices`` of the rows read
        (``values`` of shape ``[rows, *variable.shape[1:]]``, unique
        ``indices``) for a table the step read row by row. May be empty: then
        ``read_value`` returns current values.
      worker: integer scalar (tensor or Python int >= 0), the index of the
        worker whose gradient this is, for optimizers that keep per-worker
        state (:func:`worker_slots`); ``None``: worker 0.

    Raises:
      ValueError: if ``variables`` and ``read_values`` differ in length or a
        shape differs, or if called from a replica of a multi-replica
        MirroredStrategy (see module docstring).
    """
    variables = list(variables)
    read_values = list(read_values)
    if read_values and len(read_values) != len(variables):
        raise ValueError(
            "publish(): `read_values` must have one entry per variable; got "
            f"{len(read_values)} values for {len(variables)} variables."
        )
    _check_publishable()
    tau = tf.cast(tau, tf.int64)
    if tau.shape.rank not in (None, 0):
        raise ValueError(f"publish(): `tau` must be a scalar, got shape {tau.shape}.")
    mapping = {}
    for variable, value in zip(variables, read_values):
        if isinstance(value, tf.IndexedSlices):
            _check_rows(variable, value)
            mapping[_keras_fit.variable_key(variable)] = value
            continue
        value = tf.convert_to_tensor(value)
        if value.shape.is_fully_defined() and tuple(value.shape) != tuple(
            variable.shape
        ):
            raise ValueError(
                "publish(): read value for variable "
                f"{getattr(variable, 'path', getattr(variable, 'name', variable))} "
                f"has shape {tuple(value.shape)}, expected {tuple(variable.shape)}."
            )
        mapping[_keras_fit.variable_key(variable)] = value
    if worker is not None:
        if isinstance(worker, bool) or (isinstance(worker, int) and worker < 0):
            raise ValueError(
                f"publish(): `worker` must be an int >= 0 or an integer tensor; got {worker!r}.")
        worker = tf.cast(worker, tf.int64)
        if worker.shape.rank not in (None, 0):
            raise ValueError(
                f"publish(): `worker` must be a scalar, got shape {worker.shape}.")
    context = StepContext(tau, mapping, worker)
    stack = _stack()
    stack.append(context)
    try:
        yield context
    finally:
        stack.pop()


def _check_rows(variable, rows: tf.IndexedSlices) -> None:
    """Rows read of a table: ``values`` ``[n, *variable.shape[1:]]``, 1-D indices."""
    shape = tuple(variable.shape)
    row_shape = rows.values.shape[1:]
    ok = (
        len(shape) >= 1
        and rows.indices.shape.rank in (None, 1)
        and rows.values.shape.rank in (None, len(shape))
        and (rows.values.shape.rank is None or row_shape.is_compatible_with(shape[1:]))
    )
    if not ok:
        raise ValueError(
            "publish(): the rows read of variable "
            f"{getattr(variable, 'path', getattr(variable, 'name', variable))} "
            f"(shape {shape}) must be an IndexedSlices with 1-D indices and values "
            f"of shape [n, {', '.join(map(str, shape[1:]))}]; got values "
            f"{rows.values.shape} and indices {rows.indices.shape}."
        )


def is_row_read(variable) -> bool:
    """True if the step being traced read only some rows of ``variable``
    (its read value is then a ``tf.IndexedSlices``)."""
    context = current()
    return context is not None and isinstance(
        context._read_values.get(_keras_fit.variable_key(variable)), tf.IndexedSlices
    )


def current() -> Optional[StepContext]:
    """The innermost published context of this thread, or ``None``."""
    stack = _stack()
    return stack[-1] if stack else None


def current_tau() -> tf.Tensor:
    """τ of the step being traced as an int64 scalar; 0 without a context."""
    context = current()
    if context is None:
        return tf.constant(0, tf.int64)
    return context.tau


def current_worker() -> tf.Tensor:
    """Index of the worker whose gradient is being applied (int64 scalar);
    0 without a context or when the strategy published no worker."""
    context = current()
    if context is None or context.worker is None:
        return tf.constant(0, tf.int64)
    return context.worker


def read_value(variable) -> tf.Tensor:
    """Weights the current gradient for ``variable`` was computed at.

    Without a context this is the variable's current value.
    """
    context = current()
    if context is None:
        return _current_value(variable)
    return context.read_value(variable)


def predicts_weights(optimizer) -> bool:
    """True if ``optimizer`` supplies a look-ahead of the weights.

    An optimizer opts in with a true ``predicts_weights`` attribute and a
    method ``predict_weights(variable, value, horizon, ids=None)`` that
    returns where ``variable`` will be after ``horizon`` more updates, given
    the ``value`` a step read (the rows ``ids`` of a table read row by row).
    A strategy computes the stale gradient at that prediction and publishes
    it as the step's read value (DANA, see
    ``tf_async.keras_optimizers.look_ahead``).
    """
    return bool(getattr(optimizer, "predicts_weights", False))


def predicted_read(optimizer, variable, value, horizon, ids=None):
    """``optimizer``'s prediction for ``variable`` from the read ``value``
    (``value`` itself if the optimizer predicts nothing or is not built)."""
    if not predicts_weights(optimizer) or not getattr(optimizer, "built", False):
        return value
    return optimizer.predict_weights(variable, value, horizon, ids=ids)


def worker_slots(optimizer) -> Optional[int]:
    """The number of workers ``optimizer`` keeps state for, or ``None``.

    An optimizer that keeps one buffer per worker (DANA-Zero) declares it with
    an int ``worker_slots`` attribute (its ``num_workers``); wrappers
    (``GapAware``, ``StalenessScaled``) forward their inner optimizer's. It
    reads the worker of each step from :func:`current_worker`.
    """
    slots = getattr(optimizer, "worker_slots", None)
    return None if slots is None else int(slots)


def check_worker_slots(optimizer, num_workers: int, strategy_name: str) -> None:
    """ValueError unless an optimizer with per-worker state was built for
    exactly the strategy's ``num_workers`` workers (called at ``fit`` start)."""
    slots = worker_slots(optimizer)
    if slots is not None and slots != num_workers:
        raise ValueError(
            f"{type(optimizer).__name__} keeps momentum for num_workers={slots} "
            f"workers, but the {strategy_name} has {num_workers} workers: create the "
            f"optimizer with num_workers={num_workers}."
        )


def check_max_staleness(max_staleness) -> Optional[int]:
    """A strategy's ``max_staleness`` argument: ``None`` or an int >= 0.

    Raises ``TypeError`` for a non-int and ``ValueError`` for a negative int.
    """
    if max_staleness is None:
        return None
    if isinstance(max_staleness, bool) or not isinstance(max_staleness, int):
        raise TypeError(
            f"`max_staleness` must be None or an int >= 0, got {max_staleness!r}."
        )
    if max_staleness < 0:
        raise ValueError(f"`max_staleness` must be None or an int >= 0, got {max_staleness}.")
    return max_staleness
