"""DiLoCo under LocalUpdateStrategy vs a NumPy loop written from the paper.

Douillard et al. 2023 (DiLoCo), Algorithm 1: every replica i runs H inner
AdamW steps from the shared centre θ with ITS OWN AdamW state (never
communicated, never reset); then the outer gradient Δ = θ − mean_i θ_i drives
an outer Nesterov SGD (PyTorch ``SGD(lr=0.7, momentum=0.9, nesterov=True)``):
``m ← μm + Δ``; ``θ ← θ − η(Δ + μm)``; every replica restarts from θ.

The reference below is that loop in float64 NumPy (a 2-layer tanh MLP, MSE,
hand-written gradients; Keras' AdamW: decoupled decay ``w ← w − lr·wd·w``
before the Adam step, bias-corrected step size). It also checks that the
comparison can fail: the reference without outer momentum, with the replicas'
AdamW state averaged at every outer step, or with the outer step's sign
flipped, is far from what the strategy did.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_async.strategies import LocalUpdateStrategy

REPLICAS = 2
PER_REPLICA = 16
H = 3
OUTER_STEPS = 3
LR, WD, B1, B2, EPS = 0.01, 0.05, 0.9, 0.999, 1e-7
OUTER_LR, OUTER_MU = 0.7, 0.9


def _data():
    rng = np.random.default_rng(0)
    n = REPLICAS * PER_REPLICA * H * OUTER_STEPS
    x = rng.normal(size=(n, 5)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(5, 1))).astype("float32")
    return x, y


def _grads(params, x, y):
    """Gradient of mean((tanh(x W1 + b1) W2 + b2 − y)²) w.r.t. [W1, b1, W2, b2]."""
    w1, b1, w2, b2 = params
    h = np.tanh(x @ w1 + b1)
    err = h @ w2 + b2 - y
    d_out = 2.0 * err / len(x)
    d_h = (d_out @ w2.T) * (1.0 - h * h)
    return [x.T @ d_h, d_h.sum(0), h.T @ d_out, d_out.sum(0)]


def reference_diloco(initial, x, y, outer_momentum=OUTER_MU, average_inner_state=False,
                     outer_sign=1.0):
    """θ after each outer step, and each replica's weights after the first
    inner step of the second period (the replicas differ there)."""
    theta = [p.astype(np.float64) for p in initial]
    outer_m = [np.zeros_like(p) for p in theta]
    adam = [([np.zeros_like(p) for p in theta], [np.zeros_like(p) for p in theta])
            for _ in range(REPLICAS)]
    t = 0
    centres, mid_period = [], None
    for outer in range(OUTER_STEPS):
        replicas = [[p.copy() for p in theta] for _ in range(REPLICAS)]
        for inner in range(H):
            step = outer * H + inner
            t += 1
            for i in range(REPLICAS):
                # Global batch `step`, split over replicas in order.
                lo = (step * REPLICAS + i) * PER_REPLICA
                g = _grads(replicas[i], x[lo:lo + PER_REPLICA], y[lo:lo + PER_REPLICA])
                m, v = adam[i]
                alpha = LR * np.sqrt(1 - B2 ** t) / (1 - B1 ** t)
                for k, w in enumerate(replicas[i]):
                    w -= w * WD * LR  # AdamW's decoupled decay, before the step
                    m[k] += (g[k] - m[k]) * (1 - B1)
                    v[k] += (g[k] ** 2 - v[k]) * (1 - B2)
                    w -= m[k] * alpha / (np.sqrt(v[k]) + EPS)
            if outer == 1 and inner == 0:
                mid_period = [[w.copy() for w in r] for r in replicas]
        for k in range(len(theta)):
            delta = outer_sign * (theta[k] - np.mean([r[k] for r in replicas], axis=0))
            outer_m[k] = outer_momentum * outer_m[k] + delta
            theta[k] = theta[k] - OUTER_LR * (delta + outer_momentum * outer_m[k])
        if average_inner_state:
            for slot in (0, 1):
                for k in range(len(theta)):
                    mean = np.mean([adam[i][slot][k] for i in range(REPLICAS)], axis=0)
                    for i in range(REPLICAS):
                        adam[i][slot][k] = mean.copy()
        centres.append([p.copy() for p in theta])
    return centres, mid_period


def _components(strategy, model):
    return [[c.numpy() for c in strategy.experimental_local_results(w.value)]
            for w in model.trainable_weights]


def _max_diff(a, b):
    return max(float(np.abs(np.asarray(p) - np.asarray(q)).max()) for p, q in zip(a, b))


def test_diloco_matches_a_reference_loop_with_local_adamw_state(logical_devices):
    x, y = _data()
    base = tf.distribute.MirroredStrategy(
        logical_devices[:REPLICAS], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    strategy = LocalUpdateStrategy(base, sync_every=H, averaging="diloco",
                                   outer_learning_rate=OUTER_LR, outer_momentum=OUTER_MU)
    with strategy.scope():
        keras.utils.set_random_seed(2)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.AdamW(LR, weight_decay=WD, beta_1=B1,
                                                       beta_2=B2, epsilon=EPS), loss="mse")
    initial = model.get_weights()
    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen[batch + 1] = _components(strategy, model)

    model.fit(x, y, batch_size=REPLICAS * PER_REPLICA, epochs=1, shuffle=False, verbose=0,
              callbacks=[Probe()])
    assert int(strategy.sync_count.numpy()) == OUTER_STEPS

    centres, mid_period = reference_diloco(initial, x, y)
    for outer, centre in enumerate(centres):
        components = seen[(outer + 1) * H]
        for replica in range(REPLICAS):  # after a sync every replica holds θ
            assert _max_diff([c[replica] for c in components], centre) < 1e-5, outer
    # Inside a period each replica moved with its own AdamW state.
    components = seen[H + 1]
    for replica in range(REPLICAS):
        assert _max_diff([c[replica] for c in components], mid_period[replica]) < 1e-5
    assert _max_diff([c[0] for c in components], [c[1] for c in components]) > 1e-3

    # The comparison can fail: each mutation of the algorithm lands far away.
    final = [c[0] for c in seen[OUTER_STEPS * H]]
    for mutation in (dict(outer_momentum=0.0), dict(average_inner_state=True),
                     dict(outer_sign=-1.0)):
        mutated, _ = reference_diloco(initial, x, y, **mutation)
        assert _max_diff(final, mutated[-1]) > 1e-3, mutation


@pytest.mark.parametrize("kwargs, reference_kwargs", [
    (dict(outer_momentum=0.0), dict(outer_momentum=0.0)),
    (dict(average_optimizer_state=True), dict(average_inner_state=True)),
], ids=["no_outer_momentum", "averaged_adamw_state"])
def test_the_reference_rejects_a_mutated_strategy(logical_devices, kwargs, reference_kwargs):
    """The strategy with outer momentum off, or with AdamW state averaged, is
    not the paper's algorithm: the reference loop tells it apart, and the
    reference with the same change matches it."""
    x, y = _data()
    base = tf.distribute.MirroredStrategy(
        logical_devices[:REPLICAS], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    options = dict(sync_every=H, averaging="diloco", outer_learning_rate=OUTER_LR,
                   outer_momentum=OUTER_MU)
    options.update(kwargs)
    strategy = LocalUpdateStrategy(base, **options)
    with strategy.scope():
        keras.utils.set_random_seed(2)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.AdamW(LR, weight_decay=WD, beta_1=B1,
                                                       beta_2=B2, epsilon=EPS), loss="mse")
    initial = model.get_weights()
    model.fit(x, y, batch_size=REPLICAS * PER_REPLICA, epochs=1, shuffle=False, verbose=0)
    centres, _ = reference_diloco(initial, x, y)
    assert _max_diff(model.get_weights(), centres[-1]) > 1e-3
    same, _ = reference_diloco(initial, x, y, **reference_kwargs)
    assert _max_diff(model.get_weights(), same[-1]) < 1e-5
