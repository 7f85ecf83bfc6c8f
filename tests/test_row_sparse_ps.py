"""Row-sparse optimizers under AsyncParameterServerStrategy.fit (fresh process).

One worker: every step reads the latest weights (τ = 0), so the async fit must
equal a fit without a strategy. The reference's table gets its *dense*
gradient (one-hot matmul: duplicates summed), i.e. Keras' dense result.
"""

from __future__ import annotations

import numpy as np
import pytest

ROWS, WIDTH, IDS, USED = 200, 8, 6, 150
STEPS = 12


def _data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, USED, size=(96, IDS)).astype("int32")  # rows >= USED unused
    x[:, 1] = x[:, 0]  # repeated ids in every example
    y = rng.normal(size=(96, 1)).astype("float32")
    return x, y


def _model(dense_gradient_table=False):
    import keras
    from keras import ops

    class DenseGradientEmbedding(keras.layers.Embedding):
        """Embedding whose table gradient is dense (one-hot @ table)."""

        def call(self, inputs):
            return ops.matmul(ops.one_hot(inputs, ROWS), self.embeddings)

    layer = DenseGradientEmbedding if dense_gradient_table else keras.layers.Embedding
    inputs = keras.Input((IDS,), dtype="int32")
    h = layer(ROWS, WIDTH, name="table")(inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(h))


def _child_fits():
    import warnings

    import keras
    import tensorflow as tf

    import tf_async
    from tf_async.keras_optimizers import DCAdam, LazyAdam, StalenessScaled

    x, y = _data()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat()
    optimizers = {
        "adagrad_by_name": lambda: "adagrad",
        "adagrad": lambda: keras.optimizers.Adagrad(0.2),
        "sgd": lambda: keras.optimizers.SGD(0.5),
        "lazy_adam": lambda: LazyAdam(0.05),
        "dcadam_lazy": lambda: DCAdam(0.05, lambda_=0.5, lazy=True),
        "scaled_adagrad": lambda: StalenessScaled(keras.optimizers.Adagrad(0.2)),
        "adam": lambda: keras.optimizers.Adam(0.05),  # dense: the notice
    }
    keras.utils.set_random_seed(3)
    initial = _model().get_weights()
    expected = {}
    for name, make in optimizers.items():
        # Stock optimizers: Keras' dense result (the row-sparse PS step hands
        # a table's gradient over with duplicate ids summed, so stock Adam's
        # dense moments see the dense gradient). Lazy ones sum duplicates
        # themselves (a dense gradient would make them dense Adam).
        reference = _model(dense_gradient_table=not name.startswith(("lazy", "dcadam")))
        reference.set_weights(initial)
        reference.compile(optimizer=make(), loss="mse")
        reference.fit(data, epochs=1, steps_per_epoch=STEPS, verbose=0)
        reference.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
        expected[name] = reference.get_weights()  # read before joining a cluster

    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=1, ps=1)
    )
    result = {"diff": {}, "untouched_moved": {}, "notices": {}, "staleness_max": {}}
    for name, make in optimizers.items():
        with strategy.scope():
            model = _model()
            model.set_weights(initial)
            model.compile(optimizer=make(), loss="mse")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = model.fit(data, epochs=1, steps_per_epoch=STEPS, verbose=0)
            model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)  # second fit: silent
        got = model.get_weights()
        result["notices"][name] = [
            str(w.message) for w in caught if str(w.message).startswith("tf_async:")
        ]
        result["staleness_max"][name] = history.history["staleness_max"][0]
        result["untouched_moved"][name] = float(np.abs(got[0][USED:] - initial[0][USED:]).max())
        result["diff"][name] = float(
            max(np.abs(a - b).max() for a, b in zip(got, expected[name]))
        )
    return result


@pytest.mark.slow
def test_row_sparse_optimizers_under_async_ps_fit_equal_dense_keras(fresh_process):
    r = fresh_process(_child_fits, timeout=900)
    for name, diff in r["diff"].items():
        assert r["staleness_max"][name] == 0, name
        assert diff < 1e-5, (name, diff)
    for name in ("adagrad_by_name", "adagrad", "sgd", "lazy_adam", "dcadam_lazy",
                 "scaled_adagrad"):
        assert r["untouched_moved"][name] == 0.0, name  # rows never looked up
        assert r["notices"][name] == [], name
    [notice] = r["notices"]["adam"]  # once, although there were two fits
    assert "'table/embeddings' (200 rows x 8 x 4 B x 3 arrays)" in notice
    assert "LazyAdam" in notice


# ---- concurrent workers never lose a row's update ---------------------------
# Every batch holds each of LOCK_ROWS rows exactly 4 times and the loss is
# linear in the looked-up rows, so every applied step subtracts exactly
# lr * 4 / batch = 1/32 from every element of those rows, whatever the
# weights: after `iterations` steps each element is exactly -iterations/32
# (binary fractions: no rounding). A lost update (two workers' row updates
# interleaving on the PS) leaves some element above that.

LOCK_ROWS, LOCK_BATCH, LOCK_IDS = 64, 32, 8


def _child_concurrent_row_updates(steps, ps):
    import keras
    import tensorflow as tf
    from keras import ops

    import tf_async
    from tf_async import _rows

    ids = np.tile(np.arange(LOCK_ROWS, dtype="int32"), 4).reshape(LOCK_BATCH, LOCK_IDS)
    y = np.zeros((LOCK_BATCH, 1), np.float32)

    def dataset_fn(input_context=None):
        return tf.data.Dataset.from_tensors((ids, y)).repeat()

    partitioner = None
    if ps > 1:  # the table split: rows 0-35 on one PS, 36-71 on the other
        partitioner = tf.distribute.experimental.partitioners.FixedShardsPartitioner(ps)
    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=2, ps=ps), variable_partitioner=partitioner)
    with strategy.scope():
        inputs = keras.Input((LOCK_IDS,), dtype="int32")
        rows = keras.layers.Embedding(LOCK_ROWS + 8, 16, embeddings_initializer="zeros",
                                      name="table")(inputs)
        model = keras.Model(inputs, ops.sum(rows, axis=(1, 2))[:, None])
        model.compile(optimizer=keras.optimizers.SGD(0.25),
                      loss=lambda y_true, y_pred: ops.mean(y_pred))
    history = model.fit(dataset_fn, epochs=1, steps_per_epoch=steps, verbose=0)
    table = np.asarray(model.get_layer("table").embeddings.numpy())
    return {
        "shards": len(_rows.shards(model.get_layer("table").embeddings)),
        "iterations": int(model.optimizer.iterations.numpy()),
        "staleness_max": history.history["staleness_max"][0],
        "used": table[:LOCK_ROWS].tolist(),
        "unused_max": float(np.abs(table[LOCK_ROWS:]).max()),
    }


@pytest.mark.slow
@pytest.mark.parametrize("ps", [1, 2])
def test_concurrent_workers_never_lose_a_row_update(fresh_process, ps):
    r = fresh_process(_child_concurrent_row_updates, 400, ps, timeout=600)
    assert r["shards"] == ps
    assert r["iterations"] == 400
    assert r["staleness_max"] >= 1  # the two workers' steps did overlap
    used = np.asarray(r["used"], np.float32)
    expected = np.float32(-r["iterations"] / 32)
    lost = int(np.sum(used != expected))
    assert lost == 0, (lost, float(used.max()), float(expected))
    assert r["unused_max"] == 0.0
