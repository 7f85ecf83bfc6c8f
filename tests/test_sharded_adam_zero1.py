"""ShardedAdam's ZeRO-1 communication, dynamic replica id, EMA (issue 16).

Strategies come from ``tests/test_sharded_adam.py`` (``ReductionToOneDevice``;
see its docstring); TF's collective implementation is covered in a fresh
process there, here (the collective ops one traced step launches) and in
``benchmarks/sharded_adam.py``.
"""

from __future__ import annotations

import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import _harness
from tests.test_sharded_adam import BATCH, LR, fit, make_data, max_diff, strategy_for
from tf_async.keras_optimizers import ShardedAdam, _zero_collectives


def mse(prediction, y):
    return tf.reduce_mean(tf.square(prediction - y))


def make_wide_model() -> keras.Model:
    """707 parameters: padding (<= N - 1 elements) stays under 0.5 %."""
    keras.utils.set_random_seed(2)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(64, activation="tanh"), keras.layers.Dense(3)]
    )


def traced_step_bytes(strategy, make_optimizer):
    """Collective bytes of one traced train step (``optimizer.apply`` in ``run``)."""
    with strategy.scope():
        model = make_wide_model()
        optimizer = make_optimizer()
        optimizer.build(model.trainable_variables)
    x, y = make_data(1)
    step = _harness.apply_step(strategy, model, optimizer, mse)
    with _zero_collectives.count_bytes(strategy) as counter:
        step.get_concrete_function(tf.constant(x[:BATCH]), tf.constant(y[:BATCH]))
    param_bytes = sum(4 * int(np.prod(v.shape)) for v in model.trainable_variables)
    return counter, param_bytes


