"""DANA look-ahead under AsyncParameterServerStrategy.fit (fresh process): with
one worker (τ = 0) and look_ahead_horizon = 2, each step's gradient is taken
at w + 2·μ·m (NumPy reference), also under GapAware (the gap is measured from
the prediction); with the default horizon (num_workers − 1 = 0) DanaSGD
equals Keras SGD."""

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


def _np_dana(horizon, gap_aware_beta=None):
    x, y = _data()
    params = [v.astype(np.float64) for v in _init()]
    moms = [np.zeros_like(p) for p in params]
    avg = [np.zeros_like(p) for p in params]
    for t in range(STEPS):
        reads = [p + horizon * MU * m for p, m in zip(params, moms)]
        xb, yb = x[t * BATCH:(t + 1) * BATCH], y[t * BATCH:(t + 1) * BATCH]
        err = xb @ reads[0] + reads[1] - yb
        scale = 2.0 / err.size
        grads = [scale * xb.T @ err, scale * err.sum(0)]
        for i in range(2):
            g = grads[i]
            if gap_aware_beta is not None:
                beta = gap_aware_beta
                c_hat = avg[i] / (1 - beta**t) if t else np.zeros_like(avg[i])
                g = g / (1 + np.abs(params[i] - reads[i]) / (c_hat + 1e-12))
            moms[i] = MU * moms[i] - LR * g
            new = params[i] + moms[i]
            if gap_aware_beta is not None:
                avg[i] = beta * avg[i] + (1 - beta) * np.abs(new - params[i])
            params[i] = new
    return params


def _child():
    import keras
    import tensorflow as tf

    import tf_async
    from tf_async.keras_optimizers import DanaSGD, GapAware

    x, y = _data()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=1, ps=1))
    out = {"default_horizon": strategy.look_ahead_horizon, "bad_horizon": {}}
    for bad in (-1.0, "2", True, float("nan")):
        try:
            strategy.look_ahead_horizon = bad
        except ValueError as error:
            out["bad_horizon"][repr(bad)] = str(error)
    runs = {"None": (None, lambda: DanaSGD(LR, MU)), "2.0": (2.0, lambda: DanaSGD(LR, MU)),
            "gap_aware": (2.0, lambda: GapAware(DanaSGD(LR, MU), step_average=0.5))}
    for key, (horizon, make) in runs.items():
        strategy.look_ahead_horizon = horizon
        with strategy.scope():
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
            model.set_weights(_init())
            model.compile(make(), "mse")
        model.fit(data.repeat(), epochs=1, steps_per_epoch=STEPS, verbose=0)
        out[key] = [w.tolist() for w in model.get_weights()]
    return out


@pytest.mark.slow
def test_ps_step_computes_gradient_at_prediction(fresh_process):
    r = fresh_process(_child, timeout=600)
    assert r["default_horizon"] == 0.0
    assert sorted(r["bad_horizon"]) == sorted(["-1.0", "'2'", "True", "nan"]), r["bad_horizon"]
    for message in r["bad_horizon"].values():
        assert "`look_ahead_horizon` must be None or a float >= 0" in message
    expected = {"None": _np_dana(0.0), "2.0": _np_dana(2.0),
                "gap_aware": _np_dana(2.0, gap_aware_beta=0.5)}
    for key, want in expected.items():
        for got, w in zip(r[key], want):
            np.testing.assert_allclose(np.array(got), w, rtol=1e-5, atol=1e-6, err_msg=key)
    assert np.abs(expected["2.0"][0] - expected["None"][0]).max() > 1e-3
    assert np.abs(expected["gap_aware"][0] - expected["2.0"][0]).max() > 1e-3
