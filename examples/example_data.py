"""Datasets for the examples, with offline fallbacks.

tensorflow_datasets needs the network to download MNIST/CIFAR-10 the first time
(or a prepared ``--data_dir``). When that fails the examples say so and use:

* ``digits``: scikit-learn's bundled 1797 real 8x8 handwritten digits.
* ``synthetic_cifar10``: 32x32x3 images of 10 balanced classes of noisy
  oriented gratings — clearly synthetic, printed as such, but a task a small
  ResNet learns in a hundred steps, so a training run shows real learning.

Every loader returns ``(x_train, y_train, x_test, y_test, name)`` as NumPy arrays
(float32 images in [0, 1], int32 labels).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

Arrays = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]


def load_digits(flatten: bool = True, train_fraction: float = 0.8, seed: int = 0) -> Arrays:
    """scikit-learn's handwritten digits, shuffled with ``seed``, scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = (data.data / 16.0).astype("float32")
    if not flatten:
        x = x.reshape(-1, 8, 8, 1)
    y = data.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(train_fraction * len(x))
    return x[:split], y[:split], x[split:], y[split:], "digits"


TFDS_DOWNLOAD_HOST = "storage.googleapis.com"


def _download_host_resolves() -> bool:
    """Whether tfds' download host resolves; offline, tfds would retry for minutes."""
    import socket

    try:
        socket.getaddrinfo(TFDS_DOWNLOAD_HOST, 443)
        return True
    except OSError:
        return False


def _load_tfds(name: str, data_dir: Optional[str], download: bool = True):
    import tensorflow_datasets as tfds

    if download:
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared() and not _download_host_resolves():
            raise ConnectionError(f"{name} is not prepared and {TFDS_DOWNLOAD_HOST} does not resolve")

    splits = []
    for split in ("train", "test"):
        images, labels = tfds.as_numpy(
            tfds.load(name, split=split, batch_size=-1, as_supervised=True,
                      data_dir=data_dir, download=download)
        )
        splits.append((images.astype("float32") / 255.0, labels.astype("int32")))
    (x_train, y_train), (x_test, y_test) = splits
    return x_train, y_train, x_test, y_test


def _explain_fallback(name: str, error: Exception, fallback: str) -> None:
    first_line = (str(error).splitlines() or [""])[0][:200]
    print(
        f"Could not load {name} with tensorflow_datasets "
        f"({type(error).__name__}: {first_line}). Using {fallback} instead "
        "(no network here? pass --data_dir with a prepared copy)."
    )


def load_mnist(
    data_dir: Optional[str] = None, download: bool = True, **digits_kwargs
) -> Arrays:
    """MNIST (flattened 784 floats); falls back to ``digits`` when it cannot load.

    ``download=False`` uses only a copy already on disk. ``digits_kwargs`` go to
    ``load_digits`` for the fallback.
    """
    try:
        x_train, y_train, x_test, y_test = _load_tfds("mnist", data_dir, download)
    except Exception as error:  # noqa: BLE001 - any download/prepare failure
        _explain_fallback("MNIST", error, "--dataset=digits (scikit-learn handwritten digits)")
        return load_digits(**digits_kwargs)
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    return flat(x_train), y_train, flat(x_test), y_test, "mnist"


def synthetic_cifar10(train: int = 2048, test: int = 512, seed: int = 0,
                      noise: float = 0.35) -> Arrays:
    """SYNTHETIC 32x32x3 images of 10 balanced texture classes (not CIFAR-10).

    Class c is a sinusoidal grating with one of 5 orientations (36 degrees
    apart) and one of 2 spatial frequencies (2 or 4 cycles per image); phase,
    colour and contrast are random per image, and Gaussian pixel noise
    (``noise``) hides the pattern from any single pixel. So the label is in the
    local, translation-invariant structure a small conv net learns, not in a
    pixel, a colour or the mean brightness; every class is 10% of the data.
    """
    rng = np.random.default_rng(seed)
    count = train + test
    y = rng.permutation(np.arange(count) % 10).astype("int32")
    orientation = (y % 5) * (np.pi / 5) + rng.normal(0.0, 0.05, count)
    frequency = np.where(y < 5, 2.0, 4.0) * (2 * np.pi / 32)  # radians per pixel
    phase = rng.uniform(0.0, 2 * np.pi, count)
    rows, cols = np.meshgrid(np.arange(32.0), np.arange(32.0), indexing="ij")
    along = (np.cos(orientation)[:, None, None] * cols
             + np.sin(orientation)[:, None, None] * rows)
    wave = np.sin(frequency[:, None, None] * along + phase[:, None, None])[..., None]
    colour = rng.uniform(0.2, 1.0, (count, 1, 1, 3))
    contrast = rng.uniform(0.3, 0.5, (count, 1, 1, 1))
    x = 0.5 + contrast * colour * wave + rng.normal(0.0, noise, (count, 32, 32, 3))
    x = np.clip(x, 0.0, 1.0).astype("float32")
    return x[:train], y[:train], x[train:], y[train:], "synthetic_cifar10"


def load_cifar10(data_dir: Optional[str] = None) -> Arrays:
    """CIFAR-10; falls back to clearly-labelled synthetic data when offline."""
    try:
        x_train, y_train, x_test, y_test = _load_tfds("cifar10", data_dir)
    except Exception as error:  # noqa: BLE001
        _explain_fallback("CIFAR-10", error, "SYNTHETIC data (--dataset=synthetic)")
        return synthetic_cifar10()
    return x_train, y_train, x_test, y_test, "cifar10"
