"""Worker script for tests/test_local_update_mwms.py (run by tf_async.launch).

Each of 2 workers trains its own data shard under
LocalUpdateStrategy(MultiWorkerMirroredStrategy(), sync_every=4) for 10 steps
and prints one ``RESULT {json}`` line: its weights' checksum after every step
and at the end, plus the sync count.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_async.strategies import LocalUpdateStrategy  # noqa: E402


def main():
    strategy = LocalUpdateStrategy(
        tf.distribute.MultiWorkerMirroredStrategy(), sync_every=4
    )
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    # Cross-worker reductions traced into graphs (Keras' per-step log reduce
    # would be one per logged value; the periodic sync is one batch_reduce_to).
    traced = {"reduce_to": 0, "batch_reduce_to": 0}
    extended = strategy.extended
    for name in traced:
        def counting(*args, _inner=getattr(extended, name), _name=name, **kwargs):
            if not tf.executing_eagerly():
                traced[_name] += 1
            return _inner(*args, **kwargs)
        setattr(extended, name, counting)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16 * 2 * 10, 8)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(8, 1))).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    # Infinite (steps_per_epoch below): TF's distributed iterator adds a
    # cross-worker reduce per step when a dataset may end.
    dataset = dataset.with_options(options).repeat()
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")

    def checksum():
        local = strategy.experimental_local_results(model.trainable_weights[0].value)
        return float(np.sum(np.abs(local[0].numpy())) * 1e3)

    sums = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            sums.append(checksum())

    history = model.fit(dataset, epochs=1, steps_per_epoch=10, verbose=0, callbacks=[Probe()])
    result = {
        "task": os.environ.get("TF_ASYNC_TASK"),
        "per_step": sums,
        "final": checksum(),
        "syncs": int(strategy.sync_count.numpy()),
        "divergence": history.history["local_divergence"][-1],
        "replicas": strategy.num_replicas_in_sync,
        "traced": traced,
        "loss": history.history["loss"][-1],
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
