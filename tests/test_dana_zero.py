"""DANA-Zero (per-worker momentum): DanaZeroSGD / DanaZeroAdam against a NumPy
transcription of the algorithm under SimulatedAsyncStrategy (round robin,
M = 3), eager and jit; one worker without a strategy equals Keras bit for bit;
save/load; bad input; the StepContext's worker."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import keras
import tensorflow as tf

from tf_async import staleness
from tf_async.keras_optimizers import DanaZeroAdam, DanaZeroSGD, GapAware
from tf_async.strategies import SimulatedAsyncStrategy

from tests import _linear_problem

BATCH, STEPS, M = 4, 12, 3
LR_SGD, MU = 0.05, 0.9
LR_ADAM, B1, B2, EPS = 0.02, 0.9, 0.999, 1e-7


def _data():
    return _linear_problem.data(STEPS, BATCH)


def _init():
    return _linear_problem.init()


def _grads(params, t):
    x, y = _data()
    xb, yb = x[t * BATCH:(t + 1) * BATCH], y[t * BATCH:(t + 1) * BATCH]
    err = xb @ params[0] + params[1] - yb
    scale = 2.0 / err.size  # mse: mean over batch and outputs
    return [scale * xb.T @ err, scale * err.sum(0)]


def np_dana_zero(kind, workers=M, per_worker=True, look_ahead_sum=True, steps=STEPS):
    """The simulator's round robin with DANA-Zero on the master.

    Step t is worker t mod M's; its gradient is computed at the prediction
    made when it read, τ_t = min(M − 1, t) steps earlier (the simulator's
    ring); the prediction is made from the weights and the buffers at that
    step. ``per_worker=False`` (one shared buffer) and ``look_ahead_sum=False``
    (only the own buffer in the look-ahead) are the wrong variants the test
    must tell apart.
    """
    params = [p.astype(np.float64) for p in _init()]
    buffers = [[np.zeros_like(p) for p in params] for _ in range(workers)]
    second = [np.zeros_like(p) for p in params]
    predictions = []
    for t in range(steps):
        worker = t % workers if per_worker else 0
        alpha_next = LR_ADAM * np.sqrt(1 - B2 ** (t + 1)) / (1 - B1 ** (t + 1))
        prediction = []
        for i, p in enumerate(params):
            own = buffers[t % workers if per_worker else 0][i]
            total = sum(b[i] for b in buffers) if look_ahead_sum else own
            if kind == "sgd":
                prediction.append(p + MU * total)
            else:
                prediction.append(p - alpha_next * B1 * total / (np.sqrt(second[i]) + EPS))
        if workers == 1:
            prediction = [p.copy() for p in params]  # horizon 0: no look-ahead
        predictions.append(prediction)
        tau = min(workers - 1, t)
        grads = _grads(predictions[t - tau], t)
        alpha = LR_ADAM * np.sqrt(1 - B2 ** (t + 1)) / (1 - B1 ** (t + 1))
        for i, g in enumerate(grads):
            m = buffers[worker][i]
            if kind == "sgd":
                m = MU * m - LR_SGD * g
                params[i] = params[i] + m
            else:
                m = m + (g - m) * (1 - B1)
                second[i] = second[i] + (g * g - second[i]) * (1 - B2)
                params[i] = params[i] - alpha * m / (np.sqrt(second[i]) + EPS)
            buffers[worker][i] = m
    return params, buffers


def _make(kind, workers=M):
    if kind == "sgd":
        return DanaZeroSGD(LR_SGD, momentum=MU, num_workers=workers)
    return DanaZeroAdam(LR_ADAM, beta_1=B1, beta_2=B2, epsilon=EPS, num_workers=workers)


def _fit(make, strategy=None, jit=False, steps=STEPS):
    """``make()``: the optimizer, created in the strategy's scope (as Keras needs)."""
    x, y = _data()
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.set_weights(_init())
        model.compile(make(), "mse", jit_compile=jit)
    model.fit(x[:steps * BATCH], y[:steps * BATCH], batch_size=BATCH, epochs=1,
              shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_simulated_round_robin_equals_numpy_dana_zero(kind, jit):
    model = _fit(lambda: _make(kind), SimulatedAsyncStrategy(M, "round_robin"), jit=jit)
    want, buffers = np_dana_zero(kind)
    for got, w in zip(model.get_weights(), want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
    optimizer = model.optimizer
    for i in range(2):  # every worker's buffer, and S = their sum
        rows = optimizer.worker_momentums[i].numpy()
        assert rows.shape == (M, *want[i].shape)
        for worker in range(M):
            np.testing.assert_allclose(rows[worker], buffers[worker][i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(optimizer.momentum_sums[i].numpy(), rows.sum(0),
                                   rtol=1e-5, atol=1e-6)
    assert int(optimizer.iterations.numpy()) == STEPS
    if kind == "adam":
        assert int(optimizer.global_step.numpy()) == STEPS


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_reference_tells_wrong_buffers_and_wrong_look_ahead_apart(kind):
    """The comparison above fails if the optimizer used one shared buffer or
    only the own buffer in the look-ahead: those variants end far away."""
    right, _ = np_dana_zero(kind)
    for wrong in (np_dana_zero(kind, per_worker=False)[0],
                  np_dana_zero(kind, look_ahead_sum=False)[0]):
        # ≥ 10× what assert_allclose(rtol=1e-5, atol=1e-6) above lets through
        assert max(np.abs(a - b).max() for a, b in zip(right, wrong)) > 1e-4


def test_gap_aware_forwards_worker_slots_and_runs():
    assert staleness.worker_slots(GapAware(_make("sgd"))) == M
    assert staleness.predicts_weights(GapAware(_make("sgd")))
    model = _fit(lambda: GapAware(_make("sgd")), SimulatedAsyncStrategy(M))
    optimizer = model.optimizer
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    rows = optimizer.inner_optimizer.worker_momentums[0].numpy()
    assert all(np.abs(rows[k]).max() > 0 for k in range(M))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_one_worker_without_strategy_is_keras_bit_for_bit(kind, jit):
    ours = _fit(lambda: _make(kind, workers=1), jit=jit)
    keras_optimizer = (keras.optimizers.SGD(LR_SGD, momentum=MU) if kind == "sgd" else
                       keras.optimizers.Adam(LR_ADAM, beta_1=B1, beta_2=B2, epsilon=EPS))
    reference = _fit(lambda: keras_optimizer, jit=jit)
    for got, want in zip(ours.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_one_simulated_worker_equals_numpy_reference():
    model = _fit(lambda: _make("sgd", workers=1), SimulatedAsyncStrategy(1))
    want, _ = np_dana_zero("sgd", workers=1)
    for got, w in zip(model.get_weights(), want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


def _manual_steps(model, steps, first):
    """Applies ``steps`` gradients with workers first, first + 1, ... mod M."""
    x, y = _data()
    for k in range(steps):
        xb = tf.constant(x[k * BATCH:(k + 1) * BATCH])
        yb = tf.constant(y[k * BATCH:(k + 1) * BATCH])
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        with staleness.publish(0, worker=(first + k) % M):
            model.optimizer.apply(grads, model.trainable_variables)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_save_and_load_continue_identically(kind, tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.set_weights(_init())
    model.compile(_make(kind), "mse")
    _manual_steps(model, 5, first=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.num_workers == M
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = np.asarray(loaded.optimizer.worker_momentums[0])
    assert all(np.abs(rows[k]).max() > 0 for k in range(M))  # every row was saved
    _manual_steps(model, 4, first=5)
    _manual_steps(loaded, 4, first=5)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_trained_under_simulator_saves_every_worker_row(tmp_path):
    model = _fit(lambda: _make("adam"), SimulatedAsyncStrategy(M), steps=6)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer.get_config()["num_workers"] == M
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_round_trip():
    for optimizer in (DanaZeroSGD(0.1, momentum=0.5, num_workers=4),
                      DanaZeroAdam(3e-3, beta_1=0.8, num_workers=7, weight_decay=0.01)):
        config = optimizer.get_config()
        again = type(optimizer).from_config(config)
        assert again.get_config() == config
        restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
        assert type(restored) is type(optimizer) and restored.num_workers == optimizer.num_workers


@pytest.mark.parametrize("cls", [DanaZeroSGD, DanaZeroAdam])
@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2", None])
def test_bad_num_workers_is_rejected(cls, bad):
    with pytest.raises(ValueError, match=r"`num_workers` must be an int >= 1 .*"
                                         r"received num_workers="):
        cls(num_workers=bad)


@pytest.mark.parametrize("make", [
    lambda: DanaZeroSGD(num_workers=3), lambda: GapAware(DanaZeroAdam(num_workers=3)),
], ids=["sgd", "gap_aware_adam"])
def test_num_workers_must_match_the_simulated_strategy(make):
    strategy = SimulatedAsyncStrategy(4)
    x, y = _data()
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(make(), "mse")
    with pytest.raises(ValueError) as info:
        model.fit(x, y, batch_size=BATCH, verbose=0)
    message = str(info.value)
    assert "num_workers=3" in message and "has 4 workers" in message
    assert "num_workers=4" in message


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="`momentum` must be in"):
        DanaZeroSGD(momentum=1.0)
    with pytest.raises(ValueError, match="`learning_rate` must be > 0"):
        DanaZeroAdam(learning_rate=0.0)
    with pytest.raises(ValueError, match="`beta_1` must be in"):
        DanaZeroAdam(beta_1=1.5)


def test_step_context_worker():
    assert int(staleness.current_worker()) == 0
    with staleness.publish(3):
        assert int(staleness.current_worker()) == 0  # no worker published
    with staleness.publish(3, worker=2):
        assert int(staleness.current_worker()) == 2
        assert staleness.current_worker().dtype == tf.int64
    for bad in (-1, True):
        with pytest.raises(ValueError, match="`worker` must be an int >= 0"):
            with staleness.publish(0, worker=bad):
                pass
    with pytest.raises(ValueError, match="`worker` must be a scalar"):
        with staleness.publish(0, worker=[1, 2]):
            pass
    assert staleness.worker_slots(keras.optimizers.SGD()) is None
    assert staleness.worker_slots(DanaZeroSGD(num_workers=5)) == 5
    staleness.check_worker_slots(keras.optimizers.Adam(), 8, "X")  # no per-worker state
    with pytest.raises(ValueError, match="num_workers=5 workers, but the X has 2"):
        staleness.check_worker_slots(DanaZeroSGD(num_workers=5), 2, "X")


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_row_gradients_are_the_dense_gradient_and_rows_predict(kind):
    """A table's IndexedSlices gradient (ids repeated) gives the dense
    gradient's update; the look-ahead of rows ``ids`` is those rows of the
    full look-ahead."""
    results = []
    for sparse in (True, False):
        table = keras.Variable(np.arange(8, dtype=np.float32).reshape(4, 2) / 8)
        optimizer = _make(kind)
        rows = tf.IndexedSlices(tf.constant([[1.0, 2.0], [3.0, 4.0], [0.5, 0.5]]),
                                tf.constant([2, 0, 2]), tf.constant([4, 2]))
        for worker in (0, 1, 2, 0):
            with staleness.publish(0, worker=worker):
                optimizer.apply([rows if sparse else tf.convert_to_tensor(rows)], [table])
        results.append((table.numpy(), optimizer, table))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    _, optimizer, table = results[0]
    table_value = tf.constant(results[0][0])
    full = optimizer.predict_weights(table, table_value, 2.0).numpy()
    ids = tf.constant([3, 0], tf.int64)
    part = optimizer.predict_weights(table, tf.gather(table_value, ids), 2.0, ids=ids).numpy()
    np.testing.assert_allclose(part, full[[3, 0]], rtol=1e-6, atol=1e-7)
    assert np.abs(full - results[0][0]).max() > 1e-4  # the look-ahead moved
