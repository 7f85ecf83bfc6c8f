"""SimulatedAsyncStrategy: M = 1 is plain training; gradients are taken at the
weights τ updates ago (NumPy reference); τ sequence exact / seeded; ring
buffer bounded; staleness in History; jit_compile works."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_async import staleness
from tf_async.keras_optimizers import DCSGD, StalenessScaled
from tf_async.strategies import SimulatedAsyncStrategy

BATCH = 4
STEPS = 12
LR = 0.05


def _linear_data():
    rng = np.random.RandomState(0)
    x = rng.randn(STEPS * BATCH, 3).astype("float32")
    y = rng.randn(STEPS * BATCH, 2).astype("float32")
    return x, y


def _linear_model(init):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.set_weights(init)
    return model


def _init():
    rng = np.random.RandomState(1)
    return [rng.randn(3, 2).astype("float32"), rng.randn(2).astype("float32")]


class TauRecorder(keras.optimizers.SGD):
    """SGD that also records the published τ of every apply."""

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.taus = self.add_variable(shape=(64,), dtype="int64", name="taus")

    def update_step(self, gradient, variable, learning_rate):
        super().update_step(gradient, variable, learning_rate)
        if self._get_variable_index(variable) == 0:
            index = tf.reshape(tf.cast(self.iterations, tf.int32), [1, 1])
            tau = tf.reshape(staleness.current_tau(), [1])
            self.assign(self.taus, tf.tensor_scatter_nd_update(self.taus, index, tau))


def _fit(strategy, make_optimizer, jit_compile=False, epochs=1, model_fn=None,
         steps_per_execution=1):
    x, y = _linear_data()
    keras.utils.set_random_seed(3)
    with strategy.scope():
        model = (model_fn or (lambda: _linear_model(_init())))()
        optimizer = make_optimizer()
        model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile,
                      steps_per_execution=steps_per_execution)
    history = model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return model, optimizer, history


def _np_reference(taus, lam=0.0, factor=lambda tau: 1.0):
    """Async SGD (optionally DC-ASGD, step scaled by factor(τ)) on the linear
    model with MSE."""
    x, y = _linear_data()
    w, b = [v.astype(np.float64) for v in _init()]
    history = [(w.copy(), b.copy())]
    for t, tau in enumerate(taus):
        w_read, b_read = history[t - tau]
        xb, yb = x[t * BATCH:(t + 1) * BATCH], y[t * BATCH:(t + 1) * BATCH]
        err = xb @ w_read + b_read - yb
        scale = 2.0 / err.size
        gw, gb = scale * xb.T @ err, scale * err.sum(0)
        gw = gw + lam * gw * gw * (w - w_read)
        gb = gb + lam * gb * gb * (b - b_read)
        w, b = w - factor(tau) * LR * gw, b - factor(tau) * LR * gb
        history.append((w.copy(), b.copy()))
    return w, b


@pytest.mark.parametrize("workers,jit,steps_per_execution", [(3, False, 1), (4, True, 1),
                                                             (3, False, 4)])
def test_round_robin_gradient_at_weights_tau_updates_ago(workers, jit, steps_per_execution):
    strategy = SimulatedAsyncStrategy(workers, "round_robin")
    model, optimizer, history = _fit(strategy, lambda: TauRecorder(LR), jit_compile=jit,
                                     steps_per_execution=steps_per_execution)
    taus = [min(workers - 1, t) for t in range(STEPS)]
    np.testing.assert_array_equal(optimizer.taus.numpy()[:STEPS], taus)
    w, b = _np_reference(taus)
    np.testing.assert_allclose(model.get_weights()[0], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_weights()[1], b, rtol=1e-5, atol=1e-6)
    # Not the synchronous result: the test can tell stale from fresh.
    w_sync, _ = _np_reference([0] * STEPS)
    assert np.abs(w - w_sync).max() > 1e-3
    np.testing.assert_allclose(history.history["staleness_mean"], [np.mean(taus)], rtol=1e-6)
    assert history.history["staleness_max"] == [workers - 1]


def test_dc_optimizer_compensates_with_published_stale_weights():
    strategy = SimulatedAsyncStrategy(3)
    model, _, _ = _fit(strategy, lambda: DCSGD(LR, lambda_=3.0))
    taus = [min(2, t) for t in range(STEPS)]
    w, b = _np_reference(taus, lam=3.0)
    np.testing.assert_allclose(model.get_weights()[0], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_weights()[1], b, rtol=1e-5, atol=1e-6)
    w_plain, _ = _np_reference(taus)
    assert np.abs(w - w_plain).max() > 1e-4


def test_staleness_scaled_sgd_steps_by_inverse_tau():
    strategy = SimulatedAsyncStrategy(4)
    model, _, _ = _fit(strategy, lambda: StalenessScaled(keras.optimizers.SGD(LR), "inverse"))
    taus = [min(3, t) for t in range(STEPS)]
    w, b = _np_reference(taus, factor=lambda tau: 1.0 / max(1, tau))
    np.testing.assert_allclose(model.get_weights()[0], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_weights()[1], b, rtol=1e-5, atol=1e-6)


class ApplyModel(keras.Model):
    """A custom train_step that calls optimizer.apply (not apply_gradients)."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return {"loss": loss}


