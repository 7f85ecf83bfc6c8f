"""StalenessScaled: equals its inner optimizer at τ = 0, scales the inner's
step by f(τ) (NumPy reference), serializes with its inner optimizer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_async import staleness
from tf_async.keras_optimizers import DCAdam, StalenessScaled
from tf_async.keras_optimizers.staleness_scaled import staleness_factor

STEPS = 50
BATCH = 8


def _data():
    rng = np.random.RandomState(0)
    return rng.randn(STEPS * BATCH, 6).astype("float32"), rng.randint(0, 3, STEPS * BATCH)


def _model():
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
    )


def _fit(make_optimizer, strategy=None, jit_compile=False):
    x, y = _data()
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = _model()
        optimizer = make_optimizer()
        model.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit_compile)
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    return model.get_weights(), optimizer


INNERS = {
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.01),
}


@pytest.mark.parametrize("policy", ["inverse", "inverse_sqrt", "exp"])
def test_equals_inner_eager_without_context(policy):
    rng = np.random.RandomState(1)
    init = rng.randn(4, 3).astype("float32")
    results = []
    for wrap in (True, False):
        variable = keras.Variable(init)
        inner = INNERS["adam"]()
        optimizer = StalenessScaled(inner, policy=policy, beta=0.3) if wrap else inner
        grad_rng = np.random.RandomState(2)
        for _ in range(STEPS):
            optimizer.apply([tf.constant(grad_rng.randn(4, 3).astype("float32"))], [variable])
        results.append(variable.numpy())
        assert int(optimizer.iterations.numpy()) == STEPS
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("inner", ["sgd_nesterov", "adamw"])
def test_equals_inner_fit_mirrored(inner, logical_devices):
    # ReductionToOneDevice: each new MirroredStrategy restarts TF's collective
    # instance keys, so collective all-reduces of differently shaped gradients
    # in one pytest process collide ("Shape mismatch in the collective").
    strategy = tf.distribute.MirroredStrategy(
        logical_devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    wrapped, _ = _fit(lambda: StalenessScaled(INNERS[inner](), "inverse"), strategy)
    plain, _ = _fit(INNERS[inner], strategy)
    for a, b in zip(wrapped, plain):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_equals_inner_fit_jit():
    wrapped, optimizer = _fit(lambda: StalenessScaled(INNERS["adam"](), "exp", beta=0.5),
                              jit_compile=True)
    plain, _ = _fit(INNERS["adam"], jit_compile=True)
    for a, b in zip(wrapped, plain):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert int(optimizer.iterations.numpy()) == STEPS


@pytest.mark.parametrize(
    "policy,beta,expected",
    [
        ("inverse", 0.0, [1, 1, 1 / 2, 1 / 5]),
        ("inverse_sqrt", 0.0, [1, 1, 2**-0.5, 5**-0.5]),
        ("exp", 0.25, [1, np.exp(-0.25), np.exp(-0.5), np.exp(-1.25)]),
    ],
)
def test_policy_factors(policy, beta, expected):
    got = [float(staleness_factor(t, policy, beta)) for t in (0, 1, 2, 5)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def _np_adam_scaled(w, grads, factors, lr, b1=0.9, b2=0.999, eps=1e-7):
    w = w.astype(np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, (g, f) in enumerate(zip(grads, factors), start=1):
        m = m + (g - m) * (1 - b1)
        v = v + (g * g - v) * (1 - b2)
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        w = w - f * alpha * m / (np.sqrt(v) + eps)
    return w


def _np_momentum_scaled(w, grads, factors, lr, momentum):
    w = w.astype(np.float64)
    velocity = np.zeros_like(w)
    for g, f in zip(grads, factors):
        velocity = momentum * velocity - lr * g
        w = w + f * velocity
    return w


TAUS = [0, 1, 3, 3, 7, 2, 0, 5, 3, 3]


@pytest.mark.parametrize(
    "inner_name,policy,beta,jit",
    [("adam", "inverse", 0.0, False), ("adam", "exp", 0.3, True),
     ("momentum", "inverse_sqrt", 0.0, False)],
)
def test_step_scaled_by_policy_matches_numpy(inner_name, policy, beta, jit):
    init = np.random.RandomState(0).randn(5, 2).astype("float32")
    inner = (keras.optimizers.Adam(0.05) if inner_name == "adam"
             else keras.optimizers.SGD(0.05, momentum=0.9))
    optimizer = StalenessScaled(inner, policy=policy, beta=beta)
    variable = keras.Variable(init)
    optimizer.build([variable])

    @tf.function(jit_compile=jit)
    def step(grad, tau):
        with staleness.publish(tau, [variable], [tf.zeros_like(grad)]):
            optimizer.apply([grad], [variable])

    rng = np.random.RandomState(4)
    grads = [rng.randn(5, 2).astype("float32") for _ in TAUS]
    for g, tau in zip(grads, TAUS):
        step(tf.constant(g), tf.constant(tau, tf.int64))
    factors = [float(staleness_factor(t, policy, beta)) for t in TAUS]
    if inner_name == "adam":
        expected = _np_adam_scaled(init, grads, factors, 0.05)
        unscaled = _np_adam_scaled(init, grads, [1.0] * len(TAUS), 0.05)
    else:
        expected = _np_momentum_scaled(init, grads, factors, 0.05, 0.9)
        unscaled = _np_momentum_scaled(init, grads, [1.0] * len(TAUS), 0.05, 0.9)
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(variable.numpy() - unscaled).max() > 1e-2
    assert int(optimizer.iterations.numpy()) == len(TAUS)


def test_wraps_dc_optimizer_and_save_load_round_trip(tmp_path):
    x, y = _data()
    model = _model()
    model.compile(
        optimizer=StalenessScaled(DCAdam(0.01, lambda_=0.1, weight_decay=0.01),
                                  policy="exp", beta=0.2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x[:40], y[:40], batch_size=BATCH, verbose=0, shuffle=False)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    optimizer = loaded.optimizer
    assert isinstance(optimizer, StalenessScaled)
    assert isinstance(optimizer.inner_optimizer, DCAdam)
    assert optimizer.get_config() == model.optimizer.get_config()
    assert optimizer.inner_optimizer.lambda_ == 0.1
    assert len(optimizer.variables) == len(model.optimizer.variables)
    for a, b in zip(optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(optimizer.iterations.numpy()) == 5
    model.fit(x[40:80], y[40:80], batch_size=BATCH, verbose=0, shuffle=False)
    loaded.fit(x[40:80], y[40:80], batch_size=BATCH, verbose=0, shuffle=False)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_learning_rate_is_the_inner_one():
    inner = keras.optimizers.Adam(0.01)
    optimizer = StalenessScaled(inner)
    np.testing.assert_allclose(float(optimizer.learning_rate.numpy()), 0.01)
    optimizer.learning_rate = 0.002
    np.testing.assert_allclose(float(inner.learning_rate.numpy()), 0.002)


@pytest.mark.parametrize(
    "make,error,argument",
    [
        (lambda: StalenessScaled("adam"), TypeError, "inner"),
        (lambda: StalenessScaled(keras.optimizers.SGD(), policy="linear"), ValueError, "policy"),
        (lambda: StalenessScaled(keras.optimizers.SGD(), "exp", beta=1.0), ValueError, "beta"),
        (lambda: StalenessScaled(keras.optimizers.SGD(), "exp", beta=-0.1), ValueError, "beta"),
        (lambda: StalenessScaled(keras.optimizers.SGD(), clipnorm=1.0), ValueError, "inner"),
    ],
)
def test_bad_arguments_raise_at_construction(make, error, argument):
    with pytest.raises(error, match=argument):
        make()
