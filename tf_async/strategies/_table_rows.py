"""The embedding-table part of the parameter-server step's snapshot: rows only.

A ``keras.layers.Embedding`` table (also one split over several parameter
servers by ``variable_partitioner``) is snapshotted as the rows its batch
looks up, not as a whole. The ids are only known inside the forward pass, so
the step reads them there: each ``Embedding.call`` of a table (the seam in
``_keras_fit``, "embedding tables")

1. checks and normalises the ids like Keras (``_rows.checked_ids``),
2. deduplicates them on the worker (``tf.unique``),
3. gathers those rows on the parameter server(s) holding the table, after the
   step's version read (like every other snapshot read; ``_rows.gather``),
4. looks the batch up in the rows received (``tf.gather`` on the worker);
   with a weight-predicting optimizer (DANA look-ahead) the rows used are the
   optimizer's prediction of those rows (its slot rows gathered the same way).

The gradient of the rows read goes back as ``tf.IndexedSlices(rows' gradient,
unique ids, table shape)`` and the rows read are the table's ``w_read``
(``IndexedSlices`` of the same unique ids) for :func:`staleness.publish`. A
table looked up by several calls (a shared table) is read once per call; its
gradient and read rows are merged over the union of the ids (the first read
of a row is its ``w_read``).

Which tables are read this way is decided once per traced input signature by
a probe trace (:func:`tables_read_by_rows`, never run): a trainable table
qualifies if every use of it in the forward pass and the loss is an
``Embedding.call`` on a dense id tensor. A table also used otherwise (tied
output weights, an ``embeddings_regularizer``, LoRA, ragged/sparse ids) is
snapshotted whole, as before, so its gradient stays exact.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import tensorflow as tf

from tf_async import _keras_fit, _rows


def _spec(value):
    if isinstance(value, (tf.Tensor, tf.SparseTensor, tf.RaggedTensor)):
        return tf.type_spec_from_value(value)
    return value


def tables_read_by_rows(model, x, y, sample_weight, forward) -> Dict[int, object]:
    """``{id(variable): table}`` of the trainable tables only ``Embedding.call``
    reads (on dense ids), found by tracing ``forward(x, y, sample_weight)``
    once in a throwaway function (Keras variables' reads are recorded).

    Variables are keyed by ``id`` of the Keras variable: inside the scope even
    ``variable.value`` counts as a read.
    """
    trainable = {id(v): v for v in model.trainable_variables}
    eligible: Dict[int, bool] = {}
    read_whole: set = set()

    def probe_lookup(layer, inputs):
        table = _keras_fit.plain_embedding_table(layer)
        if table is None or id(table) not in trainable:
            return NotImplemented
        if not isinstance(inputs, tf.Tensor):  # ragged/sparse ids: Keras' lookup
            eligible[id(table)] = False
            return NotImplemented
        eligible.setdefault(id(table), True)
        shape = tf.concat(
            [tf.shape(inputs, out_type=tf.int64), tf.constant([int(d) for d in table.shape[1:]], tf.int64)], 0
        )
        outputs = tf.zeros(shape, layer.compute_dtype)
        outputs.set_shape(inputs.shape.concatenate(table.shape[1:]))
        return outputs

    def probe(x, y, sample_weight):
        # Every trainable mapped to its value (Keras' regularization losses
        # ask the scope for each); the reads are only recorded.
        mapping = [(v, _keras_fit.raw_variable(v)) for v in trainable.values()]
        with _keras_fit.embedding_lookup(probe_lookup):
            with _keras_fit.VariableReadScope(mapping, on_read=lambda v: read_whole.add(id(v))):
                forward(x, y, sample_weight)

    specs = tf.nest.map_structure(_spec, (x, y, sample_weight))
    tf.function(probe, autograph=False).get_concrete_function(*specs)
    return {
        key: trainable[key]
        for key, ok in eligible.items()
        if ok and key not in read_whole
    }


class _Read:
    __slots__ = ("ids", "rows")

    def __init__(self, ids, rows):
        self.ids, self.rows = ids, rows


class StepRows:
    """The rows one forward pass of the step reads, per table.

    Use ``lookup`` as the ``Embedding.call`` handler during the forward pass
    (inside the step's ``GradientTape``), then ``sources()`` are the tensors
    to differentiate and ``gradients_and_reads(grads)`` gives per table the
    ``IndexedSlices`` gradient and rows read.
    """

    def __init__(self, tables: Dict[int, object], tape: tf.GradientTape, after=(),
                 predict=None):
        """``predict(table, rows, ids)``, if given, replaces the rows read by
        the optimizer's look-ahead of them (DANA; ``staleness.predicted_read``):
        the forward pass, the gradient and the published ``w_read`` use it."""
        self._tables = tables
        self._predict = predict
        # The backing tf.Variables, resolved outside any StatelessScope.
        self._raw = {key: _keras_fit.raw_variable(t) for key, t in tables.items()}
        self._tape = tape
        self._after = list(after)
        self._reads: Dict[int, List[_Read]] = {}

    def lookup(self, layer, inputs):
        table = _keras_fit.plain_embedding_table(layer)
        if table is None:
            return NotImplemented
        key = id(table)
        if key not in self._tables:
            if not table.trainable and _rows.is_remote(table):
                return _rows.lookup(layer, inputs, table)  # frozen: live rows
            return NotImplemented
        ids = _rows.checked_ids(layer, inputs, int(table.shape[0]))
        unique, position = tf.unique(tf.reshape(ids, [-1]))
        with tf.control_dependencies(self._after):
            rows = _rows.gather(self._raw[key], unique)
            if self._predict is not None:
                rows = self._predict(table, rows, unique)
        self._tape.watch(rows)
        self._reads.setdefault(key, []).append(_Read(unique, rows))
        outputs = tf.gather(rows, position)
        shape = tf.concat(
            [tf.shape(ids, out_type=tf.int64), tf.constant([int(d) for d in table.shape[1:]], tf.int64)], 0
        )
        outputs = tf.reshape(outputs, shape)
        outputs.set_shape(ids.shape.concatenate(table.shape[1:]))
        return tf.cast(outputs, layer.compute_dtype)

    def sources(self) -> List[tf.Tensor]:
        """The rows read, in ``keys()`` order, call by call."""
        return [read.rows for key in self._reads for read in self._reads[key]]

    def gradients_and_reads(self, gradients) -> Dict[int, tuple]:
        """``{id(table): (IndexedSlices gradient or None, IndexedSlices rows
        read)}`` from the gradients of ``sources()``; a table of the step that
        this pass did not look up reads no rows."""
        gradients = list(gradients)
        out = {}
        first = 0
        for key, reads in self._reads.items():
            grads = [_dense_rows(g, r.rows) for g, r in zip(gradients[first:], reads)]
            first += len(reads)
            table = self._tables[key]
            shape = tf.constant([int(d) for d in table.shape], tf.int64)
            if len(reads) == 1:
                ids, rows, grad = reads[0].ids, reads[0].rows, grads[0]
            else:
                ids, rows, grad = _merge(reads, grads)
            gradient = None if grad is None else tf.IndexedSlices(grad, ids, shape)
            out[key] = (gradient, tf.IndexedSlices(rows, ids, shape))
        for key, table in self._tables.items():
            if key not in out:
                shape = tf.constant([int(d) for d in table.shape], tf.int64)
                rows = tf.zeros([0, *table.shape[1:]], table.dtype)
                out[key] = (None, tf.IndexedSlices(rows, tf.zeros([0], tf.int64), shape))
        return out


def _dense_rows(gradient, rows) -> Optional[tf.Tensor]:
    """The gradient of the rows read as a tensor of their shape (the gather's
    gradient comes as ``IndexedSlices`` over the *read rows*, not the table)."""
    if gradient is None or not isinstance(gradient, tf.IndexedSlices):
        return gradient
    return tf.math.unsorted_segment_sum(
        gradient.values, gradient.indices, tf.shape(rows, out_type=gradient.indices.dtype)[0]
    )


def _merge(reads: List[_Read], grads: List[Optional[tf.Tensor]]):
    """One set of unique ids for a table read by several calls: gradients
    summed per row, the first read of each row kept as its read value."""
    ids = tf.concat([r.ids for r in reads], 0)
    rows = tf.concat([r.rows for r in reads], 0)
    unique, position = tf.unique(ids)
    count = tf.size(unique)
    first = tf.math.unsorted_segment_min(tf.range(tf.size(ids)), position, count)
    read = tf.gather(rows, first)
    if all(g is None for g in grads):
        return unique, read, None
    grads = [tf.zeros_like(r.rows) if g is None else g for g, r in zip(grads, reads)]
    grad = tf.math.unsorted_segment_sum(tf.concat(grads, 0), position, count)
    return unique, read, grad
