"""Row-sparse updates of embedding tables: stock SGD()/Adagrad under the PS
step's hook equal Keras' dense result; DC-ASGD / DC-Adam / StalenessScaled
compensate on the rows (NumPy references); no dense read of a table or its
slots on the row-sparse paths; the one-line dense-table notice."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tensorflow as tf
import keras

from tf_async import staleness
from tf_async.keras_optimizers import (
    DCAdam, DCSGD, LazyAdam, LazySGD, StalenessScaled, row_sparse,
)

ROWS, WIDTH = 9, 2


def _w0(seed=42):
    return np.random.default_rng(seed).normal(size=(ROWS, WIDTH)).astype(np.float32)


def _batches(seed=0, steps=4):
    """(ids with repeats, occurrence gradients); rows 7 and 8 never touched."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        ids = rng.integers(0, 7, size=10).astype(np.int64)
        out.append((ids, rng.normal(size=(10, WIDTH)).astype(np.float32)))
    return out


def _slices(ids, values):
    return tf.IndexedSlices(tf.constant(values), tf.constant(ids),
                            tf.constant([ROWS, WIDTH], tf.int64))


def _dense(ids, values):
    return tf.convert_to_tensor(_slices(ids, values))  # duplicates summed


STOCK = {
    "sgd_by_name": lambda: keras.optimizers.get("sgd"),
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "adagrad_by_name": lambda: keras.optimizers.get("adagrad"),
    "adagrad": lambda: keras.optimizers.Adagrad(0.5, initial_accumulator_value=0.01),
    "adagrad_clipnorm": lambda: keras.optimizers.Adagrad(0.5, clipnorm=0.5),
}


@pytest.mark.parametrize("name", sorted(STOCK))
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "tf_function"])
def test_stock_optimizer_rows_equal_keras_dense(name, traced):
    """Repeated ids: the hook sums them first, so the result is Keras' update
    on the dense gradient (to 1e-6), untouched rows bit-identical."""
    batches = _batches()
    reference, reference_var = STOCK[name](), keras.Variable(_w0())
    for ids, values in batches:
        reference.apply([_dense(ids, values)], [reference_var])

    optimizer, variable = STOCK[name](), keras.Variable(_w0())
    optimizer.build([variable])
    unique = name.endswith("clipnorm")  # clipping sees rows as the PS step sends them

    def apply(gradient):
        with row_sparse.updates(optimizer, [gradient], [variable]):
            optimizer.apply([gradient], [variable])

    if traced:
        apply = tf.function(apply, reduce_retracing=True)
    for ids, values in batches:
        if unique:
            dense = _dense(ids, values).numpy()
            touched = np.unique(ids)
            ids, values = touched, dense[touched]
        apply(_slices(ids, values))
    np.testing.assert_allclose(variable.numpy(), reference_var.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(variable.numpy()[7:], _w0()[7:])
    for a, b in zip(optimizer.variables, reference.variables):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    assert "update_step" not in vars(optimizer)  # the hook is gone afterwards


def test_keras_own_indexed_slices_adagrad_is_not_its_dense_result():
    """Why the hook sums duplicates: Keras squares each occurrence."""
    ids, values = _batches()[0]
    own, dense = keras.optimizers.Adagrad(0.5), keras.optimizers.Adagrad(0.5)
    a, b = keras.Variable(_w0()), keras.Variable(_w0())
    own.apply([_slices(ids, values)], [a])
    dense.apply([_dense(ids, values)], [b])
    assert np.abs(a.numpy() - b.numpy()).max() > 1e-4


def _dense_reads(fn, *handles):
    """ReadVariableOps on the given variables in the traced graph of ``fn``."""
    graph = fn.get_concrete_function().graph
    internal = {}
    for external, placeholder in graph.captures:
        for v in handles:
            if external is v.handle:
                internal[id(placeholder)] = v.name
    return [
        internal[id(op.inputs[0])]
        for op in graph.get_operations()
        if op.type == "ReadVariableOp" and id(op.inputs[0]) in internal
    ]


ROW_SPARSE = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "adagrad": lambda: keras.optimizers.Adagrad(0.1),
    "lazy_adam": lambda: LazyAdam(0.1, amsgrad=True, weight_decay=0.01),
    "lazy_sgd": lambda: LazySGD(0.1, 0.9, nesterov=True),
    "dcsgd": lambda: DCSGD(0.1, lambda_=0.5),
    "dcsgd_lazy_adaptive": lambda: DCSGD(0.1, momentum=0.9, adaptive=True, lazy=True),
    "dcadam_lazy": lambda: DCAdam(0.1, lambda_=0.5, adaptive=True, lazy=True),
    "scaled_lazy_adam": lambda: StalenessScaled(LazyAdam(0.1)),
    "scaled_adagrad": lambda: StalenessScaled(keras.optimizers.Adagrad(0.1)),
}