def test_custom_train_step_calling_apply_is_simulated_too():
    def make():
        model = ApplyModel()
        model(np.zeros((1, 3), np.float32))
        model.set_weights(_init())
        return model

    model, _, history = _fit(SimulatedAsyncStrategy(3), lambda: keras.optimizers.SGD(LR),
                             model_fn=make)
    w, b = _np_reference([min(2, t) for t in range(STEPS)])
    np.testing.assert_allclose(model.get_weights()[0], w, rtol=1e-5, atol=1e-6)
    assert history.history["staleness_max"] == [2.0]


def _mlp():
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(6, activation="relu"),
                             keras.layers.Dense(2)])


@pytest.mark.parametrize("jit", [False, True])
def test_one_worker_equals_plain_training(jit):
    adam = lambda: keras.optimizers.Adam(0.01)  # noqa: E731
    simulated, _, history = _fit(SimulatedAsyncStrategy(1), adam, jit_compile=jit,
                                 epochs=2, model_fn=_mlp)
    plain, _, plain_history = _fit(tf.distribute.OneDeviceStrategy("/cpu:0"), adam,
                                   jit_compile=jit, epochs=2, model_fn=_mlp)
    for a, b in zip(simulated.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert history.history["loss"] == plain_history.history["loss"]
    assert history.history["staleness_max"] == [0.0, 0.0]


def _random_taus(seed, max_staleness=4):
    strategy = SimulatedAsyncStrategy(8, "random", max_staleness=max_staleness, seed=seed)
    model, optimizer, history = _fit(strategy, lambda: TauRecorder(LR))
    return optimizer.taus.numpy()[:STEPS], model.get_weights(), history


def test_random_staleness_is_seeded_and_bounded():
    taus_a, weights_a, history = _random_taus(seed=5)
    taus_b, weights_b, _ = _random_taus(seed=5)
    taus_c, _, _ = _random_taus(seed=6)
    np.testing.assert_array_equal(taus_a, taus_b)
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(taus_a, taus_c)
    assert all(0 <= tau <= min(4, t) for t, tau in enumerate(taus_a))
    assert len(set(taus_a.tolist())) > 2  # really random, not constant
    np.testing.assert_allclose(history.history["staleness_mean"], [taus_a.mean()], rtol=1e-6)
    # ... and the gradients were taken at those staleness values.
    w, b = _np_reference(taus_a.tolist())
    np.testing.assert_allclose(weights_a[0], w, rtol=1e-5, atol=1e-6)


def test_ring_buffer_holds_max_staleness_plus_one_snapshots():
    strategy = SimulatedAsyncStrategy(16, "random", max_staleness=3, seed=0)
    model, _, _ = _fit(strategy, lambda: keras.optimizers.SGD(LR))
    rings = strategy.snapshot_variables
    assert len(rings) == len(model.trainable_variables)
    for ring, variable in zip(rings, model.trainable_variables):
        assert tuple(ring.shape) == (4, *variable.shape)
    x, y = _linear_data()
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)  # more steps: no growth
    assert strategy.snapshot_variables == rings
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert sum(int(np.prod(r.shape)) for r in strategy.snapshot_variables) == 4 * params


def test_evaluate_and_predict_use_live_weights():
    strategy = SimulatedAsyncStrategy(4)
    model, _, _ = _fit(strategy, lambda: keras.optimizers.SGD(LR))
    x, y = _linear_data()
    w, b = model.get_weights()
    np.testing.assert_allclose(model.predict(x, verbose=0), x @ w + b, rtol=1e-5, atol=1e-5)
    loss = model.evaluate(x, y, verbose=0)
    np.testing.assert_allclose(loss, np.mean((x @ w + b - y) ** 2), rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,error,argument",
    [
        ({"num_workers": 0}, ValueError, "num_workers"),
        ({"num_workers": 2.0}, TypeError, "num_workers"),
        ({"num_workers": 2, "staleness": "fifo"}, ValueError, "staleness"),
        ({"num_workers": 2, "max_staleness": -1}, ValueError, "max_staleness"),
        ({"num_workers": 2, "max_staleness": 1.5}, TypeError, "max_staleness"),
        ({"num_workers": 2, "seed": "x"}, TypeError, "seed"),
    ],
)
def test_bad_arguments(kwargs, error, argument):
    with pytest.raises(error, match=argument):
        SimulatedAsyncStrategy(**kwargs)
