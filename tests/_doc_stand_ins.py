"""Small stand-ins for the names the docs' Python blocks leave to the reader.

A block in README.md or docs/*.md that uses, say, ``make_model()`` and
``dataset`` without defining them declares them in an HTML comment on the line
before its fence (see tests/_doc_blocks.py)::

    <!-- docs-test: stand-ins make_model, dataset -->

and tests/test_docs.py defines exactly those names before running the block.
Every stand-in is one small task: ``FEATURES`` float inputs, ``CLASSES``
classes from a fixed linear teacher, batches of ``BATCH``. Add a stand-in here
when a new page needs one (a zero-argument function returning the value).
"""

from __future__ import annotations

import functools

import numpy as np

FEATURES, CLASSES, BATCH = 64, 10, 32


def make_model():
    """The docs' ``make_model()``: an uncompiled softmax classifier."""
    import keras

    return keras.Sequential([
        keras.layers.Input((FEATURES,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(CLASSES, activation="softmax"),
    ])


def arrays(count: int, seed: int = 0):
    """(x, y): ``count`` examples of the stand-in task."""
    rng = np.random.default_rng(seed)
    teacher = np.random.default_rng(1234).normal(size=(FEATURES, CLASSES))
    x = rng.normal(size=(count, FEATURES)).astype("float32")
    return x, np.argmax(x @ teacher, axis=1).astype("int32")


def _dataset():
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(arrays(512)).repeat().batch(BATCH)


def _dataset_fn():
    def dataset_fn(input_context=None):
        del input_context  # one small in-memory dataset for every worker
        return _dataset()

    return dataset_fn


@functools.lru_cache(maxsize=None)
def _train_step():
    """What a train step has when it applies: a model, an optimizer, τ, w_read, grads."""
    import tensorflow as tf

    import tf_async

    model = make_model()
    model.build((None, FEATURES))
    optimizer = tf_async.keras_optimizers.DCSGD(0.1, lambda_=0.5)
    optimizer.build(model.trainable_variables)
    return {
        "model": model,
        "optimizer": optimizer,
        "tau": tf.constant(2, tf.int64),
        "w_read": [v - 0.01 for v in model.trainable_variables],
        "grads": [tf.ones_like(v) for v in model.trainable_variables],
    }


STAND_INS = {
    "make_model": lambda: make_model,
    "dataset": _dataset,
    "dataset_fn": _dataset_fn,
    "x_val": lambda: arrays(64, seed=1)[0],
    "y_val": lambda: arrays(64, seed=1)[1],
    # The inside of a train step (docs/staleness.md):
    "model": lambda: _train_step()["model"],
    "optimizer": lambda: _train_step()["optimizer"],
    "tau": lambda: _train_step()["tau"],
    "w_read": lambda: _train_step()["w_read"],
    "grads": lambda: _train_step()["grads"],
}


def provide(names):
    """{name: stand-in} for the declared ``names``; ``KeyError`` lists the known ones."""
    unknown = sorted(set(names) - set(STAND_INS))
    if unknown:
        raise KeyError(
            f"unknown docs-test stand-in(s) {unknown}; known: {sorted(STAND_INS)} "
            "(add one to tests/_doc_stand_ins.py)"
        )
    return {name: STAND_INS[name]() for name in names}
