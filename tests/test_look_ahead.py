"""DANA look-ahead (DanaSGD, DanaAdam) and the StepContext prediction seam:
equal to Keras SGD/Adam/AdamW bit for bit without staleness; under
SimulatedAsyncStrategy the stale gradient is computed at the prediction made
τ steps earlier (NumPy reference); prediction formulas (NumPy); save/load;
per-epoch staleness_mean."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_async import staleness
from tf_async.keras_optimizers import DanaAdam, DanaSGD, GapAware
from tf_async.strategies import SimulatedAsyncStrategy

from tests import _linear_problem

BATCH, STEPS, LR, MU = 4, 12, 0.05, 0.9

PAIRS = {
    "sgd": (lambda: DanaSGD(0.05, momentum=0.9), lambda: keras.optimizers.SGD(0.05, 0.9)),
    "nesterov": (lambda: DanaSGD(0.05, 0.9, nesterov=True),
                 lambda: keras.optimizers.SGD(0.05, 0.9, nesterov=True)),
    "adam": (lambda: DanaAdam(0.01), lambda: keras.optimizers.Adam(0.01)),
    "adamw": (lambda: DanaAdam(0.01, weight_decay=0.01),
              lambda: keras.optimizers.AdamW(0.01, weight_decay=0.01)),
}


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_equals_keras_base_bit_for_bit(pair):
    rng = np.random.RandomState(1)
    init = rng.randn(4, 3).astype("float32")
    grads = [rng.randn(4, 3).astype("float32") for _ in range(15)]
    results = []
    for make in PAIRS[pair]:
        variable = keras.Variable(init)
        optimizer = make()
        for g in grads:
            optimizer.apply([tf.constant(g)], [variable])
        results.append(variable.numpy())
    np.testing.assert_array_equal(results[0], results[1])


def test_predictions_match_numpy_formulas():
    rng = np.random.RandomState(2)
    init = rng.randn(3, 2).astype("float32")
    grads = [rng.randn(3, 2).astype("float32") for _ in range(5)]
    for optimizer in (DanaSGD(0.05, 0.9), DanaAdam(0.01), GapAware(DanaAdam(0.01))):
        variable = keras.Variable(init)
        assert staleness.predicts_weights(optimizer)
        value = variable.value.read_value()
        optimizer.build([variable])  # t = 0: nothing to predict yet
        np.testing.assert_array_equal(
            staleness.predicted_read(optimizer, variable, value, 7.0).numpy(), init)
        for g in grads:
            optimizer.apply([tf.constant(g)], [variable])
        w = variable.numpy()
        got = staleness.predicted_read(optimizer, variable, tf.constant(w), 7.0).numpy()
        base = getattr(optimizer, "inner_optimizer", optimizer)
        if isinstance(base, DanaSGD):
            expected = w + 7.0 * 0.9 * base.momentums[0].numpy()
        else:
            t = len(grads)
            m, v = base._momentums[0].numpy(), base._velocities[0].numpy()
            alpha = 0.01 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
            expected = w - 7.0 * alpha * m / (np.sqrt(v) + 1e-7)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
        assert np.abs(got - w).max() > 1e-3
        rows = staleness.predicted_read(
            optimizer, variable, tf.constant(w[[2, 0]]), 7.0, ids=tf.constant([2, 0])).numpy()
        np.testing.assert_allclose(rows, expected[[2, 0]], rtol=1e-5, atol=1e-7)
    assert not staleness.predicts_weights(keras.optimizers.SGD(0.1, 0.9))
    assert not staleness.predicts_weights(GapAware(keras.optimizers.Adam()))


def _data():
    return _linear_problem.data(STEPS, BATCH)


def _init():
    return _linear_problem.init()


def _fit(strategy, make, jit_compile=False, epochs=1):
    x, y = _data()
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.set_weights(_init())
        model.compile(make(), "mse", jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return model, history


def _np_dana(taus, horizon):
    """Round-robin async momentum SGD whose gradient of step t is taken at the
    prediction p_{t−τ} = w + h·μ·m made at step t − τ (linear model, MSE)."""
    x, y = _data()
    w, b = [v.astype(np.float64) for v in _init()]
    mw, mb = np.zeros_like(w), np.zeros_like(b)
    predictions = []
    for t, tau in enumerate(taus):
        predictions.append((w + horizon * MU * mw, b + horizon * MU * mb))
        w_read, b_read = predictions[t - tau]
        xb, yb = x[t * BATCH:(t + 1) * BATCH], y[t * BATCH:(t + 1) * BATCH]
        err = xb @ w_read + b_read - yb
        scale = 2.0 / err.size
        gw, gb = scale * xb.T @ err, scale * err.sum(0)
        mw, mb = MU * mw - LR * gw, MU * mb - LR * gb
        w, b = w + mw, b + mb
    return w, b


@pytest.mark.parametrize("jit", [False, True])
def test_simulator_computes_gradient_at_prediction(jit):
    model, history = _fit(SimulatedAsyncStrategy(3), lambda: DanaSGD(LR, MU), jit)
    taus = [min(2, t) for t in range(STEPS)]
    w, b = _np_dana(taus, horizon=2.0)
    np.testing.assert_allclose(model.get_weights()[0], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_weights()[1], b, rtol=1e-5, atol=1e-6)
    w_plain, _ = _np_dana(taus, horizon=0.0)  # the look-ahead changed the result
    assert np.abs(w - w_plain).max() > 1e-3
    plain, _ = _fit(SimulatedAsyncStrategy(3), lambda: keras.optimizers.SGD(LR, MU), jit)
    np.testing.assert_allclose(plain.get_weights()[0], w_plain, rtol=1e-5, atol=1e-6)


def test_one_simulated_worker_equals_keras_adam_jit():
    dana, _ = _fit(SimulatedAsyncStrategy(1), lambda: DanaAdam(0.01), jit_compile=True)
    plain, _ = _fit(tf.distribute.OneDeviceStrategy("/cpu:0"),
                    lambda: keras.optimizers.Adam(0.01), jit_compile=True)
    for a, b in zip(dana.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_staleness_mean_is_per_epoch():
    # 8 workers, 12 steps per epoch: epoch 1 has τ = 0..7 then 7s; epoch 2 all 7.
    model, history = _fit(SimulatedAsyncStrategy(8), lambda: keras.optimizers.SGD(0.01),
                          epochs=2)
    first = np.mean([min(7, t) for t in range(STEPS)])
    np.testing.assert_allclose(history.history["staleness_mean"], [first, 7.0], rtol=1e-6)
    assert history.history["staleness_max"] == [7.0, 7.0]


def test_save_load_round_trip(tmp_path):
    model, _ = _fit(SimulatedAsyncStrategy(2), lambda: DanaAdam(0.01, weight_decay=0.004))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, DanaAdam)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert DanaSGD.from_config(DanaSGD(0.1, 0.8, nesterov=True).get_config()).nesterov
