"""Checkpoint in the middle of a local-update period, restore, resume exactly."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_async.strategies import LocalUpdateStrategy


def _data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(128 * 12, 8)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(8, 1))).astype("float32")
    return x, y


def _setup(devices, averaging):
    kwargs = {"averaging": averaging}
    if averaging == "diloco":
        kwargs.update(outer_learning_rate=0.8, outer_momentum=0.5)
    strategy = LocalUpdateStrategy(
        tf.distribute.MirroredStrategy(
            devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
        ),
        sync_every=4,
        **kwargs,
    )
    with strategy.scope():
        keras.utils.set_random_seed(5)
        model = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
        )
        model.compile(optimizer="adam", loss="mse")
        model.optimizer.build(model.trainable_variables)
    return strategy, model


def _steps(strategy, model, x, y):
    """Local steps through Keras' train function (no epoch-end flush)."""
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(128)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    model.make_train_function()
    for _ in range(len(x) // 128):
        model.train_function(iterator)


def _replica_weights(strategy, model):
    return [
        c.numpy()
        for w in model.trainable_weights + model.optimizer.variables
        for c in strategy.experimental_local_results(w.value)
    ]


@pytest.mark.parametrize("averaging", ["diloco"])
def test_restore_mid_period_resumes_exactly(logical_devices, tmp_path, averaging):
    x, y = _data()
    first, second = (x[:768], y[:768]), (x[768:], y[768:])  # 6 + 6 steps, H=4

    strategy, model = _setup(logical_devices, averaging)
    model.fit(x[:128], y[:128], batch_size=128, verbose=0)  # build; syncs once
    _steps(strategy, model, *first)
    assert int(strategy.pending_steps.numpy()) == 2  # 6 steps after the epoch-end sync: mid-period
    checkpoint = tf.train.Checkpoint(
        model=model, optimizer=model.optimizer, local_update=strategy.checkpoint()
    )
    path = checkpoint.save(str(tmp_path / "ckpt"))
    _steps(strategy, model, *second)
    expected = _replica_weights(strategy, model)

    strategy2, model2 = _setup(logical_devices, averaging)
    checkpoint2 = tf.train.Checkpoint(
        model=model2, optimizer=model2.optimizer, local_update=strategy2.checkpoint()
    )
    checkpoint2.restore(path).assert_existing_objects_matched()
    assert int(strategy2.pending_steps.numpy()) == 2
    _steps(strategy2, model2, *second)
    got = _replica_weights(strategy2, model2)
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert int(strategy2.sync_count.numpy()) == int(strategy.sync_count.numpy())
