"""Run-time check that TensorFlow and Keras are versions tf_async supports."""

from __future__ import annotations

MIN_TENSORFLOW = (2, 16)
MIN_KERAS = (3, 0)


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_versions() -> None:
    """Raises ImportError naming the package to install if versions are too old."""
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(
            "tf_async needs TensorFlow >= 2.16: pip install 'tensorflow-cpu>=2.16' "
            "(or 'tensorflow>=2.16' for GPUs)."
        ) from error
    import keras

    if _version_tuple(tf.__version__) < MIN_TENSORFLOW:
        raise ImportError(
            f"tf_async needs TensorFlow >= 2.16 (Keras 3); found {tf.__version__}."
        )
    if _version_tuple(keras.__version__) < MIN_KERAS:
        raise ImportError(
            f"tf_async needs Keras 3; found keras {keras.__version__}. "
            "If TF_USE_LEGACY_KERAS is set, unset it."
        )
