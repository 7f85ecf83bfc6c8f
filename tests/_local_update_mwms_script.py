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
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16 * 2 * 10, 8)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(8, 1))).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    dataset = dataset.with_options(options)
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

    history = model.fit(dataset, epochs=1, verbose=0, callbacks=[Probe()])
    result = {
        "task": os.environ.get("TF_ASYNC_TASK"),
        "per_step": sums,
        "final": checksum(),
        "syncs": int(strategy.sync_count.numpy()),
        "divergence": history.history["local_divergence"][-1],
        "replicas": strategy.num_replicas_in_sync,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