@pytest.mark.parametrize("name", sorted(ROW_SPARSE))
def test_row_sparse_paths_never_read_a_table_densely(name):
    """No ReadVariableOp of the table or of any table-shaped slot: a dense
    read would move (and, in TF's copy-on-read mode after sparse access,
    copy) the whole table every step."""
    optimizer = ROW_SPARSE[name]()
    table = keras.Variable(_w0(), name="table")
    optimizer.build([table])
    ids = tf.constant([1, 4, 1], tf.int64)
    read = tf.IndexedSlices(tf.constant(_w0()[[1, 4]] - 0.1), tf.constant([1, 4], tf.int64))

    @tf.function
    def step():
        gradient = tf.IndexedSlices(tf.ones([3, WIDTH]), ids, tf.constant([ROWS, WIDTH], tf.int64))
        with staleness.publish(tf.constant(2, tf.int64), [table], [read]):
            with row_sparse.updates(optimizer, [gradient], [table]):
                optimizer.apply([gradient], [table])

    slots = [v.value for v in optimizer.variables if tuple(v.shape) == (ROWS, WIDTH)]
    assert _dense_reads(step, table.value, *slots) == []
    assert row_sparse.updates_only_touched_rows(optimizer, table)
    before = table.numpy()
    step()
    changed = np.flatnonzero(np.abs(table.numpy() - before).max(axis=1))
    assert list(changed) == [1, 4]


# --------------------------------------------------------- DC on rows


def _numpy_dc_rows(w_now, w_read_rows, ids, g_rows, lam):
    """DC-ASGD (Zheng et al. 2017) on the touched rows: g + λ g⊙g⊙(w_now − w_read)."""
    return g_rows + lam * g_rows * g_rows * (w_now[ids] - w_read_rows)


@pytest.mark.parametrize("read_as", ["rows", "rows_reordered", "dense"])
def test_dcsgd_compensates_rows(read_as):
    lr, lam = 0.1, 0.7
    w_now = _w0()
    w_read = w_now - np.random.default_rng(1).normal(size=w_now.shape).astype(np.float32) * 0.3
    occurrence_ids = np.array([2, 5, 2, 0], np.int64)
    values = np.random.default_rng(2).normal(size=(4, WIDTH)).astype(np.float32)
    ids = np.array([2, 5, 0])  # first occurrence order
    g = _dense(occurrence_ids, values).numpy()[ids]
    expected = w_now.copy()
    expected[ids] -= lr * _numpy_dc_rows(w_now, w_read[ids], ids, g, lam)

    if read_as == "dense":
        read = tf.constant(w_read)
    else:
        order = np.array([0, 5, 2]) if read_as == "rows_reordered" else ids
        read = tf.IndexedSlices(tf.constant(w_read[order]), tf.constant(order, tf.int64))
    optimizer, variable = DCSGD(lr, lambda_=lam), keras.Variable(w_now)
    with staleness.publish(3, [variable], [read]):
        optimizer.apply([_slices(occurrence_ids, values)], [variable])
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_dcadam_rows_non_lazy_equals_its_dense_path_and_lazy_equals_numpy():
    lr, lam, b1, b2, eps = 0.05, 0.5, 0.9, 0.999, 1e-7
    w_now = _w0()
    w_read = w_now - 0.2
    occurrence_ids = np.array([3, 3, 6], np.int64)
    values = np.random.default_rng(5).normal(size=(3, WIDTH)).astype(np.float32)
    row_read = tf.IndexedSlices(tf.constant(w_read[[3, 6]]), tf.constant([3, 6], tf.int64))
    # Rows not read count as fresh (w_read = w_now there): same as a dense read
    # that equals w_now off the rows.
    dense_read = w_now.copy()
    dense_read[[3, 6]] = w_read[[3, 6]]

    results = {}
    for name, lazy, gradient, read in (
        ("rows", False, _slices(occurrence_ids, values), row_read),
        ("dense", False, _dense(occurrence_ids, values), tf.constant(dense_read)),
        ("lazy", True, _slices(occurrence_ids, values), row_read),
    ):
        optimizer, variable = DCAdam(lr, lambda_=lam, adaptive=True, lazy=lazy), keras.Variable(w_now)
        with staleness.publish(1, [variable], [read]):
            optimizer.apply([gradient], [variable])
        results[name] = variable.numpy()
    np.testing.assert_allclose(results["rows"], results["dense"], rtol=0, atol=1e-6)

    ids = np.array([3, 6])
    g = _dense(occurrence_ids, values).numpy()[ids].astype(np.float64)
    meansq = (1 - b2) * g * g  # β2·v_{t-1} + (1−β2)g², v_0 = 0
    g_tilde = g + lam / np.sqrt(meansq + eps) * g * g * (w_now[ids] - w_read[ids])
    m = (1 - b1) * g_tilde
    v = (1 - b2) * g_tilde * g_tilde
    alpha = lr * np.sqrt(1 - b2) / (1 - b1)
    expected = w_now.astype(np.float64).copy()
    expected[ids] -= alpha * m / (np.sqrt(v) + eps)
    np.testing.assert_allclose(results["lazy"], expected, rtol=1e-5, atol=1e-6)
    # Dense Adam moves the untouched rows from step 2 on; lazy never does.
    np.testing.assert_array_equal(np.delete(results["lazy"], ids, 0), np.delete(w_now, ids, 0))


