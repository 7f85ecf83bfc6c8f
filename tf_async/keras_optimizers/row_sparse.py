"""Row-sparse updates of stock Keras optimizers on embedding tables.

Keras 3 optimizers given a table's ``tf.IndexedSlices`` gradient densify as
soon as the gradient meets a dense slot (keras-team/keras#19992). For the
optimizers whose untouched rows do not change, the asynchronous
parameter-server step applies the same update on the touched rows only,
**equal to Keras' dense result** (the dense gradient sums duplicate ids, so
the rows here do too)::

    SGD() (momentum 0):  w[r] ← w[r] − lr·g[r]
    Adagrad:             a[r] ← a[r] + g[r]²;  w[r] ← w[r] − lr·g[r] / sqrt(a[r] + ε)

(Keras' own ``IndexedSlices`` path differs for Adagrad with repeated ids: it
squares each occurrence before the duplicates are summed.) Weight decay,
clipping, loss scaling, constraints and ``iterations`` stay Keras'.

Optimizers that move every row of a table each step (Adam, AdamW,
SGD with momentum, RMSprop, ...) keep Keras' dense semantics; the first trace
of the step says once, in one line, what that costs per step and which lazy
optimizer updates only the touched rows.

Used from one place: the async parameter-server step wraps its
``optimizer.apply`` in :func:`updates`.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Callable, Iterator, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from tf_async import _keras_fit
from tf_async.keras_optimizers import _sparse_rows

__all__ = ["updates", "updates_only_touched_rows"]


def _sgd_rows(optimizer, gradient, variable, learning_rate) -> None:
    """Keras SGD (momentum 0) on the touched rows."""
    ids, rows = _sparse_rows.unique_rows(gradient, variable.dtype)
    lr = tf.cast(learning_rate, variable.dtype)
    _sparse_rows.scatter_sub(variable, ids, rows * lr)


def _adagrad_rows(optimizer, gradient, variable, learning_rate) -> None:
    """Keras Adagrad on the touched rows (same arithmetic, same order)."""
    ids, rows = _sparse_rows.unique_rows(gradient, variable.dtype)
    lr = tf.cast(learning_rate, variable.dtype)
    accumulator = optimizer._accumulators[optimizer._get_variable_index(variable)]
    if _sparse_rows.is_exclusive():
        # Holding the table's lock: read, update and write each shard's rows
        # of the table and its accumulator on the shard's PS, in one place.
        for (table, slot), local, part, device in _sparse_rows.rows_by_shard(
            [variable, accumulator], ids, rows
        ):
            with tf.device(device):
                accumulated = _sparse_rows.gather(slot, local) + tf.square(part)
                _sparse_rows.scatter_update(slot, local, accumulated)
                _sparse_rows.scatter_update(
                    table, local, _sparse_rows.gather(table, local)
                    - (lr * part) / tf.sqrt(accumulated + optimizer.epsilon))
        return
    _sparse_rows.scatter_add(accumulator, ids, tf.square(rows))
    accumulated = _sparse_rows.gather(accumulator, ids)
    _sparse_rows.scatter_sub(
        variable, ids, (lr * rows) / tf.sqrt(accumulated + optimizer.epsilon)
    )


# (Keras class, condition, row update): the class's own update_step must be
# the one in use (a subclass that overrides it is not recognised).
_STOCK: Sequence = (
    (keras.optimizers.SGD, lambda o: o.momentum == 0, _sgd_rows),
    (keras.optimizers.Adagrad, lambda o: True, _adagrad_rows),
)


def _stock_row_update(optimizer) -> Optional[Callable]:
    for cls, condition, update in _STOCK:
        if (
            isinstance(optimizer, cls)
            and type(optimizer).update_step is cls.update_step
            and condition(optimizer)
        ):
            return update
    return None


def _decays(optimizer, variable) -> bool:
    return optimizer.weight_decay is not None and _keras_fit.uses_weight_decay(
        optimizer, variable
    )


def updates_only_touched_rows(optimizer, variable=None) -> bool:
    """True if ``optimizer`` leaves the rows of a table not in the batch unchanged.

    tf_async's optimizers say so themselves (``updates_only_touched_rows``);
    ``StalenessScaled`` asks its inner optimizer; stock Keras ``SGD()`` and
    ``Adagrad`` qualify unless their (dense) weight decay applies to
    ``variable``.
    """
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        return updates_only_touched_rows(inner, variable)
    own = getattr(optimizer, "updates_only_touched_rows", None)
    if isinstance(own, bool):
        return own
    if _stock_row_update(optimizer) is None:
        return False
    return variable is None or not _decays(optimizer, variable)


def _optimizers(optimizer) -> list:
    chain = [optimizer]
    while getattr(chain[-1], "inner_optimizer", None) is not None:
        chain.append(chain[-1].inner_optimizer)
    return chain


_NOTIFIED = weakref.WeakSet()

_LAZY_NAMES = (
    ("DCAdam", "DCAdam(lazy=True)"),
    ("DCSGD", "DCSGD(lazy=True)"),
    ("AdamW", "LazyAdamW"),
    ("Adam", "LazyAdam"),
    ("SGD", "LazySGD"),
)


def _lazy_suggestion(optimizer) -> str:
    names = [cls.__name__ for cls in type(optimizer).__mro__]
    for base, lazy in _LAZY_NAMES:
        if base in names:
            return f"tf_async.keras_optimizers.{lazy}"
    return "a row-sparse optimizer (tf_async LazyAdam / LazySGD, SGD(), Adagrad)"


def _slot_count(optimizer, variable) -> int:
    prefix = variable.path.replace("/", "_") + "_"
    return sum(
        1
        for v in optimizer.variables
        if v.name.startswith(prefix) and tuple(v.shape) == tuple(variable.shape)
    )


def dense_table_notice(optimizer, tables) -> Optional[str]:
    """The one-line cost notice for ``tables`` updated densely, or None."""
    if not tables:
        return None
    base = _optimizers(optimizer)[-1]
    parts, total = [], 0
    for variable in tables:
        rows = int(variable.shape[0])
        width = int(np.prod(variable.shape[1:])) if len(variable.shape) > 1 else 1
        size = tf.as_dtype(variable.dtype).size
        arrays = 1 + _slot_count(base, variable)
        total += rows * width * size * arrays
        parts.append(
            f"'{variable.path}' ({rows} rows x {width} x {size} B x {arrays} arrays)"
        )
    return (
        f"tf_async: {type(base).__name__} updates every row of embedding table(s) "
        f"{', '.join(parts)} each step (Keras' dense semantics): "
        f"{total / 2**20:.1f} MiB read and written per step on the parameter "
        f"servers; for updates of only the looked-up rows use "
        f"{_lazy_suggestion(base)} (LazyAdam semantics: untouched rows' state does "
        "not advance)."
    )


def _notice_once(optimizer, gradients, variables) -> None:
    try:
        if optimizer in _NOTIFIED:
            return
    except TypeError:  # not weak-referenceable: say it every trace
        pass
    tables = [
        v for g, v in zip(gradients, variables)
        if _sparse_rows.is_rows(g) and not updates_only_touched_rows(optimizer, v)
    ]
    message = dense_table_notice(optimizer, tables)
    if message is None:
        return
    try:
        _NOTIFIED.add(optimizer)
    except TypeError:
        pass
    warnings.warn(message, UserWarning, stacklevel=4)


@contextlib.contextmanager
def updates(optimizer, gradients, variables) -> Iterator[None]:
    """Around ``optimizer.apply(gradients, variables)`` in a step being traced.

    Stock Keras optimizers whose untouched rows do not change (``SGD()``,
    ``Adagrad``, also inside ``StalenessScaled``) apply a table's
    ``IndexedSlices`` gradient to its rows only (equal to Keras' dense
    update); for a table an optimizer updates densely, the first call says
    once what that costs and which lazy optimizer to use instead.

    The row update replaces the instance's ``update_step`` only while the
    enclosed apply is traced (seam: ``TFOptimizer`` calls
    ``self.update_step(gradient, variable, learning_rate)`` per variable,
    see tf_async/_keras_fit.py "optimizers seams").
    """
    gradients, variables = list(gradients), list(variables)
    _notice_once(optimizer, gradients, variables)
    patched = []
    for candidate in _optimizers(optimizer):
        row_update = _stock_row_update(candidate)
        if row_update is None or "update_step" in vars(candidate):
            continue
        keras_update = candidate.update_step

        def update_step(gradient, variable, learning_rate,
                        _optimizer=candidate, _rows=row_update, _keras=keras_update):
            if _sparse_rows.is_rows(gradient):
                return _rows(_optimizer, gradient, variable, learning_rate)
            return _keras(gradient, variable, learning_rate)

        vars(candidate)["update_step"] = update_step
        patched.append(candidate)
    try:
        yield
    finally:
        for candidate in patched:
            vars(candidate).pop("update_step", None)
