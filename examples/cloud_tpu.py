"""Cloud TPU entry point: LocalUpdateStrategy or ShardedAdam over TPUStrategy.

    python examples/cloud_tpu.py --tpu=my-tpu-name --mode=local_sgd --sync_every=8
    python examples/cloud_tpu.py --tpu=my-tpu-name --mode=sharded
    python examples/cloud_tpu.py --tpu=local_cpu_test        # no TPU: CPU stand-in

With a real ``--tpu`` (name, ``grpc://host:port`` or ``local``) the script
resolves it with ``TPUClusterResolver``, initialises the TPU system and uses
``tf.distribute.TPUStrategy`` as the base strategy. ``--tpu=local_cpu_test``
runs the same code on a one-device ``MirroredStrategy`` over the CPU with
``jit_compile=True``, i.e. the whole train step is compiled by XLA as it would
be on a TPU — this is how the script is tested without a TPU.

Modes:
  local_sgd — ``tf_async.strategies.LocalUpdateStrategy(base, sync_every=H,
              averaging=--averaging)`` with a stock Keras optimizer.
  sharded   — ``tf_async.keras_optimizers.ShardedAdam`` under TPUStrategy:
              each TPU replica keeps 1/N of Adam's m and v, the gradient is
              reduce-scattered (XLA AllToAll) and the parameters all-gathered,
              with the TPU's dynamic replica id (static slice sizes). Not run
              on a TPU here (none available): that path is exercised on CPU
              by tests that force a dynamic replica id under MirroredStrategy
              and under jit_compile on one replica. The ``local_cpu_test``
              stand-in has one replica, where ShardedAdam is plain Adam.
Prints ``test_accuracy: X`` last.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import example_data  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("tpu", "local_cpu_test",
                    "TPU name/address for TPUClusterResolver, or local_cpu_test.")
flags.DEFINE_enum("mode", "local_sgd", ["local_sgd", "sharded"], "What to run on the TPU.")
flags.DEFINE_integer("sync_every", 8, "local_sgd: average every H steps.")
flags.DEFINE_enum("averaging", "mean", ["mean", "easgd", "diloco"], "local_sgd averaging.")
flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.")
flags.DEFINE_integer("epochs", 3, "Epochs.")
flags.DEFINE_integer("steps_per_epoch", 50, "Steps per epoch.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_enum("dataset", "mnist", ["mnist", "digits"], "Dataset (mnist falls back to digits offline).")
flags.DEFINE_string("data_dir", None, "tensorflow_datasets data_dir.")
flags.DEFINE_string("model_dir", None, "If set: TensorBoard logs and final weights go here.")

LOCAL_CPU_TEST = "local_cpu_test"


def base_strategy():
    """TPUStrategy for a real --tpu; a one-device CPU stand-in for local_cpu_test."""
    import tensorflow as tf

    if FLAGS.tpu == LOCAL_CPU_TEST:
        print("--tpu=local_cpu_test: no TPU; one-device MirroredStrategy on the CPU, "
              "jit_compile=True (XLA) as on a TPU.")
        return tf.distribute.MirroredStrategy(["/cpu:0"])
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=FLAGS.tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    import tf_async

    if FLAGS.dataset == "mnist":
        x_train, y_train, x_test, y_test, name = example_data.load_mnist(FLAGS.data_dir)
    else:
        x_train, y_train, x_test, y_test, name = example_data.load_digits()
    print(f"dataset: {name} ({len(x_train)} train / {len(x_test)} test)")

    strategy = base_strategy()
    if FLAGS.mode == "local_sgd":
        strategy = tf_async.strategies.LocalUpdateStrategy(
            strategy, sync_every=FLAGS.sync_every, averaging=FLAGS.averaging)
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((x_train.shape[1],)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ])
        if FLAGS.mode == "sharded":
            optimizer = tf_async.keras_optimizers.ShardedAdam(FLAGS.learning_rate)
        else:
            optimizer = keras.optimizers.Adam(FLAGS.learning_rate)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"], jit_compile=True)

    # TPUs need static shapes: drop the remainder batch.
    dataset = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
               .shuffle(len(x_train), seed=0).repeat()
               .batch(FLAGS.batch_size, drop_remainder=True))
    callbacks = []
    if FLAGS.model_dir:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(FLAGS.model_dir, "logs")))
    model.fit(dataset, epochs=FLAGS.epochs, steps_per_epoch=FLAGS.steps_per_epoch,
              callbacks=callbacks, verbose=2)
    if FLAGS.model_dir:
        model.save_weights(os.path.join(FLAGS.model_dir, "final.weights.h5"))
    _, accuracy = model.evaluate(x_test, y_test, batch_size=FLAGS.batch_size, verbose=0)
    print(f"test_accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    app.run(main)
