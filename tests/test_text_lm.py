"""benchmarks/_text_lm.py: the slow-link benchmark's byte-level transformer LM."""

import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import _text_lm  # noqa: E402


def _gradients(context=16, width=8):
    model = _text_lm.make_model(context, width, 1, 2, seed=0)
    x = np.random.default_rng(0).integers(0, 256, size=(3, context)).astype(np.int32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model(x))
    weights = [w.value for w in model.trainable_weights]
    return model, tape.gradient(loss, weights)


def test_every_gradient_is_dense():
    """A gather's IndexedSlices gradient costs MultiWorkerMirrored three more
    collectives per step (lengths, values, indices all-gathers): the sync
    baseline over a slow link would pay them."""
    _, grads = _gradients()
    assert not [g for g in grads if isinstance(g, tf.IndexedSlices)]


def test_position_table_is_trained():
    context, width = 16, 8
    model, grads = _gradients(context, width)
    by_name = {w.path: g for w, g in zip(model.trainable_weights, grads)}
    (name,) = [n for n in by_name if n.endswith("positions")]
    assert tuple(model.get_layer(name.split("/")[0]).positions.shape) == (context, width)
    assert float(tf.reduce_max(tf.abs(by_name[name]))) > 0.0
    # byte table 256*w + positions context*w + 1 block + final LN + output Dense
    block = 2 * 2 * width + 4 * (width * width + width) + (width * 4 * width + 4 * width) + (
        4 * width * width + width)
    assert model.count_params() == 256 * width + context * width + block + 2 * width + (
        width * 256 + 256)


def test_embedding_equals_table_lookup():
    model = _text_lm.make_model(8, 4, 1, 2, seed=0)
    layer = model.layers[1]
    x = np.array([[0, 5, 255, 5, 1, 2, 3, 4]], np.int32)
    expected = layer.table.numpy()[x] + layer.positions.numpy()[None]
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-6, atol=1e-7)
