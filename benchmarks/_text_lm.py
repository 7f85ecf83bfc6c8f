"""A real task for the benchmarks: byte-level transformer LM on the Python standard library.

The text is the interpreter's own standard library (``*.py`` directly in the
directory of ``os.py``, sorted by name) — real code no one here wrote, on every
machine that runs the benchmark. Split by file, deterministically: every
``VAL_EVERY``-th file (in sorted order) is validation, the rest training. The
metric is validation cross-entropy in nats per byte, and bits per byte
(= nats / ln 2).

Batches are drawn without any shared state: batch ``t`` of worker ``w`` is the
windows starting at ``rng(seed, t, w)``-chosen offsets of the training bytes,
so every mode of a benchmark sees exactly the same data in the same order.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import List, Tuple

import numpy as np

VAL_EVERY = 10
MAX_FILE_BYTES = 200_000


def corpus_files() -> List[str]:
    stdlib = os.path.dirname(os.__file__)
    return sorted(
        os.path.join(stdlib, name) for name in os.listdir(stdlib)
        if name.endswith(".py") and os.path.isfile(os.path.join(stdlib, name))
    )


def load_corpus(max_train_bytes: int = 4_000_000) -> Tuple[np.ndarray, np.ndarray, dict]:
    """``(train_bytes, val_bytes, info)`` as uint8 arrays; ``info`` identifies the text."""
    train, val, digest = [], [], hashlib.sha256()
    files = corpus_files()
    for k, path in enumerate(files):
        with open(path, "rb") as f:
            data = f.read()[:MAX_FILE_BYTES]
        digest.update(os.path.basename(path).encode() + b"\0" + data)
        (val if k % VAL_EVERY == VAL_EVERY - 1 else train).append(data)
    train_bytes = np.frombuffer(b"\n".join(train), dtype=np.uint8)[:max_train_bytes]
    val_bytes = np.frombuffer(b"\n".join(val), dtype=np.uint8)
    info = {
        "source": os.path.dirname(files[0]), "files": len(files),
        "train_bytes": int(train_bytes.size), "val_bytes": int(val_bytes.size),
        "sha256": digest.hexdigest()[:16],
    }
    return train_bytes, val_bytes, info


def train_batch(data: np.ndarray, context: int, batch: int, seed: int, step: int, worker: int):
    rng = np.random.default_rng([seed, step, worker])
    starts = rng.integers(0, data.size - context - 1, size=batch)
    windows = np.stack([data[s : s + context + 1] for s in starts]).astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def val_windows(data: np.ndarray, context: int, count: int):
    """``count`` fixed, evenly spaced windows of the validation bytes."""
    stride = (data.size - context - 1) // count
    windows = np.stack(
        [data[k * stride : k * stride + context + 1] for k in range(count)]
    ).astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def _byte_embedding_layer():
    import keras

    class ByteEmbedding(keras.layers.Layer):
        """Byte + learned position embedding: ``one_hot(x) @ E + P``.

        The table lookup is a matmul with the one-hot bytes, so both tables'
        gradients are dense: a gather's gradient is an ``IndexedSlices``, which
        MultiWorkerMirrored all-reduces with three more collectives per step (an
        all-gather of lengths, of values, of indices), each paying the link's
        round trips. The position table is a weight of this layer, so trained
        (a Keras layer called on a constant in a functional model is not).
        """

        def __init__(self, vocab, context, width, **kwargs):
            super().__init__(**kwargs)
            self.vocab, self.context, self.width = vocab, context, width

        def build(self, input_shape):
            init = keras.initializers.RandomUniform(-0.05, 0.05)
            self.table = self.add_weight((self.vocab, self.width), init, name="bytes")
            self.positions = self.add_weight((self.context, self.width), init, name="positions")

        def call(self, tokens):
            one_hot = keras.ops.one_hot(tokens, self.vocab, dtype=self.compute_dtype)
            return keras.ops.matmul(one_hot, self.table) + self.positions

    return ByteEmbedding


def make_model(context: int, width: int, layers: int, heads: int, seed: int):
    """Pre-LN decoder-only transformer over bytes (Keras layers), logits over 256;
    every gradient dense (``ByteEmbedding``)."""
    import keras

    keras.utils.set_random_seed(seed)
    tokens = keras.Input((context,), dtype="int32")
    x = _byte_embedding_layer()(256, context, width)(tokens)
    for _ in range(layers):
        h = keras.layers.LayerNormalization(epsilon=1e-5)(x)
        h = keras.layers.MultiHeadAttention(heads, width // heads)(h, h, use_causal_mask=True)
        x = x + h
        h = keras.layers.LayerNormalization(epsilon=1e-5)(x)
        h = keras.layers.Dense(4 * width, activation="gelu")(h)
        x = x + keras.layers.Dense(width)(h)
    x = keras.layers.LayerNormalization(epsilon=1e-5)(x)
    logits = keras.layers.Dense(256)(x)
    return keras.Model(tokens, logits)


def bits_per_byte(nats: float) -> float:
    return nats / math.log(2.0)
