"""DANA look-ahead under AsyncParameterServerStrategy.fit (fresh process): with
one worker (τ = 0) and look_ahead_horizon = 2, each step's gradient is taken
at w + 2·μ·m (NumPy reference), also under GapAware (the gap is measured from
the prediction); with the default horizon (num_workers − 1 = 0) DanaSGD
equals Keras SGD. On two parameter servers with a ``variable_partitioner``
the look-ahead also covers a table read by rows (split over both) and a
sharded dense kernel, and GapAware / StalenessScaled / DCSGD work on sharded weights."""

from __future__ import annotations

import numpy as np
import pytest

from tests import _linear_problem

BATCH, STEPS, LR, MU = 4, 10, 0.05, 0.9


def _data():
    return _linear_problem.data(STEPS, BATCH)


def _init():
    return _linear_problem.init()


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


ROWS, IDS, DIM, TABLE_STEPS, TABLE_LR = 40, 8, 4, 6, 0.2


def _table_data():
    rng = np.random.RandomState(2)
    x = rng.randint(0, ROWS, size=(32, IDS)).astype("int32")
    return x, rng.randn(32, 1).astype("float32")


def _table_init():
    rng = np.random.RandomState(3)
    return [rng.randn(ROWS, DIM).astype("float32"), rng.randn(DIM, 1).astype("float32"),
            rng.randn(1).astype("float32")]


def _np_dana_table(horizon):
    from tests.test_embedding_step import _np_dana_table as reference

    x, y = _table_data()
    return reference(_table_init(), x, y, TABLE_STEPS, TABLE_LR, MU, horizon)


def _child_split():
    import keras
    import tensorflow as tf

    import tf_async
    from tf_async.keras_optimizers import DCSGD, DanaSGD, GapAware, StalenessScaled

    x, y = _table_data()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x)).repeat()
    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=1, ps=2),
        variable_partitioner=tf.distribute.experimental.partitioners.FixedShardsPartitioner(2))
    out = {}
    for horizon in (0.0, 2.0):
        strategy.look_ahead_horizon = horizon
        with strategy.scope():
            inputs = keras.Input((IDS,), dtype="int32")
            h = keras.layers.Embedding(ROWS, DIM, name="table")(inputs)
            h = keras.layers.GlobalAveragePooling1D()(h)
            model = keras.Model(inputs, keras.layers.Dense(1, name="out")(h))
            model.set_weights(_table_init())
            model.compile(DanaSGD(TABLE_LR, MU), "mse")
        model.fit(data, epochs=1, steps_per_epoch=TABLE_STEPS, verbose=0)
        out[horizon] = [w.tolist() for w in model.get_weights()]
        out["shards"] = [len(getattr(v.value, "variables", [v])) for v in model.trainable_variables]
    # The wrappers that read a weight around the inner step, on sharded weights
    # (the linear problem's kernel and bias split over both servers).
    x, y = _data()
    linear = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
    runs = {"gap_aware": (2.0, lambda: GapAware(DanaSGD(LR, MU), step_average=0.5)),
            "staleness_scaled": (None, lambda: StalenessScaled(
                keras.optimizers.SGD(LR, momentum=MU))),
            "dc_sgd": (None, lambda: DCSGD(LR, momentum=MU, lambda_=2.0))}
    for key, (horizon, make) in runs.items():
        strategy.look_ahead_horizon = horizon
        with strategy.scope():
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
            model.set_weights(_init())
            model.compile(make(), "mse")
        model.fit(linear, epochs=1, steps_per_epoch=STEPS, verbose=0)
        out[key] = [w.tolist() for w in model.get_weights()]
        out[key, "shards"] = [len(getattr(v.value, "variables", [v]))
                              for v in model.trainable_variables]
    return out


@pytest.mark.slow
def test_look_ahead_covers_split_tables_and_sharded_variables(fresh_process):
    r = fresh_process(_child_split, timeout=600)
    assert r["shards"] == [2, 2, 1], r["shards"]  # table and kernel split, bias not
    for horizon in (0.0, 2.0):
        want = _np_dana_table(horizon)
        for got, w in zip(r[horizon], want):
            np.testing.assert_allclose(np.array(got), w, rtol=1e-5, atol=1e-6,
                                       err_msg=f"horizon {horizon}")
    assert np.abs(_np_dana_table(2.0)[0] - _np_dana_table(0.0)[0]).max() > 1e-3
    # GapAware's gap from the prediction, StalenessScaled and DCSGD (τ = 0:
    # Keras momentum SGD) on sharded weights: the same numbers as unsplit
    for key, want in (("gap_aware", _np_dana(2.0, gap_aware_beta=0.5)),
                      ("staleness_scaled", _np_dana(0.0)), ("dc_sgd", _np_dana(0.0))):
        assert r[key, "shards"] == [2, 2], r[key, "shards"]
        for got, w in zip(r[key], want):
            np.testing.assert_allclose(np.array(got), w, rtol=1e-5, atol=1e-6, err_msg=key)

