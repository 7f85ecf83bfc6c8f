"""DANA-Zero under AsyncParameterServerStrategy.fit (slow; each test in a fresh
process): one worker equals the NumPy reference (default horizon 0: Keras
momentum SGD / Adam; horizon 1: the gradient at w + μ·Σ_j m^j); two workers
(two parameter servers) fill both buffers, colocated with their variables,
keep S = Σ_j m^j, and iterations / the global step are exact (fully
asynchronous with steps_per_execution, and under SSP); a
num_workers that is not the cluster's is rejected when fit starts. With a
``variable_partitioner`` (the kernel split over two parameter servers)
one worker still equals the reference at both horizons, every shard has its
own ``[num_workers, *shard.shape]`` buffers on its server, and save/load
restores them."""

from __future__ import annotations

import numpy as np
import pytest

from tests import _linear_problem

BATCH, STEPS = 4, 10
LR_SGD, MU = 0.05, 0.9
LR_ADAM, B1, B2, EPS = 0.02, 0.9, 0.999, 1e-7


def _data(steps=STEPS):
    return _linear_problem.data(steps, BATCH)


def _init():
    return _linear_problem.init()


def _np_one_worker(kind, look_ahead):
    """τ = 0, one worker: the gradient at the look-ahead of this very step."""
    x, y = _data()
    params = [p.astype(np.float64) for p in _init()]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t in range(STEPS):
        alpha = LR_ADAM * np.sqrt(1 - B2 ** (t + 1)) / (1 - B1 ** (t + 1))
        if not look_ahead:
            read = params
        elif kind == "sgd":
            read = [p + MU * b for p, b in zip(params, m)]
        else:
            read = [p - alpha * B1 * b / (np.sqrt(s) + EPS) for p, b, s in zip(params, m, v)]
        xb, yb = x[t * BATCH:(t + 1) * BATCH], y[t * BATCH:(t + 1) * BATCH]
        err = xb @ read[0] + read[1] - yb
        scale = 2.0 / err.size
        grads = [scale * xb.T @ err, scale * err.sum(0)]
        for i, g in enumerate(grads):
            if kind == "sgd":
                m[i] = MU * m[i] - LR_SGD * g
                params[i] = params[i] + m[i]
            else:
                m[i] = m[i] + (g - m[i]) * (1 - B1)
                v[i] = v[i] + (g * g - v[i]) * (1 - B2)
                params[i] = params[i] - alpha * m[i] / (np.sqrt(v[i]) + EPS)
    return params


def _make(kind, workers):
    from tf_async.keras_optimizers import DanaZeroAdam, DanaZeroSGD

    if kind == "sgd":
        return DanaZeroSGD(LR_SGD, momentum=MU, num_workers=workers)
    return DanaZeroAdam(LR_ADAM, beta_1=B1, beta_2=B2, epsilon=EPS, num_workers=workers)


def _model(strategy, optimizer_fn, hidden=False, **compile_kwargs):
    import keras

    with strategy.scope():
        if hidden:  # four variables: spread over two parameter servers
            model = keras.Sequential(
                [keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
        else:
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
            model.set_weights(_init())
        model.compile(optimizer_fn(), "mse", **compile_kwargs)
    return model


def _layout(variables):
    """Per variable, (device, shape) of each shard (one pair if not split)."""
    from tf_async import _keras_fit

    return [[(part.device, tuple(part.shape)) for part in
             (_keras_fit.variable_shards(v) or [_keras_fit.raw_variable(v)])]
            for v in variables]


def _slot_layout(slots):
    """(device, shape) pairs of DANA-Zero's buffer slots of one variable (a
    list of per-shard slots, or one slot)."""
    return [pair for piece in _layout(slots if isinstance(slots, list) else [slots])
            for pair in piece]


def _buffer(slots):
    """A variable's ``[num_workers, *shape]`` buffers as one array (shards joined)."""
    import numpy as np

    parts = slots if isinstance(slots, list) else [slots]
    return np.concatenate([np.asarray(p.numpy()) for p in parts], axis=1)


def _child_one_worker():
    import tensorflow as tf

    import tf_async

    x, y = _data()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=1, ps=1))
    out = {}
    for horizon in (None, 1.0):
        strategy.look_ahead_horizon = horizon
        for kind in ("sgd", "adam"):
            model = _model(strategy, lambda: _make(kind, 1))
            model.fit(data.repeat(), epochs=1, steps_per_epoch=STEPS, verbose=0)
            out[kind, horizon] = [w.tolist() for w in model.get_weights()]
            out[kind, horizon, "iterations"] = int(model.optimizer.iterations.numpy())
    model = _model(strategy, lambda: _make("sgd", 2))
    try:
        model.fit(data.repeat(), epochs=1, steps_per_epoch=2, verbose=0)
    except ValueError as error:
        out["mismatch"] = str(error)
    return out


