"""CIFAR-10 with a small ResNet, plain Keras ``model.fit``, every tf_async mode.

    python examples/cifar10.py --mode=async_ps --workers=2 --ps=1
    python examples/cifar10.py --mode=local_sgd --cpu_devices=4 --sync_every=8

Same modes and flags as examples/mnist.py (examples/training.py; ``--help``
lists them all). CIFAR-10 comes from tensorflow_datasets; when it cannot be
downloaded (no network) the script says so and trains on SYNTHETIC images
(``--dataset=synthetic``: 32x32x3 noisy gratings, 10 balanced classes of
orientation x frequency) — clearly not CIFAR-10, but a task the small ResNet
learns within a hundred steps, so an offline run shows real learning. The last
line printed is ``test_accuracy: X``.
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
flags.DEFINE_enum("dataset", "cifar10", ["cifar10", "synthetic"], "Dataset.")
flags.DEFINE_integer("width", 16, "Channels of the first ResNet stage (doubles per stage).")

# PyTorch's default and the usual ResNet setting. With Keras' 0.99 the moving
# statistics that evaluation uses lag the weights for hundreds of steps, so a
# short run would evaluate far worse than it trains.
BN_MOMENTUM = 0.9


def load_data():
    if FLAGS.dataset == "cifar10":
        return example_data.load_cifar10(FLAGS.data_dir)
    return example_data.synthetic_cifar10()


def residual_block(x, filters: int, stride: int):
    from keras import layers

    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM)(y)
    y = layers.ReLU()(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM)(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
        shortcut = layers.BatchNormalization(momentum=BN_MOMENTUM)(shortcut)
    return layers.ReLU()(layers.Add()([y, shortcut]))


def make_model(input_shape):
    """ResNet with three stages of one basic block each (He et al. 2016)."""
    import keras
    from keras import layers

    inputs = keras.Input(input_shape)
    x = layers.Conv2D(FLAGS.width, 3, padding="same", use_bias=False)(inputs)
    x = layers.ReLU()(layers.BatchNormalization(momentum=BN_MOMENTUM)(x))
    for stage, stride in enumerate((1, 2, 2)):
        x = residual_block(x, FLAGS.width * 2**stage, stride)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="small_resnet")


def main(argv):
    del argv
    training.run(load_data, make_model)


if __name__ == "__main__":
    app.run(main)
