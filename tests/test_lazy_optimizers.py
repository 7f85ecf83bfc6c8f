"""LazyAdam / LazyAdamW / LazySGD: NumPy transcriptions of the lazy formulas
(TF1 LazyAdamOptimizer, TF1 MomentumOptimizer's sparse apply), equality with
Keras on dense variables and fully touched tables, save/load, jit_compile."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import keras

from tf_async.keras_optimizers import DCAdam, LazyAdam, LazyAdamW, LazySGD

ROWS, WIDTH = 7, 3
# Steps of (ids, gradient rows): repeated ids, rows 5 and 6 never touched,
# row 4 touched only in the first step.
STEPS = [
    ([0, 2, 2, 4], 0),
    ([1, 0, 3, 1, 1], 1),
    ([2, 3], 2),
    ([0, 0, 0], 3),
]


def _steps(seed=0):
    rng = np.random.default_rng(seed)
    return [
        (np.array(ids, np.int64), rng.normal(size=(len(ids), WIDTH)).astype(np.float32))
        for ids, _ in STEPS
    ]


def _w0():
    return np.random.default_rng(42).normal(size=(ROWS, WIDTH)).astype(np.float32)


def _slices(ids, values):
    return tf.IndexedSlices(tf.constant(values), tf.constant(ids), tf.constant([ROWS, WIDTH], tf.int64))


def _run(optimizer, gradients, w0=None):
    variable = keras.Variable(_w0() if w0 is None else w0)
    for gradient in gradients:
        optimizer.apply([gradient], [variable])
    return variable.numpy()


def _summed(ids, values):
    """The dense gradient (duplicates summed) as touched rows."""
    rows = {}
    for i, row in zip(ids, values):
        rows[int(i)] = rows.get(int(i), 0) + row.astype(np.float64)
    return rows


def _numpy_lazy_adam(steps, lr, b1, b2, eps, wd=None, amsgrad=False):
    """TF1 tf.contrib.opt.LazyAdamOptimizer._apply_sparse (+ TF Addons'
    decoupled decay of the touched rows, scaled by lr as in Keras AdamW)."""
    w = _w0().astype(np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    v_hat = np.zeros_like(w)
    for t, (ids, values) in enumerate(steps, start=1):
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        for r, g in _summed(ids, values).items():
            if wd is not None:
                w[r] -= wd * lr * w[r]
            m[r] = b1 * m[r] + (1 - b1) * g
            v[r] = b2 * v[r] + (1 - b2) * g * g
            denom = v[r]
            if amsgrad:
                v_hat[r] = np.maximum(v_hat[r], v[r])
                denom = v_hat[r]
            w[r] -= alpha * m[r] / (np.sqrt(denom) + eps)
    return w


def _numpy_lazy_momentum(steps, lr, mu, nesterov):
    """TF1 MomentumOptimizer's sparse apply, in Keras' sign convention."""
    w = _w0().astype(np.float64)
    m = np.zeros_like(w)
    for ids, values in steps:
        for r, g in _summed(ids, values).items():
            m[r] = mu * m[r] - lr * g
            w[r] += mu * m[r] - lr * g if nesterov else m[r]
    return w


@pytest.mark.parametrize(
    "make, reference",
    [
        (lambda: LazyAdam(0.05), lambda s: _numpy_lazy_adam(s, 0.05, 0.9, 0.999, 1e-7)),
        (lambda: LazyAdam(0.05, beta_1=0.8, beta_2=0.9, amsgrad=True),
         lambda s: _numpy_lazy_adam(s, 0.05, 0.8, 0.9, 1e-7, amsgrad=True)),
        (lambda: LazyAdamW(0.05, weight_decay=0.1),
         lambda s: _numpy_lazy_adam(s, 0.05, 0.9, 0.999, 1e-7, wd=0.1)),
        (lambda: DCAdam(0.05, lazy=True),
         lambda s: _numpy_lazy_adam(s, 0.05, 0.9, 0.999, 1e-7)),
        (lambda: LazySGD(0.1, momentum=0.9),
         lambda s: _numpy_lazy_momentum(s, 0.1, 0.9, False)),
        (lambda: LazySGD(0.1, momentum=0.5, nesterov=True),
         lambda s: _numpy_lazy_momentum(s, 0.1, 0.5, True)),
    ],
    ids=["adam", "adam_amsgrad", "adamw", "dcadam_lazy", "sgd_momentum", "sgd_nesterov"],
)
def test_lazy_update_equals_numpy_transcription(make, reference):
    steps = _steps()
    got = _run(make(), [_slices(i, v) for i, v in steps])
    expected = reference(steps)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # Untouched rows are exactly where they started (the lazy semantics).
    np.testing.assert_array_equal(got[5:], _w0()[5:])


def test_untouched_rows_keep_their_moments_and_dense_adam_does_not():
    steps = _steps()
    row4 = {}
    for name, optimizer in (("lazy", LazyAdam(0.05)), ("dense", keras.optimizers.Adam(0.05))):
        variable = keras.Variable(_w0())
        seen = []
        for ids, values in steps:  # row 4 is looked up in the first step only
            optimizer.apply([_slices(ids, values)], [variable])
            seen.append((optimizer._momentums[0].numpy()[4].copy(), variable.numpy()[4].copy()))
        row4[name] = seen
    m_first, w_first = row4["lazy"][0]
    assert np.abs(m_first).max() > 0
    for m, w in row4["lazy"][1:]:
        np.testing.assert_array_equal(m, m_first)
        np.testing.assert_array_equal(w, w_first)
    # Keras' dense Adam decays m and keeps moving the row.
    assert np.abs(row4["dense"][-1][0] - row4["dense"][0][0]).max() > 1e-3
    assert np.abs(row4["dense"][-1][1] - row4["dense"][0][1]).max() > 1e-4


@pytest.mark.parametrize(
    "lazy, keras_optimizer",
    [
        (lambda: LazyAdam(0.05, clipnorm=1.0), lambda: keras.optimizers.Adam(0.05, clipnorm=1.0)),
        (lambda: LazyAdam(0.05, amsgrad=True), lambda: keras.optimizers.Adam(0.05, amsgrad=True)),
        (lambda: LazyAdamW(0.05), lambda: keras.optimizers.AdamW(0.05)),
        (lambda: LazySGD(0.1, 0.9), lambda: keras.optimizers.SGD(0.1, 0.9)),
        (lambda: LazySGD(0.1, 0.9, nesterov=True, weight_decay=0.01),
         lambda: keras.optimizers.SGD(0.1, 0.9, nesterov=True, weight_decay=0.01)),
    ],
    ids=["adam_clipnorm", "adam_amsgrad", "adamw", "sgd_momentum", "sgd_nesterov_decay"],
)
def test_equals_keras_on_dense_variables_and_fully_touched_tables(lazy, keras_optimizer):
    rng = np.random.default_rng(3)
    dense = [rng.normal(size=(ROWS, WIDTH)).astype(np.float32) for _ in range(4)]
    expected = _run(keras_optimizer(), [tf.constant(g) for g in dense])
    np.testing.assert_allclose(_run(lazy(), [tf.constant(g) for g in dense]), expected,
                               rtol=0, atol=1e-6)
    # The same gradients as IndexedSlices touching every row, with duplicates
    # (row 1 split over two occurrences, shuffled order). Keras clips an
    # IndexedSlices by the norm of its occurrences (for any optimizer), so
    # with clipnorm the rows are unique, as the parameter-server step sends them.
    clips = lazy().clipnorm is not None

    def as_slices(g):
        if clips:
            return _slices(np.array([3, 1, 0, 6, 2, 5, 4], np.int64), g[[3, 1, 0, 6, 2, 5, 4]])
        ids = np.array([3, 1, 0, 6, 2, 1, 5, 4], np.int64)
        values = np.stack([g[3], 0.25 * g[1], g[0], g[6], g[2], 0.75 * g[1], g[5], g[4]])
        return _slices(ids, values)

    got = _run(lazy(), [as_slices(g) for g in dense])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def _embedding_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), dtype="int32")
    h = keras.layers.Embedding(40, 4)(inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


def _embedding_data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 30, size=(64, 4)).astype("int32")  # rows 30-39 never used
    y = rng.normal(size=(64, 1)).astype("float32")
    return x, y


@pytest.mark.parametrize(
    "make", [lambda: LazyAdam(0.02), lambda: LazyAdamW(0.02, weight_decay=0.05),
             lambda: LazySGD(0.05, 0.9, nesterov=True), lambda: DCAdam(0.02, lazy=True)],
    ids=["LazyAdam", "LazyAdamW", "LazySGD", "DCAdam_lazy"],
)
def test_fit_save_load_and_jit_compile(make, tmp_path):
    x, y = _embedding_data()
    model = _embedding_model()
    initial = model.get_weights()
    model.compile(optimizer=make(), loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    table = model.get_weights()[0]
    np.testing.assert_array_equal(table[30:], initial[0][30:])  # never looked up
    assert np.abs(table[:30] - initial[0][:30]).max() > 1e-4
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)

    # jit_compile=True gives the same training as the default.
    jitted = _embedding_model()
    jitted.compile(optimizer=make(), loss="mse", jit_compile=True)
    jitted.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(jitted.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_serialization_by_registered_name():
    for optimizer in (LazyAdam(0.01, amsgrad=True), LazyAdamW(0.01, weight_decay=0.2),
                      LazySGD(0.1, 0.8, nesterov=True), DCAdam(lazy=True)):
        config = keras.optimizers.serialize(optimizer)
        restored = keras.optimizers.deserialize(config)
        assert type(restored) is type(optimizer)
        assert restored.get_config() == optimizer.get_config()
        assert restored.updates_only_touched_rows


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: LazySGD(momentum=0.0), ValueError, "`momentum` must be in (0, 1]"),
        (lambda: LazySGD(momentum="0.9"), TypeError, "`momentum` must be a float"),
        (lambda: LazyAdam(gradient_accumulation_steps=2), ValueError,
         "does not support `gradient_accumulation_steps`"),
        (lambda: LazyAdamW(weight_decay=None), ValueError, "`weight_decay` must be a float"),
        (lambda: LazyAdam(weight_decay=-1.0), ValueError, "`weight_decay` must be None or a float >= 0"),
        (lambda: LazyAdam(beta_1=1.0), ValueError, "`beta_1` must be in [0, 1)"),
        (lambda: DCAdam(lazy="yes"), TypeError, "`lazy` must be a bool"),
    ],
)
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=None) as info:
        call()
    assert message in str(info.value)
