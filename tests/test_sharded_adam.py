"""ShardedAdam (ZeRO-1) against keras.optimizers.Adam / AdamW.

Mirrored strategies here use ``ReductionToOneDevice``: TF 2.21's default
CPU cross-device ops (``CollectiveAllReduce``) cannot serve two
MirroredStrategy objects of different sizes in one process ("joining a group
with size4, but that group has size 2"), nor two of the same size running
different collective sequences. The default collectives are covered in a
fresh process (``test_fit_matches_adam_with_default_collectives``).
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_async.keras_optimizers import ShardedAdam

STEPS = 50
BATCH = 16
LR = 0.01

_STRATEGIES: dict = {}


def strategy_for(num_replicas: int) -> tf.distribute.Strategy:
    """MirroredStrategy over the first N logical CPUs (default strategy for N=1)."""
    if num_replicas == 1:
        return tf.distribute.get_strategy()
    if num_replicas not in _STRATEGIES:
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:num_replicas]
        _STRATEGIES[num_replicas] = tf.distribute.MirroredStrategy(
            devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
    return _STRATEGIES[num_replicas]


def make_model() -> keras.Model:
    """53 parameters (6·5 + 5 + 5·3 + 3): divisible by neither 2 nor 4."""
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )


def make_data(steps: int = STEPS):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * BATCH, 6)).astype("float32")
    y = rng.normal(size=(steps * BATCH, 3)).astype("float32")
    return x, y


def fit(strategy, make_optimizer, jit_compile=False, steps=STEPS, model=None):
    x, y = make_data(steps)
    with strategy.scope():
        model = model or make_model()
        optimizer = make_optimizer()
        model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return model, optimizer


def max_diff(model_a, model_b) -> float:
    return max(
        float(np.max(np.abs(a.numpy() - b.numpy())))
        for a, b in zip(model_a.trainable_weights, model_b.trainable_weights)
    )


VARIANTS = {
    "adam": (lambda: keras.optimizers.Adam(LR), lambda: ShardedAdam(LR)),
    "adamw": (
        lambda: _exclude_bias(keras.optimizers.AdamW(LR, weight_decay=0.05)),
        lambda: _exclude_bias(ShardedAdam(LR, weight_decay=0.05)),
    ),
    "amsgrad": (
        lambda: keras.optimizers.Adam(LR, amsgrad=True, beta_2=0.9),
        lambda: ShardedAdam(LR, amsgrad=True, beta_2=0.9),
    ),
}


def _exclude_bias(optimizer):
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    return optimizer


@pytest.mark.parametrize("num_replicas", [1, 2, 4])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fit_matches_keras_adam(num_replicas, variant):
    make_reference, make_sharded = VARIANTS[variant]
    strategy = strategy_for(num_replicas)
    reference, reference_opt = fit(strategy, make_reference)
    sharded, sharded_opt = fit(strategy, make_sharded)
    assert int(sharded_opt.iterations.numpy()) == STEPS
    assert max_diff(reference, sharded) <= 1e-6
    if num_replicas <= 2:  # 2-term sums: the same bits as Keras' all-reduce
        assert max_diff(reference, sharded) == 0.0
    # The logical state is Adam's state, variable by variable.
    expected = [v.numpy() for v in reference_opt.variables]
    got = sharded_opt.logical_state()
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, atol=1e-6, rtol=0)


def test_fit_matches_keras_adam_jit_one_replica():
    strategy = strategy_for(1)
    reference, _ = fit(strategy, VARIANTS["adamw"][0], jit_compile=True)
    sharded, _ = fit(strategy, VARIANTS["adamw"][1], jit_compile=True)
    assert max_diff(reference, sharded) <= 1e-6


@pytest.mark.parametrize("num_replicas", [2, 4])
def test_each_replica_stores_only_its_slice(num_replicas):
    strategy = strategy_for(num_replicas)
    _, optimizer = fit(strategy, lambda: ShardedAdam(LR, amsgrad=True), steps=2)
    total = 53
    shard = -(-total // num_replicas)
    assert shard * num_replicas - total <= num_replicas - 1
    (group,) = optimizer._groups
    assert group.layout.shard_size == shard
    for name in ("momentum", "velocity", "velocity_hat"):
        components = strategy.experimental_local_results(group.slots[name])
        assert len(components) == num_replicas
        assert {c.device for c in components} == set(strategy.extended.worker_devices)
        assert all(tuple(c.shape) == (shard,) for c in components)
        # Slices hold different values: the state really is partitioned.
        values = [c.numpy() for c in components]
        assert not np.array_equal(values[0], values[1])
    # No full-size slot variables anywhere in the optimizer.
    assert [v.path for v in optimizer.variables] == [
        optimizer.iterations.path,
        optimizer._learning_rate.path,
    ]


def _grads_and_vars(model):
    rng = np.random.default_rng(3)
    return [
        tf.constant(rng.normal(size=v.shape).astype("float32"))
        for v in model.trainable_weights
    ]


@pytest.mark.parametrize("context", ["replica", "cross_replica"])
def test_direct_apply_matches_keras_adam(context):
    """``optimizer.apply`` in ``strategy.run`` and from cross-replica context."""
    strategy = strategy_for(2)
    models = {}
    for name, make in (("adam", VARIANTS["adamw"][0]), ("sharded", VARIANTS["adamw"][1])):
        with strategy.scope():
            model = make_model()
            optimizer = make()
        variables = model.trainable_weights
        grads = _grads_and_vars(model)
        grads[1] = None  # a variable without gradient keeps its value and state

        # Keras Adam's `apply` fails in cross-replica context under Mirrored
        # (maybe_merge_call needs a replica context); its reference runs in
        # replica context with gradients scaled by 1/2, which sum back exactly.
        if context == "replica" or name == "adam":

            @tf.function
            def step():
                def replica_fn():
                    ctx = tf.distribute.get_replica_context()
                    scale = 1.0 / ctx.num_replicas_in_sync
                    optimizer.apply(
                        [None if g is None else g * scale for g in grads], variables
                    )

                strategy.run(replica_fn)

            for _ in range(3):
                step()
        else:
            with strategy.scope():
                for _ in range(3):
                    optimizer.apply(grads, variables)
        models[name] = (model, optimizer)
    (adam_model, adam_opt), (sharded_model, sharded_opt) = models["adam"], models["sharded"]
    assert max_diff(adam_model, sharded_model) <= 1e-6
    np.testing.assert_array_equal(
        sharded_model.trainable_weights[1].numpy(), make_model().trainable_weights[1].numpy()
    )
    for e, g in zip([v.numpy() for v in adam_opt.variables], sharded_opt.logical_state()):
        np.testing.assert_allclose(g, e, atol=1e-6, rtol=0)


@pytest.mark.parametrize("before,after,build_first", [(2, 4, True), (4, 1, False)])
def test_checkpoint_reshards(tmp_path, before, after, build_first):
    """Train k steps with N=before, save, restore with N=after, continue."""
    finals = {}
    for name, make in (("adam", VARIANTS["adam"][0]), ("sharded", VARIANTS["adam"][1])):
        model, optimizer = fit(strategy_for(before), make, steps=20)
        path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
            str(tmp_path / name / "ckpt")
        )
        strategy = strategy_for(after)
        with strategy.scope():
            model = make_model()
            optimizer = make()
            model.compile(optimizer=optimizer, loss="mse")
            if build_first:
                optimizer.build(model.trainable_variables)
            # (otherwise restoration of the optimizer state is deferred to build)
            status = tf.train.Checkpoint(model=model, optimizer=optimizer).restore(path)
        fit(strategy, lambda o=optimizer: o, steps=30, model=model)
        status.assert_consumed()
        assert int(optimizer.iterations.numpy()) == 50
        finals[name] = model
    # Keras Adam's trajectory: bit for bit at N <= 2; at N = 4 the
    # reduce-scatter groups the 4-term sums differently (last-bit effects).
    for a, b in zip(finals["adam"].trainable_weights, finals["sharded"].trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, rtol=0)


def test_checkpoint_holds_logical_state(tmp_path):
    model, optimizer = fit(strategy_for(4), lambda: ShardedAdam(LR), steps=5)
    path = tf.train.Checkpoint(optimizer=optimizer).save(str(tmp_path / "ckpt"))
    saved = dict(tf.train.list_variables(path))
    shapes = [list(v.shape) for v in model.trainable_weights]
    slots = [saved[f"optimizer/_logical_slots/{i}/.ATTRIBUTES/VARIABLE_VALUE"] for i in range(8)]
    assert slots == [s for s in shapes for _ in range(2)]
    reader = tf.train.load_checkpoint(path)
    for i, value in enumerate(optimizer.logical_state()[2:]):
        np.testing.assert_array_equal(
            reader.get_tensor(f"optimizer/_logical_slots/{i}/.ATTRIBUTES/VARIABLE_VALUE"), value
        )


def test_model_save_and_load_across_replica_counts(tmp_path):
    """``model.save`` at N=2, ``load_model`` at N=4; also loadable by keras Adam."""
    path = str(tmp_path / "model.keras")
    model, _ = fit(strategy_for(2), lambda: ShardedAdam(LR, amsgrad=True), steps=10)
    model.save(path)
    reference_path = str(tmp_path / "reference.keras")
    reference, _ = fit(strategy_for(2), lambda: keras.optimizers.Adam(LR, amsgrad=True), steps=10)
    reference.save(reference_path)

    strategy = strategy_for(4)
    with strategy.scope():
        loaded = keras.models.load_model(path)
        reference = keras.models.load_model(reference_path)
    assert isinstance(loaded.optimizer, ShardedAdam)
    assert loaded.optimizer.num_shards == 4
    assert loaded.optimizer.amsgrad
    for e, g in zip([v.numpy() for v in reference.optimizer.variables], loaded.optimizer.logical_state()):
        np.testing.assert_array_equal(g, e)
    fit(strategy, lambda: loaded.optimizer, steps=10, model=loaded)
    fit(strategy, lambda: reference.optimizer, steps=10, model=reference)
    for a, b in zip(reference.trainable_weights, loaded.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, rtol=0)

    # What `model.save` writes is Adam's layout: keras Adam loads it as is.
    store = {}
    loaded.optimizer.save_own_variables(store)
    plain = keras.optimizers.Adam(LR, amsgrad=True)
    plain.build(reference.trainable_variables)
    plain.load_own_variables(store)
    for e, g in zip(loaded.optimizer.logical_state(), [v.numpy() for v in plain.variables]):
        np.testing.assert_array_equal(g, e)


def test_config_round_trip():
    optimizer = ShardedAdam(0.003, beta_1=0.8, beta_2=0.99, epsilon=1e-6, amsgrad=True,
                            weight_decay=0.01, clipnorm=1.0, name="zero1")
    config = optimizer.get_config()
    clone = ShardedAdam.from_config(config)
    assert clone.get_config() == config
    serialized = keras.optimizers.serialize(optimizer)
    assert serialized["registered_name"] == "tf_async>ShardedAdam"
    restored = keras.optimizers.deserialize(serialized)
    assert isinstance(restored, ShardedAdam) and restored.get_config() == config


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"learning_rate": -0.1}, ValueError, "learning_rate"),
        ({"learning_rate": float("nan")}, ValueError, "learning_rate"),
        ({"learning_rate": "fast"}, ValueError, "learning_rate"),
        ({"beta_1": 1.0}, ValueError, r"beta_1.*\[0, 1\)"),
        ({"beta_1": -0.1}, ValueError, "beta_1"),
        ({"beta_2": 1.5}, ValueError, r"beta_2.*\[0, 1\)"),
        ({"beta_2": "0.9"}, TypeError, "beta_2"),
        ({"epsilon": 0.0}, ValueError, "epsilon.*> 0"),
        ({"epsilon": None}, TypeError, "epsilon"),
        ({"amsgrad": "yes"}, TypeError, "amsgrad"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"clipnorm": 1.0, "clipvalue": 1.0}, ValueError, "clipnorm"),
        ({"gradient_accumulation_steps": 2}, ValueError, "gradient_accumulation_steps"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ShardedAdam(**kwargs)


def test_unsupported_strategy_is_named():
    strategy = tf.distribute.experimental.CentralStorageStrategy()
    with strategy.scope():
        with pytest.raises(ValueError, match="CentralStorageStrategy: it keeps every "
                           "variable, the optimizer state included, on one central device"):
            ShardedAdam()


def test_multi_worker_mirrored_is_sharded_over_its_replicas():
    """One-worker MultiWorkerMirroredStrategy (the 2 × 2 run is in
    test_sharded_adam_mwms.py): accepted, N = its replica count."""
    from tf_async.keras_optimizers import sharded_adam

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert sharded_adam._strategy_mode(strategy) == "sharded"
    with strategy.scope():
        assert ShardedAdam().num_shards == strategy.num_replicas_in_sync


def test_created_outside_the_strategy_scope_is_a_clear_error():
    optimizer = ShardedAdam()
    with strategy_for(2).scope():
        model = make_model()
        with pytest.raises(ValueError, match="inside `strategy.scope\\(\\)`"):
            optimizer.build(model.trainable_variables)


def _default_collectives_child(num_replicas: int) -> float:
    """Fresh process: MirroredStrategy with its default cross-device ops."""
    from tests import _harness

    _harness.split_cpu(4)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:num_replicas]
    strategy = tf.distribute.MirroredStrategy(devices)
    reference, _ = fit(strategy, VARIANTS["adamw"][0], steps=20)
    sharded, _ = fit(strategy, VARIANTS["adamw"][1], steps=20)
    return max_diff(reference, sharded)


@pytest.mark.slow
def test_fit_matches_adam_with_default_collectives(fresh_process):
    assert fresh_process(_default_collectives_child, 4, timeout=300) <= 1e-6


def _two_device_local_update():
    from tf_async.strategies import LocalUpdateStrategy

    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    base = tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    return base, LocalUpdateStrategy(base, sync_every=2)


def test_local_update_strategy_is_refused_with_the_reason():
    """Issue 17.1: it used to diverge silently (loss 2.2 -> 9e32 -> NaN)."""
    _, strategy = _two_device_local_update()
    with strategy.scope():
        with pytest.raises(ValueError, match="LocalUpdateStrategy.*own full m and v"):
            ShardedAdam()


def test_strategy_turned_local_update_after_creation_is_refused_at_build():
    base = tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")][:2],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )
    with base.scope():
        model = make_model()
        optimizer = ShardedAdam(LR)
    from tf_async.strategies import LocalUpdateStrategy

    strategy = LocalUpdateStrategy(base, sync_every=2)  # the same object, now local
    with strategy.scope():
        with pytest.raises(ValueError, match="LocalUpdateStrategy"):
            optimizer.build(model.trainable_variables)