@pytest.mark.slow
def test_one_worker_equals_numpy_reference(fresh_process):
    r = fresh_process(_child_one_worker, timeout=900)
    for kind in ("sgd", "adam"):
        for horizon, look_ahead in ((None, False), (1.0, True)):
            want = _np_one_worker(kind, look_ahead)
            for got, w in zip(r[kind, horizon], want):
                np.testing.assert_allclose(np.array(got), w, rtol=1e-5, atol=1e-6,
                                           err_msg=f"{kind} horizon {horizon}")
            assert r[kind, horizon, "iterations"] == STEPS
        # the look-ahead matters: the two references are ≥ 10× the tolerance apart
        assert np.abs(_np_one_worker(kind, True)[0] - _np_one_worker(kind, False)[0]).max() > 1e-4
    message = r["mismatch"]
    assert "num_workers=2" in message and "AsyncParameterServerStrategy has 1 workers" in message


def _child_partitioned():
    import os
    import tempfile

    import keras
    import numpy as np
    import tensorflow as tf

    import tf_async

    x, y = _data()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=1, ps=2),
        variable_partitioner=tf.distribute.experimental.partitioners.MinSizePartitioner(
            min_shard_bytes=16, max_shards=2))
    out = {}
    for horizon in (None, 1.0):
        strategy.look_ahead_horizon = horizon
        for kind in ("sgd", "adam"):
            model = _model(strategy, lambda: _make(kind, 1))
            model.fit(data, epochs=1, steps_per_epoch=STEPS, verbose=0)
            out[kind, horizon] = [w.tolist() for w in model.get_weights()]
            optimizer = model.optimizer
            out[kind, horizon, "layout"] = {
                "variables": _layout(model.trainable_variables),
                "slots": [_slot_layout(s) for s in optimizer.worker_momentums],
                "sums": _layout(optimizer.momentum_sums),
                # Keras' own slots (Adam's v) too: shard by shard beside it
                "keras_slots": _layout(getattr(optimizer, "_velocities", [])),
            }
            out[kind, horizon, "sum_error"] = max(
                float(np.abs(_buffer(s)[0] - np.asarray(t.numpy())).max())
                for s, t in zip(optimizer.worker_momentums, optimizer.momentum_sums))
    # save/load of the last model (Adam, horizon 1): same state, same next steps
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dana_zero.keras")
        model.save(path)
        with strategy.scope():
            loaded = keras.models.load_model(path)
    out["loaded_layout"] = {
        "variables": _layout(loaded.trainable_variables),
        "slots": [_slot_layout(s) for s in loaded.optimizer.worker_momentums],
        "sums": _layout(loaded.optimizer.momentum_sums),
    }
    out["loaded_state_error"] = max(
        float(np.abs(np.asarray(a.numpy()) - np.asarray(b.numpy())).max())
        for a, b in zip(model.optimizer.variables, loaded.optimizer.variables))
    for m in (model, loaded):
        m.fit(data, epochs=1, steps_per_epoch=2, verbose=0)
    out["continued_error"] = max(float(np.abs(a - b).max())
                                 for a, b in zip(model.get_weights(), loaded.get_weights()))
    return out