@pytest.mark.parametrize("num_replicas", [2, 4])
def test_communication_is_one_all_reduce_worth(num_replicas):
    strategy = strategy_for(num_replicas)
    adam, param_bytes = traced_step_bytes(strategy, lambda: keras.optimizers.Adam(LR))
    sharded, _ = traced_step_bytes(strategy, lambda: ShardedAdam(LR))
    # Keras Adam: one all-reduce of the gradients.
    assert adam.by_kind.keys() == {_zero_collectives.ALL_REDUCE}
    assert adam.per_replica(_zero_collectives.ALL_REDUCE) == param_bytes
    # ShardedAdam: a reduce-scatter of the (padded) gradient and an all-gather
    # of the 1/N parameter slice; no all-reduce.
    assert sharded.by_kind.keys() == {
        _zero_collectives.REDUCE_SCATTER, _zero_collectives.ALL_GATHER
    }
    padded = 4 * (-(-param_bytes // 4 // num_replicas)) * num_replicas
    assert sharded.per_replica(_zero_collectives.REDUCE_SCATTER) == padded
    assert sharded.per_replica(_zero_collectives.ALL_GATHER) == padded / num_replicas
    ratio = sharded.wire_bytes(num_replicas) / adam.wire_bytes(num_replicas)
    assert 1.0 <= ratio <= 1.01


def _collective_op_counts(num_replicas: int) -> dict:
    """Fresh process: collective op types in one traced step under TF's default
    CPU cross-device ops (``CollectiveAllReduce``), for Adam and ShardedAdam."""
    _harness.split_cpu(4)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:num_replicas]
    strategy = tf.distribute.MirroredStrategy(devices)
    counts = {}
    for name, make in (("adam", lambda: keras.optimizers.Adam(LR)),
                       ("sharded", lambda: ShardedAdam(LR))):
        with strategy.scope():
            model = make_wide_model()
            optimizer = make()
            optimizer.build(model.trainable_variables)
        step = _harness.apply_step(strategy, model, optimizer, mse)
        spec = tf.TensorSpec([BATCH, 6], tf.float32), tf.TensorSpec([BATCH, 3], tf.float32)
        graph = step.get_concrete_function(*spec).graph
        ops_ = [op.type for op in graph.get_operations() if op.type.startswith("Collective")]
        counts[name] = {kind: ops_.count(kind) for kind in sorted(set(ops_))}
        counts[f"{name}_variables"] = len(model.trainable_variables)
    return counts


@pytest.mark.slow
def test_collectives_are_packed_one_pair_per_step(fresh_process):
    """All variables' gradients travel in one flat buffer: per replica and step
    one all-to-all (the reduce-scatter) and one all-gather, whatever the
    number of variables — as Keras Adam's one packed all-reduce."""
    counts = fresh_process(_collective_op_counts, 4, timeout=300)
    assert counts["adam_variables"] == counts["sharded_variables"] == 4
    assert counts["adam"] == {"CollectiveReduceV2": 4}
    assert counts["sharded"] == {"CollectiveAllToAllV2": 4, "CollectiveGatherV2": 4}


def _force_dynamic_replica_id(monkeypatch):
    """Makes the replica id a non-constant tensor, as on a TPU."""
    seen = []
    static = _zero_collectives.replica_id

    def dynamic(context):
        value = tf.compat.v1.placeholder_with_default(static(context), [])
        seen.append(tf.get_static_value(value))
        return value

    monkeypatch.setattr(_zero_collectives, "replica_id", dynamic)
    return seen


@pytest.mark.parametrize("num_replicas", [2, 4])
def test_dynamic_replica_id_under_mirrored(monkeypatch, num_replicas):
    seen = _force_dynamic_replica_id(monkeypatch)
    strategy = strategy_for(num_replicas)
    make = lambda: ShardedAdam(LR, weight_decay=0.05, amsgrad=True)  # noqa: E731
    sharded, _ = fit(strategy, make, steps=20)
    assert seen and all(value is None for value in seen)
    reference, _ = fit(
        strategy, lambda: keras.optimizers.AdamW(LR, weight_decay=0.05, amsgrad=True), steps=20
    )
    assert max_diff(reference, sharded) <= 1e-6


def test_dynamic_replica_id_under_jit_one_replica(monkeypatch):
    seen = _force_dynamic_replica_id(monkeypatch)
    strategy = strategy_for(1)
    sharded, _ = fit(strategy, lambda: ShardedAdam(LR, use_ema=True), jit_compile=True, steps=20)
    assert seen and all(value is None for value in seen)
    reference, _ = fit(
        strategy, lambda: keras.optimizers.Adam(LR, use_ema=True), jit_compile=True, steps=20
    )
    assert max_diff(reference, sharded) <= 1e-6


@pytest.mark.parametrize("num_replicas", [1, 2, 4])
def test_ema_matches_keras_adam(num_replicas):
    strategy = strategy_for(num_replicas)
    kwargs = dict(use_ema=True, ema_momentum=0.8)
    reference, reference_opt = fit(strategy, lambda: keras.optimizers.Adam(LR, **kwargs))
    sharded, sharded_opt = fit(strategy, lambda: ShardedAdam(LR, **kwargs))
    # fit ends with finalize_variable_values: the model holds the averages.
    assert max_diff(reference, sharded) <= 1e-6
    expected = [v.numpy() for v in reference_opt.variables]
    got = sharded_opt.logical_state()
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, atol=1e-6, rtol=0)
    if num_replicas > 1:
        (group,) = sharded_opt._groups
        components = strategy.experimental_local_results(group.slots["average"])
        assert all(tuple(c.shape) == (group.layout.shard_size,) for c in components)


def test_keras_adam_test_suite_passes_with_sharded_adam(monkeypatch):
    """Keras' own optimizers/adam_test.py, with ShardedAdam as its Adam: 9/9."""
    import unittest

    module = importlib.import_module("keras.src.optimizers.adam_test")
    monkeypatch.setattr(module, "Adam", ShardedAdam)
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(module.AdamTest)
    result = unittest.TestResult()
    suite.run(result)
    failures = [(str(t), e[-600:]) for t, e in result.failures + result.errors]
    assert result.testsRun == 9 and not failures, failures


def test_ema_overwrite_frequency_under_mirrored():
    """Keras Adam cannot do this under MirroredStrategy (its overwrite is a
    ``cond`` around a merge call); ShardedAdam overwrites through its
    all-gather. Reference: Keras Adam on one replica, same global batches."""
    kwargs = dict(use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=7)
    reference, _ = fit(strategy_for(1), lambda: keras.optimizers.Adam(LR, **kwargs))
    sharded, _ = fit(strategy_for(2), lambda: ShardedAdam(LR, **kwargs))
    assert max_diff(reference, sharded) <= 1e-5
