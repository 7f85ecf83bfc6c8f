"""Handwritten-digit classification with plain Keras `model.fit`, asynchronous
parameter-server training (tf_async) or stock synchronous training.

    python examples/mnist.py --mode=async_ps --dataset=digits     # embedded cluster
    python examples/mnist.py --mode=sync --dataset=digits
    python -m tf_async.launch --workers 2 --ps 1 -- examples/mnist.py --dataset=digits

Without TF_CONFIG, `--mode=async_ps` starts an in-process cluster
(`tf_async.local_cluster(workers, ps)`); under `python -m tf_async.launch` the
worker/ps tasks become servers and the chief trains.

`--dataset=mnist` loads MNIST with tensorflow_datasets; if it cannot be
downloaded (no network) the script says so and falls back to
`--dataset=digits` (scikit-learn's 8x8 handwritten digits, bundled offline).
The last line printed is `test_accuracy: X`.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

import tf_async

FLAGS = flags.FLAGS
flags.DEFINE_string("mode", "async_ps", "Training mode: one of MODES below.")
flags.DEFINE_string("optimizer", "adam", "Keras optimizer name (keras.optimizers.get).")
flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.")
flags.DEFINE_integer("workers", 2, "Workers of the embedded cluster (async_ps).")
flags.DEFINE_integer("ps", 1, "Parameter servers of the embedded cluster (async_ps).")
flags.DEFINE_integer("epochs", 10, "Epochs.")
flags.DEFINE_integer("steps_per_epoch", 50, "Steps (batches) per epoch.")
flags.DEFINE_integer("batch_size", 32, "Batch size per step.")
flags.DEFINE_string("model_dir", None, "If set: checkpoints and TensorBoard logs go here.")
flags.DEFINE_integer("max_staleness", None, "async_ps: bound on staleness (None = unbounded).")
flags.DEFINE_enum("dataset", "mnist", ["mnist", "digits"], "Dataset.")
flags.DEFINE_string("data_dir", None, "tensorflow_datasets data_dir for mnist.")


# ----------------------------------------------------------------- data

Arrays = Tuple["np.ndarray", "np.ndarray", "np.ndarray", "np.ndarray"]


def load_digits() -> Arrays:
    """scikit-learn's 1797 8x8 handwritten digits, 80/20 split, scaled to [0, 1]."""
    import numpy as np
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return x[:split], y[:split], x[split:], y[split:]


def load_mnist(data_dir) -> Arrays:
    """MNIST via tensorflow_datasets, flattened to 784 floats in [0, 1]."""
    import numpy as np
    import tensorflow_datasets as tfds

    splits = []
    for split in ("train", "test"):
        images, labels = tfds.as_numpy(
            tfds.load("mnist", split=split, batch_size=-1, as_supervised=True,
                      data_dir=data_dir, download=True)
        )
        splits.append((images.reshape(len(images), -1).astype("float32") / 255.0,
                       labels.astype("int32")))
    (x_train, y_train), (x_test, y_test) = splits
    return x_train, y_train, x_test, np.asarray(y_test)


def load_data() -> Arrays:
    if FLAGS.dataset == "mnist":
        try:
            return load_mnist(FLAGS.data_dir)
        except Exception as error:  # noqa: BLE001 - any download/prepare failure
            print(
                "Could not load MNIST with tensorflow_datasets "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
                "Falling back to --dataset=digits (scikit-learn handwritten digits, "
                "offline)."
            )
    return load_digits()


# ------------------------------------------------------------- strategies


def build_async_ps():
    """AsyncParameterServerStrategy on TF_CONFIG's cluster or an embedded one."""
    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    else:
        resolver = tf_async.local_cluster(workers=FLAGS.workers, ps=FLAGS.ps)
    return tf_async.strategies.AsyncParameterServerStrategy(
        resolver, max_staleness=FLAGS.max_staleness
    )


def build_sync():
    """Stock Keras synchronous training (MirroredStrategy over local devices)."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy()


MODES: Dict[str, Callable] = {
    "async_ps": build_async_ps,
    "sync": build_sync,
}


# ------------------------------------------------------------------ main


def make_model(features: int):
    import keras

    return keras.Sequential([
        keras.Input((features,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # TF's coordinator logs every join at INFO
    if FLAGS.mode not in MODES:
        raise app.UsageError(f"--mode must be one of {sorted(MODES)}, got {FLAGS.mode!r}.")
    if FLAGS.mode == "async_ps":
        tf_async.cluster.serve_forever_if_server_task()  # worker/ps tasks stop here
    import keras
    import tensorflow as tf

    x_train, y_train, x_test, y_test = load_data()
    strategy = MODES[FLAGS.mode]()
    with strategy.scope():
        model = make_model(x_train.shape[1])
        optimizer = keras.optimizers.get(
            {"class_name": FLAGS.optimizer,
             "config": {"learning_rate": FLAGS.learning_rate}}
        )
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])

    batch_size = FLAGS.batch_size

    def dataset_fn(input_context=None):
        dataset = tf.data.Dataset.from_tensor_slices((x_train, y_train))
        if input_context is not None and input_context.num_input_pipelines > 1:
            dataset = dataset.shard(input_context.num_input_pipelines,
                                    input_context.input_pipeline_id)
        return dataset.shuffle(len(x_train)).batch(batch_size).repeat()

    callbacks = []
    if FLAGS.model_dir:
        callbacks += [
            keras.callbacks.ModelCheckpoint(
                os.path.join(FLAGS.model_dir, "model.weights.h5"),
                save_weights_only=True),
            keras.callbacks.TensorBoard(os.path.join(FLAGS.model_dir, "logs")),
        ]
    data = dataset_fn if FLAGS.mode == "async_ps" else dataset_fn()
    model.fit(data, epochs=FLAGS.epochs, steps_per_epoch=FLAGS.steps_per_epoch,
              callbacks=callbacks, verbose=2)
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    print(f"test_accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    app.run(main)