@pytest.mark.slow
def test_partitioned_variables_have_per_shard_buffers(fresh_process):
    r = fresh_process(_child_partitioned, timeout=900)
    for kind in ("sgd", "adam"):
        for horizon, look_ahead in ((None, False), (1.0, True)):
            key = f"{kind} horizon {horizon}"
            want = _np_one_worker(kind, look_ahead)
            for got, w in zip(r[kind, horizon], want):
                np.testing.assert_allclose(np.array(got), w, rtol=1e-5, atol=1e-6, err_msg=key)
            placed = r[kind, horizon, "layout"]
            # kernel (3, 2) split 2 + 1 rows over both servers, bias (2,) not
            assert [[s for _, s in v] for v in placed["variables"]] == [
                [(2, 2), (1, 2)], [(2,)]], (key, placed)
            assert len({d for d, _ in placed["variables"][0]}) == 2, (key, placed)
            for variable, slots, total in zip(placed["variables"], placed["slots"],
                                              placed["sums"]):
                # per shard: [num_workers, *shard.shape], on the shard's server
                assert slots == [(d, (1, *s)) for d, s in variable], (key, placed)
                assert total == variable, (key, placed)  # S: shard by shard beside it
            if kind == "adam":
                assert placed["keras_slots"] == placed["variables"], (key, placed)
            assert r[kind, horizon, "sum_error"] < 1e-6, key
    loaded = r["loaded_layout"]
    for variable, slots, total in zip(loaded["variables"], loaded["slots"], loaded["sums"]):
        assert slots == [(d, (1, *s)) for d, s in variable], loaded
        assert total == variable, loaded
    assert r["loaded_state_error"] == 0.0, r["loaded_state_error"]
    assert r["continued_error"] < 1e-6, r["continued_error"]


def _child_two_workers(max_staleness, partitioned):
    import numpy as np
    import tensorflow as tf

    import tf_async
    from tf_async.keras_optimizers import GapAware

    steps = 40
    x, y = _data(steps)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
    # partitioned: kernels (3, 4) and (4, 2) split 2 + 1 and 2 + 2 rows, biases not
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=16, max_shards=2) if partitioned else None
    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=2, ps=2), max_staleness=max_staleness,
        variable_partitioner=partitioner)
    out = {}
    runs = {"sgd": (lambda: _make("sgd", 2), 1),
            "gap_aware_adam": (lambda: GapAware(_make("adam", 2)), 4)}
    for key, (make, per_call) in runs.items():
        model = _model(strategy, make, steps_per_execution=per_call, hidden=True)
        history = model.fit(data, epochs=2, steps_per_epoch=steps // 2, verbose=0)
        optimizer = model.optimizer
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        rows = [_buffer(s) for s in inner.worker_momentums]
        sums = [np.asarray(s.numpy()) for s in inner.momentum_sums]
        out[key] = {
            "iterations": int(optimizer.iterations.numpy()),
            "version": strategy.global_version,
            "global_step": (int(inner.global_step.numpy())
                            if hasattr(inner, "global_step") else None),
            "row_norms": [[float(np.abs(r[k]).sum()) for k in range(2)] for r in rows],
            "sum_error": max(float(np.abs(r.sum(0) - s).max()) for r, s in zip(rows, sums)),
            "finite": all(bool(np.all(np.isfinite(w))) for w in model.get_weights()),
            "tau_max": history.history["staleness_max"],
            # each buffer slot and sum lives on its variable's (shard's) server
            "layout": {"variables": _layout(model.trainable_variables),
                       "slots": [_slot_layout(s) for s in inner.worker_momentums],
                       "sums": _layout(inner.momentum_sums)},
        }
    return out


@pytest.mark.slow
@pytest.mark.parametrize("max_staleness, partitioned", [(None, False), (1, False), (None, True)],
                         ids=["async", "ssp1", "async_partitioned"])
def test_two_workers_fill_both_buffers_and_count_exactly(
        fresh_process, max_staleness, partitioned):
    r = fresh_process(_child_two_workers, max_staleness, partitioned, timeout=900)
    for key, result in r.items():
        assert result["iterations"] == 40, (key, result)
        assert result["version"] == 40, (key, result)
        if key == "gap_aware_adam":
            assert result["global_step"] == 40, result
        assert result["finite"], (key, result)
        # both workers' steps reached the PS with their own index
        for norms in result["row_norms"]:
            assert min(norms) > 0, (key, result)
        assert result["sum_error"] < 1e-5, (key, result)
        if max_staleness is not None:
            assert max(result["tau_max"]) <= max_staleness, (key, result)
        placed = result["layout"]
        assert len({d for v in placed["variables"] for d, _ in v}) == 2, placed
        if partitioned:
            assert [len(v) for v in placed["variables"]] == [2, 1, 2, 1], placed
        for variable, slots, total in zip(placed["variables"], placed["slots"],
                                          placed["sums"]):
            # per shard: [2 workers, *shard.shape] and S, on the shard's server
            assert slots == [(d, (2, *s)) for d, s in variable], placed
            assert total == variable, placed
