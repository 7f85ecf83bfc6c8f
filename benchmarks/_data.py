"""Real handwritten digits for the benchmarks, offline.

MNIST through tensorflow-datasets when it is already on disk (no download is
attempted); otherwise scikit-learn's bundled 8x8 digits (1,797 real
handwritten digits, UCI), split 75/25 with a fixed seed.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

Arrays = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _mnist_from_tfds() -> Arrays:
    import tensorflow_datasets as tfds

    def split(name):
        ds = tfds.load("mnist", split=name, batch_size=-1, as_supervised=True,
                       download=False)
        x, y = tfds.as_numpy(ds)
        return x.reshape(len(x), -1).astype("float32") / 255.0, y.astype("int64")

    x_train, y_train = split("train")
    x_test, y_test = split("test")
    return x_train, y_train, x_test, y_test


def _sklearn_digits(seed: int) -> Arrays:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype("float32") / 16.0
    y = digits.target.astype("int64")
    order = np.random.RandomState(seed).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.75 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def load_digits_dataset(seed: int = 0) -> Tuple[str, Arrays]:
    """(name, (x_train, y_train, x_test, y_test)) with flattened float inputs."""
    try:
        return "mnist (tfds)", _mnist_from_tfds()
    except Exception:  # noqa: BLE001 - tfds missing or MNIST not downloaded
        return "sklearn digits 8x8", _sklearn_digits(seed)
