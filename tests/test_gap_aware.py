"""GapAware: equals its inner optimizer at τ = 0 (bit for bit), divides the
stale gradient by G = 1 + |w_now − w_read| / Ĉ (NumPy reference, SGD-momentum
and Adam, eager and jit), row-sparse on tables, serializes, fits with jit."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_async import staleness
from tf_async.keras_optimizers import GapAware
from tf_async.strategies import SimulatedAsyncStrategy

INNERS = {
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.01),
}


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_equals_inner_bit_for_bit_at_tau_zero(inner):
    rng = np.random.RandomState(1)
    init = rng.randn(4, 3).astype("float32")
    grads = [rng.randn(4, 3).astype("float32") for _ in range(20)]
    results = []
    for mode in ("plain", "no_context", "zero_gap"):
        variable = keras.Variable(init)
        base = INNERS[inner]()
        optimizer = base if mode == "plain" else GapAware(base)
        for g in grads:
            if mode == "zero_gap":  # published, read == current: G = 1
                with staleness.publish(0, [variable], [variable.value.read_value()]):
                    optimizer.apply([tf.constant(g)], [variable])
            else:
                optimizer.apply([tf.constant(g)], [variable])
        results.append(variable.numpy())
    np.testing.assert_array_equal(results[1], results[0])
    np.testing.assert_array_equal(results[2], results[0])


def _np_gap_aware(init, grads, taus, kind, lr, beta, eps=1e-12, momentum=0.9):
    """NumPy transcription: G = 1 + |w − w_read| / (C/(1−β^k) + ε); g/G into
    SGD-momentum or Adam; C ← βC + (1−β)|Δw|. w_read = weights τ applies ago."""
    w = init.astype(np.float64)
    history = [w.copy()]
    c = np.zeros_like(w)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for k, (g, tau) in enumerate(zip(grads, taus)):
        w_read = history[max(0, k - tau)]
        c_hat = c / (1 - beta**k) if k > 0 else np.zeros_like(c)
        penalty = 1 + np.abs(w - w_read) / (c_hat + eps)
        g = g / penalty
        if kind == "momentum":
            m = momentum * m - lr * g
            new = w + m
        else:
            t = k + 1
            m = m + (g - m) * 0.1
            v = v + (g * g - v) * 0.001
            alpha = lr * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
            new = w - alpha * m / (np.sqrt(v) + 1e-7)
        c = beta * c + (1 - beta) * np.abs(new - w)
        w = new
        history.append(w.copy())
    return w


TAUS = [0, 1, 2, 3, 3, 3, 5, 1, 3, 3, 3, 0]


@pytest.mark.parametrize("kind,jit", [("momentum", False), ("adam", True)])
def test_penalty_matches_numpy_with_stale_reads(kind, jit):
    rng = np.random.RandomState(0)
    init = rng.randn(5, 2).astype("float32")
    grads = [rng.randn(5, 2).astype("float32") for _ in TAUS]
    inner = (keras.optimizers.SGD(0.05, momentum=0.9) if kind == "momentum"
             else keras.optimizers.Adam(0.05))
    optimizer = GapAware(inner, step_average=0.9)
    variable = keras.Variable(init)
    optimizer.build([variable])

    @tf.function(jit_compile=jit)
    def step(grad, tau, read):
        with staleness.publish(tau, [variable], [read]):
            optimizer.apply([grad], [variable])

    history = [init]
    for k, (g, tau) in enumerate(zip(grads, TAUS)):
        step(tf.constant(g), tf.constant(tau, tf.int64),
             tf.constant(history[max(0, k - tau)]))
        history.append(variable.numpy())
    expected = _np_gap_aware(init, grads, TAUS, kind, 0.05, 0.9)
    fresh = _np_gap_aware(init, grads, [0] * len(TAUS), kind, 0.05, 0.9)
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected - fresh).max() > 1e-2  # the penalty mattered
    assert int(optimizer.iterations.numpy()) == len(TAUS)


def test_table_rows_penalised_on_touched_rows_only():
    """SGD() on a table: row-sparse gradient (duplicate ids summed), G and C on
    the touched rows; untouched rows keep weights and C."""
    rng = np.random.RandomState(3)
    init = rng.randn(6, 2).astype("float32")
    table = keras.Variable(init)
    optimizer = GapAware(keras.optimizers.SGD(0.1), step_average=0.5)
    optimizer.build([table])
    ids_per_step = [[1, 3, 1], [3, 4], [1, 4, 4]]
    w = init.astype(np.float64)
    c = np.zeros_like(w)
    history = [init]
    for k, ids in enumerate(ids_per_step):
        values = rng.randn(len(ids), 2).astype("float32")
        grad = tf.IndexedSlices(tf.constant(values), tf.constant(ids), tf.constant([6, 2]))
        read = history[max(0, k - 1)]
        unique = sorted(set(ids))
        read_rows = tf.IndexedSlices(tf.constant(read[unique]), tf.constant(unique))
        with staleness.publish(1, [table], [read_rows]):
            optimizer.apply([grad], [table])
        history.append(table.numpy())
        dense = np.zeros_like(w)
        np.add.at(dense, ids, values)
        c_hat = c / (1 - 0.5**k) if k else np.zeros_like(c)
        new = w.copy()
        new[unique] = w[unique] - 0.1 * dense[unique] / (
            1 + np.abs(w[unique] - read[unique]) / (c_hat[unique] + 1e-12))
        c[unique] = 0.5 * c[unique] + 0.5 * np.abs(new[unique] - w[unique])
        w = new
    np.testing.assert_allclose(table.numpy(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(optimizer.average_steps[0].numpy(), c, rtol=1e-5, atol=1e-7)
    assert np.all(optimizer.average_steps[0].numpy()[[0, 2, 5]] == 0)


def _model():
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])


def _fit(make_optimizer, strategy, jit_compile, steps=24):
    rng = np.random.RandomState(0)
    x, y = rng.randn(steps * 4, 6).astype("float32"), rng.randint(0, 3, steps * 4)
    with strategy.scope():
        model = _model()
        model.compile(make_optimizer(),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit_compile)
    model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    return model


def test_one_simulated_worker_jit_equals_keras_adamw():
    plain = _fit(INNERS["adamw"], tf.distribute.OneDeviceStrategy("/cpu:0"), True)
    wrapped = _fit(lambda: GapAware(INNERS["adamw"]()), SimulatedAsyncStrategy(1), True)
    for a, b in zip(wrapped.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_simulated_async_fit_jit_equals_eager_and_save_load(tmp_path):
    make = lambda: GapAware(INNERS["sgd_nesterov"](), step_average=0.95)  # noqa: E731
    jit = _fit(make, SimulatedAsyncStrategy(4), True)
    eager = _fit(make, SimulatedAsyncStrategy(4), False)
    for a, b in zip(jit.get_weights(), eager.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(np.abs(eager.optimizer.average_steps[0].numpy()).max()) > 0
    config = eager.optimizer.get_config()
    clone = GapAware.from_config(config)
    assert clone.get_config() == config
    assert clone.inner_optimizer.get_config() == eager.optimizer.inner_optimizer.get_config()
    path = str(tmp_path / "model.keras")
    eager.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, GapAware)
    assert loaded.optimizer.step_average == 0.95
    assert len(loaded.optimizer.variables) == len(eager.optimizer.variables)
    for a, b in zip(loaded.optimizer.variables, eager.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize(
    "make,error,argument",
    [
        (lambda: GapAware("adam"), TypeError, "inner"),
        (lambda: GapAware(keras.optimizers.SGD(), step_average=1.0), ValueError, "step_average"),
        (lambda: GapAware(keras.optimizers.SGD(), epsilon=0.0), ValueError, "epsilon"),
        (lambda: GapAware(keras.optimizers.SGD(), learning_rate=0.1), ValueError, "inner"),
    ],
)
def test_bad_arguments_raise_at_construction(make, error, argument):
    with pytest.raises(error, match=argument):
        make()
