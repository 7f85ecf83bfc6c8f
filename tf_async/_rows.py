"""Rows of (possibly partitioned) variables, read where they live.

An embedding table on a parameter server must never travel whole: a batch needs
only the rows it looks up. ``gather(variable, ids)`` reads those rows with
``ResourceGather`` on the device that holds the table, or, for a table split
over several parameter servers by a ``variable_partitioner``
(``ShardedVariable``, "div" partitioning along axis 0), on each shard's device,
re-assembled in the order of ``ids`` (``tf.nn.embedding_lookup``'s dispatch for
``ShardedVariable``). Keras 3's ``ops.take`` instead converts the variable to a
tensor first, which copies the whole table to the caller.

Row-sparse writes need nothing here: ``tf.Variable.scatter_*`` (and Keras'
``TFOptimizer.assign*`` with an ``IndexedSlices`` value) run on the variable's
device, and ``ShardedVariable.scatter_*`` split the rows across the shards.
"""

from __future__ import annotations

from typing import List

import tensorflow as tf

from tf_async import _keras_fit


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
