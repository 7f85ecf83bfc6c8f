"""Real handwritten digits for the benchmarks, offline.

MNIST through tensorflow-datasets when it is already on disk (no download is
attempted); otherwise scikit-learn's bundled 8x8 digits (1,797 real
handwritten digits, UCI), split 75/25 with a fixed seed. The loaders are the
examples' (``examples/example_data.py``).
"""

from __future__ import annotations

import os
import sys
from typing import Tuple

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import example_data  # noqa: E402

Arrays = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def load_digits_dataset(seed: int = 0) -> Tuple[str, Arrays]:
    """(name, (x_train, y_train, x_test, y_test)) with flattened float inputs."""
    x_train, y_train, x_test, y_test, name = example_data.load_mnist(
        download=False, train_fraction=0.75, seed=seed)
    return ("mnist (tfds)" if name == "mnist" else "sklearn digits 8x8"), (
        x_train, y_train, x_test, y_test)
