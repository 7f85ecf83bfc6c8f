"""Datasets for the examples, with offline fallbacks.

tensorflow_datasets needs the network to download MNIST/CIFAR-10 the first time
(or a prepared ``--data_dir``). When that fails the examples say so and use:

* ``digits``: scikit-learn's bundled 1797 real 8x8 handwritten digits.
* ``synthetic_cifar10``: random 32x32x3 images with labels from a fixed random
  linear teacher — clearly synthetic, printed as such, but learnable, so a
  training run still shows a falling loss.

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


def synthetic_cifar10(train: int = 2048, test: int = 512, seed: int = 0) -> Arrays:
    """SYNTHETIC 32x32x3 images; labels from a fixed random linear teacher."""
    rng = np.random.default_rng(seed)
    x = rng.random((train + test, 32, 32, 3), dtype=np.float32)
    teacher = rng.normal(size=(32 * 32 * 3, 10)).astype("float32")
    y = np.argmax(x.reshape(len(x), -1) @ teacher, axis=1).astype("int32")
    return x[:train], y[:train], x[train:], y[train:], "synthetic_cifar10"


def load_cifar10(data_dir: Optional[str] = None) -> Arrays:
    """CIFAR-10; falls back to clearly-labelled synthetic data when offline."""
    try:
        x_train, y_train, x_test, y_test = _load_tfds("cifar10", data_dir)
    except Exception as error:  # noqa: BLE001
        _explain_fallback("CIFAR-10", error, "SYNTHETIC data (--dataset=synthetic)")
        return synthetic_cifar10()
    return x_train, y_train, x_test, y_test, "cifar10"
