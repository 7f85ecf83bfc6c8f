"""Row-sparse building blocks shared by tf_async's optimizers.

A gradient of an embedding table arrives as a ``tf.IndexedSlices``: rows
``indices`` of the table, ``values`` their gradients. In plain Keras the same
id may occur several times (once per lookup); the dense gradient a Keras
optimizer would see is the *sum* over the occurrences
(``tf.convert_to_tensor(IndexedSlices)`` is ``unsorted_segment_sum``). Every
row-sparse update here therefore works on :func:`unique_rows`: each touched
row once, with its summed gradient. Squaring per occurrence instead (what
``ops.square`` on an ``IndexedSlices`` does) would differ from the dense
result.

Reads and writes touch only those rows, on the device(s) holding the variable
(``tf_async._rows.gather``; ``scatter_*`` of a ``tf.Variable`` or a
``ShardedVariable``). Inside :func:`exclusive` (the asynchronous step holds
the table's lock, ``strategies/_table_locks``) row increments are a read,
an add and a write (gather + ``scatter_update``: the same float arithmetic,
several times cheaper than TF's CPU scatter-add kernel on large tables). Nothing here reads a table densely: a resource variable
that has been accessed sparsely is in TF's copy-on-read mode, where every
dense read copies the whole buffer.
"""

from __future__ import annotations

from typing import Tuple

import contextlib
import threading

import tensorflow as tf

from tf_async import _keras_fit, _rows, staleness

_state = threading.local()


@contextlib.contextmanager
def exclusive():
    """Inside (this thread, while ops are created): nobody else updates the
    variables concurrently, so :func:`scatter_add`/:func:`scatter_sub` may
    read, modify and write rows."""
    depth = getattr(_state, "exclusive", 0)
    _state.exclusive = depth + 1
    try:
        yield
    finally:
        _state.exclusive = depth


def is_exclusive() -> bool:
    """True inside :func:`exclusive`."""
    return getattr(_state, "exclusive", 0) > 0


@contextlib.contextmanager
def unique_indices(gradients):
    """Inside (this thread, while ops are created): the ``indices`` of these
    ``IndexedSlices`` gradients are known to be unique (the asynchronous step
    deduplicates a table's ids on the worker), so :func:`unique_rows` and
    :func:`unique_ids` take them as they are instead of running ``tf.unique``
    again on the parameter server. Only these exact tensors are marked: a
    gradient transformed into new indices is deduplicated as usual."""
    outer = getattr(_state, "unique", frozenset())
    _state.unique = outer | {g.indices.ref() for g in gradients if is_rows(g)}
    try:
        yield
    finally:
        _state.unique = outer


def _known_unique(indices) -> bool:
    return indices.ref() in getattr(_state, "unique", frozenset())


def unique_ids(gradient: tf.IndexedSlices) -> tf.Tensor:
    """The distinct ids of a row-sparse gradient, in order of first occurrence."""
    if _known_unique(gradient.indices):
        return gradient.indices
    return tf.unique(gradient.indices)[0]


def is_rows(gradient) -> bool:
    """True for a row-sparse (``tf.IndexedSlices``) gradient."""
    return isinstance(gradient, tf.IndexedSlices)


def unique_rows(gradient: tf.IndexedSlices, dtype=None) -> Tuple[tf.Tensor, tf.Tensor]:
    """``(ids, rows)``: each touched row once, duplicates summed (dense semantics).

    ``ids`` keep the order of first occurrence (so unique input stays as is).
    """
    values = gradient.values
    if dtype is not None:
        values = tf.cast(values, dtype)
    if _known_unique(gradient.indices):
        return gradient.indices, values
    ids, position = tf.unique(gradient.indices)
    rows = tf.math.unsorted_segment_sum(values, position, tf.shape(ids)[0])
    return ids, rows


def gather(variable, ids) -> tf.Tensor:
    """Rows ``ids`` of ``variable`` (a Keras or tf variable), read where they live."""
    return _rows.gather(variable, ids)


def _target(variable):
    return _keras_fit.raw_variable(variable)


def scatter_update(variable, ids, rows):
    """``variable[ids] = rows`` (ids unique)."""
    rows = tf.cast(rows, variable.dtype)
    return _target(variable).scatter_update(tf.IndexedSlices(rows, ids))


