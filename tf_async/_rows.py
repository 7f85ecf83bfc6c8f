"""Rows of (possibly partitioned) variables, read where they live.

An embedding table on a parameter server must never travel whole: a batch needs
only the rows it looks up. ``gather(variable, ids)`` reads those rows with
``ResourceGather`` on the device that holds the table, or, for a table split
over several parameter servers by a ``variable_partitioner``
(``ShardedVariable``, "div" partitioning along axis 0), on each shard's device,
re-assembled in the order of ``ids`` (``tf.nn.embedding_lookup``'s dispatch for
``ShardedVariable``). Keras 3's ``ops.take`` instead converts the variable to a
tensor first, which copies the whole table to the caller.

``lookup(layer, inputs)`` is ``keras.layers.Embedding.call`` done that way
(same ids semantics: cast, negative ids from the end; out-of-range ids raise a
clear error naming the layer instead of a ``GatherV2`` failure on the PS). It
is what an ``Embedding`` whose table lives on a parameter server runs outside
the train step (``evaluate``/``predict`` on the chief, a direct
``model(x)``): the chief gathers rows, never the table.

Row-sparse writes need nothing here: ``tf.Variable.scatter_*`` (and Keras'
``TFOptimizer.assign*`` with an ``IndexedSlices`` value) run on the variable's
device, and ``ShardedVariable.scatter_*`` split the rows across the shards.
"""

from __future__ import annotations

import re
from typing import List, Optional

import tensorflow as tf

from tf_async import _keras_fit

_IDS_MARKER = "tf_async embedding ids out of range"
_IDS_TAIL = "; smallest and largest id:"
_IDS_PATTERN = re.compile(
    r"\[?(" + re.escape(_IDS_MARKER) + r"[^\]]*)\]?\s*\[(-?\d+)\]\s*\[(-?\d+)\]", re.S
)


def shards(variable) -> List[tf.Variable]:
    """The ``tf.Variable`` shards of ``variable`` (one for an unpartitioned one)."""
    parts = _keras_fit.variable_shards(variable)
    if parts is not None:
        return parts
    return [_keras_fit.raw_variable(variable)]


def gather(variable, ids) -> tf.Tensor:
    """``variable[ids]`` (rows along axis 0), read on the device(s) holding them.

    ``ids``: integer tensor of any shape; returns ``ids.shape + variable.shape[1:]``.
    """
    parts = _keras_fit.variable_shards(variable)
    if parts is not None:
        return tf.nn.embedding_lookup(_keras_fit.raw_variable(variable), ids)
    raw = _keras_fit.raw_variable(variable)
    with tf.device(raw.device):
        return tf.gather(raw, ids)


def is_remote(variable) -> bool:
    """True for a variable on a parameter server (or split over several)."""
    if _keras_fit.variable_shards(variable) is not None:
        return True
    return "/job:ps" in (getattr(_keras_fit.raw_variable(variable), "device", "") or "")


def checked_ids(layer, inputs, rows: int) -> tf.Tensor:
    """``Embedding.call``'s ids as int64 in ``[0, rows)``: cast like Keras,
    negative ids counted from the end (Keras' ``ops.take``), and a clear error
    naming ``layer`` if any id is outside ``[-rows, rows)``."""
    ids = tf.convert_to_tensor(inputs)
    if ids.dtype not in (tf.int32, tf.int64):
        ids = tf.cast(ids, tf.int32)
    ids = tf.cast(ids, tf.int64)
    low, high = tf.reduce_min(ids), tf.reduce_max(ids)
    message = (
        f"{_IDS_MARKER}: Embedding layer `{layer.name}` got ids outside "
        f"[0, input_dim={rows}) (negative ids from -{rows} count from the end, as "
        f"in Keras){_IDS_TAIL}"
    )
    check = tf.debugging.Assert(
        tf.logical_and(low >= -rows, high < rows), [message, low, high],
        name="tf_async_embedding_ids_check",
    )
    with tf.control_dependencies([check]):
        return tf.where(ids < 0, ids + rows, ids)


def ids_error_from(error: BaseException) -> Optional[ValueError]:
    """The ``ValueError`` a failed :func:`checked_ids` assertion stands for."""
    match = _IDS_PATTERN.search(str(getattr(error, "message", error)))
    if match is None:
        return None
    text = match.group(1)[len(_IDS_MARKER) + 2:].replace("\\'", "'")
    text = text.split(_IDS_TAIL)[0].rstrip()
    return ValueError(f"{text}; this batch has ids from {match.group(2)} to {match.group(3)}.")


def lookup(layer, inputs, table=None) -> tf.Tensor:
    """``Embedding.call(inputs)`` reading only the rows looked up, where they live."""
    table = _keras_fit.plain_embedding_table(layer) if table is None else table
    rows = int(table.shape[0])
    ids = checked_ids(layer, inputs, rows)
    outputs = gather(table, ids)
    return tf.cast(outputs, layer.compute_dtype)


def _lookup_remote_tables(layer, inputs):
    """Default ``Embedding.call`` handler: rows of a parameter-server table are
    gathered where they live; everything else is Keras' own call."""
    table = _keras_fit.plain_embedding_table(layer)
    if table is None or not is_remote(table):
        return NotImplemented
    if _keras_fit.stateless_value(table) is not None:
        return NotImplemented  # a StatelessScope maps the table: Keras reads that
    if not isinstance(inputs, tf.Tensor) and not hasattr(inputs, "dtype"):
        return NotImplemented
    if isinstance(inputs, (tf.SparseTensor, tf.RaggedTensor)):
        return NotImplemented
    return lookup(layer, inputs, table)


_keras_fit.default_embedding_handler = _lookup_remote_tables


def _is_count(value) -> bool:
    try:
        return not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError):
        return False


def check_partitioner(partitioner):
    """``variable_partitioner`` checked: a callable whose every result splits
    along axis 0 only into >= 1 parts; a clear ``ValueError`` naming the
    variable otherwise (TF's own message does not say which one)."""
    if partitioner is None:
        return None
    if not callable(partitioner):
        raise TypeError(
            "`variable_partitioner` must be a callable (shape, dtype) -> list of "
            "partitions per axis, e.g. tf.distribute.experimental.partitioners."
            f"MinSizePartitioner(); got {partitioner!r}."
        )

    def checked(shape, dtype, **kwargs):
        parts = partitioner(shape=shape, dtype=dtype, **kwargs)
        ok = (
            isinstance(parts, (list, tuple))
            and len(parts) == len(shape)
            and all(_is_count(p) for p in parts)
            and parts[0] >= 1
            and all(p == 1 for p in parts[1:])
        )
        if not ok:
            raise ValueError(
                "`variable_partitioner` cannot split a variable of shape "
                f"{tuple(shape)} ({tf.as_dtype(dtype).name}): it must return one "
                "int per axis, >= 1 parts along axis 0 and 1 along every other axis "
                f"(tables are split by rows); it returned {parts!r}."
            )
        return [int(p) for p in parts]

    checked.__wrapped__ = partitioner
    return checked
