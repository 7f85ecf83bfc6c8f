"""Handwritten-digit classification with plain Keras ``model.fit`` in every tf_async mode.

    python examples/mnist.py --mode=async_ps --dataset=digits         # embedded cluster
    python examples/mnist.py --mode=local_sgd --cpu_devices=4 --sync_every=8
    python examples/mnist.py --mode=sharded --cpu_devices=4
    python examples/mnist.py --mode=simulated --workers=16 --optimizer=dcsgd --learning_rate=0.005
    python examples/mnist.py --mode=sync
    python -m tf_async.launch --workers 2 --ps 1 -- examples/mnist.py --mode=async_ps
    python examples/mnist.py --model_dir=/tmp/run --epochs=2 && \\
        python examples/mnist.py --model_dir=/tmp/run --epochs=2 --resume

Modes: see examples/training.py; ``--help`` lists every flag. ``--dataset=mnist``
loads MNIST with tensorflow_datasets; when it cannot be downloaded (no network)
the script says so and uses ``--dataset=digits`` (scikit-learn's 8x8
handwritten digits, bundled, offline). The last line printed is ``test_accuracy: X``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import example_data  # noqa: E402
import training  # noqa: E402

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(training)  # --help lists the shared flags too
flags.DEFINE_enum("dataset", "mnist", ["mnist", "digits"], "Dataset.")


def load_data():
    if FLAGS.dataset == "mnist":
        return example_data.load_mnist(FLAGS.data_dir)
    return example_data.load_digits()


def make_model(input_shape):
    import keras

    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])


def main(argv):
    del argv
    training.run(load_data, make_model)


if __name__ == "__main__":
    app.run(main)