def rows_by_shard(variables, ids, rows):
    """``[(shards, local ids, rows, device)]``: the update of rows ``ids`` of
    ``variables`` (a table and its slots, same shape) split by where the rows
    live. For tables split alike over several PS, one entry per shard: that
    shard of every variable, the ids inside it (shard-relative) and their
    rows, and the shard's device -- so a row update placed there reads and
    writes every array on one PS and only the shard's ids and rows travel
    there (as for TF's own sharded ``scatter_*``). Otherwise one entry: the
    whole variables, ``ids``, ``rows``, their device."""
    raw = [_target(v) for v in variables]
    split = [_keras_fit.variable_shards(v) for v in variables]
    if split[0] is None or any(
        s is None or [tuple(x.shape) for x in s] != [tuple(x.shape) for x in split[0]]
        for s in split
    ):
        if any(s is not None for s in split):  # split differently: read where they live
            return [(variables, ids, rows, None)]
        return [(raw, ids, rows, raw[0].device)]
    out, start = [], 0
    for shards in zip(*split):
        stop = start + int(shards[0].shape[0])
        inside = tf.logical_and(ids >= start, ids < stop)
        out.append((list(shards), tf.boolean_mask(ids, inside) - start,
                    tf.boolean_mask(rows, inside), shards[0].device))
        start = stop
    return out


def _read_modify_write(variable, ids, rows, combine):
    """``variable[ids] = combine(variable[ids], rows)``, each shard's rows
    read and written on the shard's device."""
    ops = []
    for (target,), local, part, device in rows_by_shard([variable], ids, rows):
        with tf.device(device):
            ops.append(scatter_update(target, local, combine(gather(target, local), part)))
    return tf.group(*ops)


def scatter_add(variable, ids, rows):
    """``variable[ids] += rows`` (ids unique)."""
    rows = tf.cast(rows, variable.dtype)
    if is_exclusive():
        return _read_modify_write(variable, ids, rows, tf.add)
    return _target(variable).scatter_add(tf.IndexedSlices(rows, ids))


def scatter_sub(variable, ids, rows):
    """``variable[ids] -= rows`` (ids unique)."""
    rows = tf.cast(rows, variable.dtype)
    if is_exclusive():
        return _read_modify_write(variable, ids, rows, tf.subtract)
    return _target(variable).scatter_sub(tf.IndexedSlices(rows, ids))


def densify(ids, rows, variable) -> tf.Tensor:
    """The dense gradient of ``variable`` whose only non-zero rows are ``rows``."""
    shape = tf.shape(rows, out_type=tf.int64)
    dense_shape = tf.concat([[int(variable.shape[0])], shape[1:]], axis=0)
    return tf.convert_to_tensor(tf.IndexedSlices(rows, ids, dense_shape))


def read_rows(variable, ids) -> tf.Tensor:
    """``w_read[ids]``: the rows ``ids`` as the step read them.

    The published read value (``tf_async.staleness``) is either a dense tensor
    (gathered) or the ``IndexedSlices`` of the rows the step read; a row the
    step did not publish is taken at its current value (a fresh gradient, so
    no compensation for it).
    """
    read = staleness.read_value(variable)
    if not isinstance(read, tf.IndexedSlices):
        return tf.gather(tf.cast(read, variable.dtype), ids)
    values = tf.cast(read.values, variable.dtype)
    if read.indices is ids:
        return values
    # Position of each id among the (unique) rows read: ``tf.unique`` numbers
    # values by first occurrence, so the rows read keep positions 0..n-1 and
    # an id not among them gets a position >= n (then: the padding row).
    read_ids = tf.cast(read.indices, ids.dtype)
    count = tf.shape(read_ids)[0]
    _, position = tf.unique(tf.concat([read_ids, ids], axis=0))
    position = tf.minimum(position[count:], count)
    pad = tf.zeros(tf.concat([[1], tf.shape(values)[1:]], axis=0), values.dtype)
    padded = tf.concat([values, pad], axis=0)
    picked = tf.gather(padded, position)
    found = tf.reshape(
        position < count,
        tf.concat([tf.shape(position), tf.ones([tf.rank(values) - 1], tf.int32)], 0),
    )
    return tf.where(found, picked, gather(variable, ids))
