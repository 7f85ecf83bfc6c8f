"""DCSGD / DCAdam: equal to Keras SGD/Adam/AdamW at τ = 0, match a NumPy
reference of DC-ASGD compensation at τ > 0, exact global step, serialization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_async import staleness
from tf_async.keras_optimizers import DCAdam, DCSGD, AdamAsync

# (plugin factory, stock factory): the plugin must equal the stock optimizer.
EQUAL_CASES = {
    "sgd": (lambda: DCSGD(0.05), lambda: keras.optimizers.SGD(0.05)),
    "sgd_momentum_adaptive": (
        lambda: DCSGD(0.05, momentum=0.9, lambda_=2.0, adaptive=True),
        lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    ),
    "sgd_nesterov": (
        lambda: DCSGD(0.05, momentum=0.8, nesterov=True, lambda_=0.5),
        lambda: keras.optimizers.SGD(0.05, momentum=0.8, nesterov=True),
    ),
    "adam": (lambda: DCAdam(0.01, lambda_=1.0), lambda: keras.optimizers.Adam(0.01)),
    "adam_amsgrad_adaptive": (
        lambda: DCAdam(0.01, amsgrad=True, adaptive=True),
        lambda: keras.optimizers.Adam(0.01, amsgrad=True),
    ),
    "adamw": (
        lambda: DCAdam(0.01, weight_decay=0.004),
        lambda: keras.optimizers.AdamW(0.01, weight_decay=0.004),
    ),
}

STEPS = 50
BATCH = 8


def _data():
    rng = np.random.RandomState(0)
    x = rng.randn(STEPS * BATCH, 6).astype("float32")
    y = rng.randint(0, 3, STEPS * BATCH)
    return x, y


def _model():
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
    )


def _fit_weights(make_optimizer, strategy=None, jit_compile=False):
    x, y = _data()
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = _model()
        optimizer = make_optimizer()
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile,
        )
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return [w for w in model.get_weights()], optimizer


def _assert_same(a, b, atol=1e-6):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        np.testing.assert_allclose(p, q, rtol=0, atol=atol)


@pytest.mark.parametrize("case", sorted(EQUAL_CASES))
def test_equals_stock_optimizer_eager_apply(case):
    plugin_factory, stock_factory = EQUAL_CASES[case]
    rng = np.random.RandomState(1)
    init = [rng.randn(3, 4).astype("float32"), rng.randn(4).astype("float32")]
    results = []
    for factory in (plugin_factory, stock_factory):
        variables = [keras.Variable(v) for v in init]
        optimizer = factory()
        grads_rng = np.random.RandomState(2)
        for _ in range(STEPS):
            grads = [tf.constant(grads_rng.randn(*v.shape).astype("float32")) for v in init]
            optimizer.apply(grads, variables)
        results.append([v.numpy() for v in variables])
    _assert_same(*results)


@pytest.mark.parametrize("case", ["sgd_nesterov", "sgd_momentum_adaptive", "adam", "adamw"])
def test_equals_stock_optimizer_fit_mirrored(case, logical_devices):
    # ReductionToOneDevice: each new MirroredStrategy restarts TF's collective
    # instance keys, so collective all-reduces of differently shaped gradients
    # in one pytest process collide ("Shape mismatch in the collective").
    strategy = tf.distribute.MirroredStrategy(
        logical_devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    assert strategy.num_replicas_in_sync == 4
    plugin_factory, stock_factory = EQUAL_CASES[case]
    plugin_weights, plugin = _fit_weights(plugin_factory, strategy)
    stock_weights, _ = _fit_weights(stock_factory, strategy)
    _assert_same(plugin_weights, stock_weights)
    if isinstance(plugin, DCAdam):  # one increment per step, not per replica
        assert int(plugin.global_step.numpy()) == STEPS


@pytest.mark.parametrize("case", ["sgd_nesterov", "adam_amsgrad_adaptive", "adamw"])
def test_equals_stock_optimizer_fit_jit(case):
    plugin_factory, stock_factory = EQUAL_CASES[case]
    plugin_weights, _ = _fit_weights(plugin_factory, jit_compile=True)
    stock_weights, _ = _fit_weights(stock_factory, jit_compile=True)
    _assert_same(plugin_weights, stock_weights)


# ---------------------------------------------------------------- NumPy reference


def _np_dcsgd(w, grads, w_reads, lr, momentum, nesterov, lam, adaptive, msm, eps):
    w = w.astype(np.float64)
    velocity = np.zeros_like(w)
    meansq = np.zeros_like(w)
    history = []
    for g, w_read in zip(grads, w_reads):
        history.append(w.copy())
        g = g.astype(np.float64)
        if adaptive:
            meansq = msm * meansq + (1 - msm) * g * g
            lam_t = lam / np.sqrt(meansq + eps)
        else:
            lam_t = lam
        g = g + lam_t * g * g * (w - w_read)
        if momentum:
            velocity = momentum * velocity - lr * g
            w = w + (momentum * velocity - lr * g if nesterov else velocity)
        else:
            w = w - lr * g
    return w


def _np_dcadam(w, grads, w_reads, lr, b1, b2, eps, lam, adaptive, weight_decay=None):
    w = w.astype(np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, (g, w_read) in enumerate(zip(grads, w_reads), start=1):
        g = g.astype(np.float64)
        if weight_decay:
            w = w - w * weight_decay * lr  # Keras: decay before the update step
        delta = w - w_read
        lam_t = lam / np.sqrt(b2 * v + (1 - b2) * g * g + eps) if adaptive else lam
        g = g + lam_t * g * g * delta
        m = m + (g - m) * (1 - b1)
        v = v + (g * g - v) * (1 - b2)
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        w = w - alpha * m / (np.sqrt(v) + eps)
    return w


def _run_stale(optimizer, init, taus, seed=3, jit=False):
    """Applies gradients with published τ and w_read = weights τ updates ago.

    Returns final weights, the gradients and the w_read values used.
    """
    variable = keras.Variable(init)
    optimizer.build([variable])
    rng = np.random.RandomState(seed)
    history = [init.copy()]
    grads, w_reads = [], []

    @tf.function(jit_compile=jit)
    def step(grad, tau, w_read):
        with staleness.publish(tau, [variable], [w_read]):
            optimizer.apply([grad], [variable])

    for tau in taus:
        g = rng.randn(*init.shape).astype("float32")
        w_read = history[max(0, len(history) - 1 - tau)]
        step(tf.constant(g), tf.constant(tau, tf.int64), tf.constant(w_read))
        grads.append(g)
        w_reads.append(w_read)
        history.append(variable.numpy())
    return variable.numpy(), grads, w_reads


TAUS = [0, 1, 2, 3, 3, 3, 5, 1, 3, 3, 3, 2]


@pytest.mark.parametrize(
    "momentum,nesterov,adaptive,lam",
    [(0.0, False, False, 0.5), (0.9, False, False, 2.0), (0.9, True, True, 0.3)],
)
def test_dcsgd_compensation_matches_numpy(momentum, nesterov, adaptive, lam):
    init = np.random.RandomState(0).randn(5, 3).astype("float32")
    optimizer = DCSGD(0.1, momentum=momentum, nesterov=nesterov, lambda_=lam,
                      adaptive=adaptive, meansq_momentum=0.9, epsilon=1e-6)
    final, grads, w_reads = _run_stale(optimizer, init, TAUS)
    expected = _np_dcsgd(init, grads, w_reads, 0.1, momentum, nesterov, lam, adaptive, 0.9, 1e-6)
    np.testing.assert_allclose(final, expected, rtol=1e-5, atol=1e-5)
    # The compensation changed the result (the test can fail).
    plain = _np_dcsgd(init, grads, w_reads, 0.1, momentum, nesterov, 0.0, False, 0.9, 1e-6)
    assert np.abs(final - plain).max() > 1e-3


@pytest.mark.parametrize(
    "adaptive,lam,weight_decay,jit",
    [(False, 1.0, None, False), (True, 0.5, 0.01, False), (False, 1.0, None, True)],
)
def test_dcadam_compensation_matches_numpy(adaptive, lam, weight_decay, jit):
    init = np.random.RandomState(0).randn(5, 3).astype("float32")
    optimizer = DCAdam(0.05, lambda_=lam, adaptive=adaptive, weight_decay=weight_decay)
    final, grads, w_reads = _run_stale(optimizer, init, TAUS, jit=jit)
    expected = _np_dcadam(init, grads, w_reads, 0.05, 0.9, 0.999, 1e-7, lam, adaptive, weight_decay)
    np.testing.assert_allclose(final, expected, rtol=1e-5, atol=1e-5)
    plain = _np_dcadam(init, grads, w_reads, 0.05, 0.9, 0.999, 1e-7, 0.0, False, weight_decay)
    assert np.abs(final - plain).max() > 1e-3
    assert int(optimizer.global_step.numpy()) == len(TAUS)


def test_dcadam_global_step_is_raw_atomic_increment():
    """The step comes from tf.Variable.assign_add (AssignAddVariableOp), not
    keras.Variable.assign_add (read + assign)."""
    variable = keras.Variable(np.zeros(3, np.float32))
    optimizer = DCAdam(0.01)
    optimizer.build([variable])

    @tf.function
    def step():
        optimizer.apply([tf.ones(3)], [variable])

    ops = {op.type for op in step.get_concrete_function().graph.get_operations()}
    assert "AssignAddVariableOp" in ops
    for _ in range(3):
        step()
    assert int(optimizer.global_step.numpy()) == 3
    assert optimizer.global_step.dtype == "int64"
    assert AdamAsync is DCAdam


# ---------------------------------------------------------------- serialization


@pytest.mark.parametrize(
    "make",
    [
        lambda: DCAdam(0.01, lambda_=0.2, adaptive=True, weight_decay=0.01, amsgrad=True),
        lambda: DCSGD(0.05, momentum=0.9, nesterov=True, lambda_=1.5, adaptive=True,
                      meansq_momentum=0.8, epsilon=1e-5),
    ],
    ids=["dcadam", "dcsgd"],
)
def test_save_load_compiled_model_round_trip(make, tmp_path):
    x, y = _data()
    model = _model()
    model.compile(optimizer=make(),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:40], y[:40], batch_size=BATCH, verbose=0, shuffle=False)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Training continues identically from the restored state.
    model.fit(x[40:80], y[40:80], batch_size=BATCH, verbose=0, shuffle=False)
    loaded.fit(x[40:80], y[40:80], batch_size=BATCH, verbose=0, shuffle=False)
    _assert_same(loaded.get_weights(), model.get_weights())
    config = keras.optimizers.serialize(model.optimizer)
    assert config["registered_name"].startswith("tf_async>")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make,error,argument",
    [
        (lambda: DCSGD(lambda_=-0.1), ValueError, "lambda_"),
        (lambda: DCAdam(lambda_=-1.0), ValueError, "lambda_"),
        (lambda: DCSGD(learning_rate=0.0), ValueError, "learning_rate"),
        (lambda: DCAdam(learning_rate=-1e-3), ValueError, "learning_rate"),
        (lambda: DCSGD(adaptive=True, meansq_momentum=1.0), ValueError, "meansq_momentum"),
        (lambda: DCSGD(meansq_momentum=-0.1), ValueError, "meansq_momentum"),
        (lambda: DCSGD(epsilon=0.0), ValueError, "epsilon"),
        (lambda: DCAdam(epsilon=-1e-7), ValueError, "epsilon"),
        (lambda: DCSGD(lambda_="big"), TypeError, "lambda_"),
        (lambda: DCAdam(beta_1=1.0), ValueError, "beta_1"),
    ],
)
def test_bad_arguments_raise_at_construction(make, error, argument):
    with pytest.raises(error, match=argument):
        make()