def test_staleness_scaled_scales_table_rows():
    """StalenessScaled(SGD()) on rows: f(τ)·Δ on the touched rows only, equal
    to its dense run."""
    occurrence_ids = np.array([1, 8, 1], np.int64)
    values = np.ones((3, WIDTH), np.float32)
    out = {}
    for name, gradient in (("rows", _slices(occurrence_ids, values)),
                           ("dense", _dense(occurrence_ids, values))):
        optimizer = StalenessScaled(keras.optimizers.SGD(0.1), policy="inverse")
        variable = keras.Variable(_w0())
        with staleness.publish(4, [variable], [tf.constant(_w0())]):
            with row_sparse.updates(optimizer, [gradient], [variable]):
                optimizer.apply([gradient], [variable])
        out[name] = variable.numpy()
    expected = _w0()
    expected[1] -= 0.1 * 2 / 4
    expected[8] -= 0.1 / 4
    np.testing.assert_allclose(out["rows"], expected, atol=1e-6)
    np.testing.assert_allclose(out["dense"], expected, atol=1e-6)


# ------------------------------------------------------------- notice


def test_dense_table_notice_once_with_cost_and_lazy_alternative():
    table = keras.Variable(np.zeros((1000, 8), np.float32), name="big_table")
    kernel = keras.Variable(np.zeros((8, 1), np.float32), name="kernel")
    gradient = tf.IndexedSlices(tf.ones([2, 8]), tf.constant([3, 7]), tf.constant([1000, 8]))
    adam = keras.optimizers.Adam(0.01)
    adam.build([table, kernel])
    with pytest.warns(UserWarning) as record:
        with row_sparse.updates(adam, [gradient, tf.ones([8, 1])], [table, kernel]):
            adam.apply([gradient, tf.ones([8, 1])], [table, kernel])
    messages = [str(r.message) for r in record if "tf_async:" in str(r.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    message = messages[0]
    assert "Adam updates every row" in message and "big_table" in message
    assert "(1000 rows x 8 x 4 B x 3 arrays)" in message  # weights, m, v
    assert "0.1 MiB" in message and "LazyAdam" in message and "kernel" not in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with row_sparse.updates(adam, [gradient, tf.ones([8, 1])], [table, kernel]):
            pass  # said once per optimizer
        for quiet in (LazyAdam(), keras.optimizers.Adagrad(), DCAdam(lazy=True),
                      StalenessScaled(keras.optimizers.SGD())):
            quiet.build([table, kernel])
            with row_sparse.updates(quiet, [gradient, tf.ones([8, 1])], [table, kernel]):
                pass


@pytest.mark.parametrize(
    "optimizer, suggestion",
    [(lambda: keras.optimizers.AdamW(), "LazyAdamW"),
     (lambda: keras.optimizers.SGD(0.1, momentum=0.9), "LazySGD"),
     (lambda: DCAdam(), "DCAdam(lazy=True)"),
     (lambda: DCSGD(momentum=0.5), "DCSGD(lazy=True)"),
     (lambda: keras.optimizers.RMSprop(), "row-sparse optimizer")],
)
def test_notice_names_the_matching_lazy_optimizer(optimizer, suggestion):
    table = keras.Variable(np.zeros((10, 2), np.float32))
    opt = optimizer()
    opt.build([table])
    message = row_sparse.dense_table_notice(opt, [table])
    assert suggestion in message
