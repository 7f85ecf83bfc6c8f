"""DANA look-ahead under AsyncParameterServerStrategy.fit (fresh process): with
one worker (τ = 0) and look_ahead_horizon = 2, each step's gradient is taken
at w + 2·μ·m (NumPy reference); with the default horizon (num_workers − 1 = 0)
DanaSGD equals Keras SGD."""

from __future__ import annotations

import numpy as np
import pytest

BATCH, STEPS, LR, MU = 4, 10, 0.05, 0.9


def _data():
    rng = np.random.RandomState(0)
    return (rng.randn(STEPS * BATCH, 3).astype("float32"),
            rng.randn(STEPS * BATCH, 2).astype("float32"))


def _init():
    rng = np.random.RandomState(1)
    return [rng.randn(3, 2).astype("float32"), rng.randn(2).astype("float32")]


def _np_dana(horizon):
    x, y = _data()
    w, b = [v.astype(np.float64) for v in _init()]
    mw, mb = np.zeros_like(w), np.zeros_like(b)
    for t in range(STEPS):
        w_read, b_read = w + horizon * MU * mw, b + horizon * MU * mb
        xb, yb = x[t * BATCH:(t + 1) * BATCH], y[t * BATCH:(t + 1) * BATCH]
        err = xb @ w_read + b_read - yb
        scale = 2.0 / err.size
        mw, mb = MU * mw - LR * scale * xb.T @ err, MU * mb - LR * scale * err.sum(0)
        w, b = w + mw, b + mb
    return [w, b]


def _child():
    import keras
    import tensorflow as tf

    import tf_async
    from tf_async.keras_optimizers import DanaSGD

    x, y = _data()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=1, ps=1))
    out = {"default_horizon": strategy.look_ahead_horizon}
    for horizon in (None, 2.0):
        strategy.look_ahead_horizon = horizon
        with strategy.scope():
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
            model.set_weights(_init())
            model.compile(DanaSGD(LR, MU), "mse")
        model.fit(data.repeat(), epochs=1, steps_per_epoch=STEPS, verbose=0)
        out[str(horizon)] = [w.tolist() for w in model.get_weights()]
    return out


@pytest.mark.slow
def test_ps_step_computes_gradient_at_prediction(fresh_process):
    r = fresh_process(_child, timeout=600)
    assert r["default_horizon"] == 0.0
    for key, horizon in (("None", 0.0), ("2.0", 2.0)):
        for got, want in zip(r[key], _np_dana(horizon)):
            np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)
    assert np.abs(_np_dana(2.0)[0] - _np_dana(0.0)[0]).max() > 1e-3
