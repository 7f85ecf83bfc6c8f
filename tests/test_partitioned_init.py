"""Initial values of variables split over parameter servers, shard by shard
(tf_async/_partitioned_init.py): each shard's value against its reference;
a real 2-PS cluster (slow) makes a split table without the chief holding it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import keras
import tensorflow as tf

from tf_async import _partitioned_init

SHAPE = (1000, 8)
SHARDS = [((500, 8), (0, 0)), ((500, 8), (500, 0))]


def _shards(initializer, shape=SHAPE, shards=SHARDS):
    value = _partitioned_init.initial_value(initializer, shape, "float32")
    return [np.asarray(value(partition_shape=s, partition_offset=o)) for s, o in shards]


def test_unsplit_value_is_keras_own():
    for initializer in (keras.initializers.RandomUniform(seed=3), keras.initializers.Zeros(),
                        keras.initializers.Orthogonal(seed=2)):
        value = _partitioned_init.initial_value(initializer, (6, 6), "float32")
        assert value.shape == (6, 6)
        np.testing.assert_array_equal(np.asarray(value()), np.asarray(initializer((6, 6), "float32")))


@pytest.mark.parametrize("initializer, expected", [
    (keras.initializers.Zeros(), 0.0),
    (keras.initializers.Ones(), 1.0),
    (keras.initializers.Constant(0.25), 0.25),
])
def test_constant_shards_are_the_slices_of_the_same_value(initializer, expected):
    for (shape, _), part in zip(SHARDS, _shards(initializer)):
        assert part.shape == shape
        np.testing.assert_array_equal(part, np.full(shape, expected, np.float32))


@pytest.mark.parametrize("make", [
    lambda seed: keras.initializers.RandomUniform(-0.1, 0.3, seed=seed),
    lambda seed: keras.initializers.RandomNormal(0.5, 2.0, seed=seed),
    lambda seed: keras.initializers.TruncatedNormal(0.0, 1.0, seed=seed),
])
def test_random_shards_draw_the_same_distribution_with_a_derived_seed(make):
    parts = _shards(make(7))
    for (shape, offset), part in zip(SHARDS, parts):
        reference = make(_partitioned_init.shard_seed(7, offset))(shape, "float32")
        np.testing.assert_array_equal(part, np.asarray(reference))
    assert not np.array_equal(parts[0], parts[1])  # not one draw repeated
    np.testing.assert_array_equal(parts[1], _shards(make(7))[1])  # deterministic
    assert not np.array_equal(parts[1], _shards(make(8))[1])  # follows the seed
    # Same distribution as the unsplit value (moments over 8000 draws).
    whole = np.asarray(make(7)(SHAPE, "float32"))
    split = np.concatenate(parts)
    assert abs(split.mean() - whole.mean()) < 0.05 * whole.std() + 0.01
    assert abs(split.std() / whole.std() - 1) < 0.05


@pytest.mark.parametrize("make", [
    lambda seed: keras.initializers.GlorotUniform(seed=seed),
    lambda seed: keras.initializers.HeNormal(seed=seed),
    lambda seed: keras.initializers.LecunNormal(seed=seed),
    lambda seed: keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal", seed=seed),
])
def test_variance_scaling_shards_keep_the_full_shapes_scale(make):
    """A shard's fans are not the table's: the scale comes from the full shape."""
    parts = _shards(make(11))
    split = np.concatenate(parts)
    whole = np.asarray(make(11)(SHAPE, "float32"))
    assert abs(split.std() / whole.std() - 1) < 0.05, (split.std(), whole.std())
    # What Keras draws for a 500-row variable has a different scale (except fan_out).
    alone = np.asarray(make(11)((500, 8), "float32"))
    if make(0).mode != "fan_out":
        assert abs(alone.std() / whole.std() - 1) > 0.2
    if make(0).distribution == "uniform":
        limit = np.sqrt(6.0 / (SHAPE[0] + SHAPE[1]))
        assert np.abs(split).max() <= limit and np.abs(split).max() > 0.98 * limit


@pytest.mark.parametrize("initializer", [
    keras.initializers.Orthogonal(seed=2),
    keras.initializers.Identity(),
    keras.initializers.RandomUniform(seed=keras.random.SeedGenerator(1)),
    keras.initializers.Constant(np.arange(8, dtype=np.float32)),
    lambda shape, dtype=None: tf.reshape(tf.range(np.prod(shape), dtype=dtype), shape),
])
def test_other_initializers_give_the_whole_value_for_tf_to_slice(initializer):
    shape = (8, 8)
    value = _partitioned_init.initial_value(initializer, shape, "float32")
    part = value(partition_shape=(4, 8), partition_offset=(4, 0))
    assert tuple(part.shape) == shape  # TF slices [4:8] of it


def test_a_subclass_that_overrides_call_is_not_assumed_partitionable():
    class Shifted(keras.initializers.RandomUniform):
        def __call__(self, shape, dtype=None):
            return super().__call__(shape, dtype) + 1.0

    assert _partitioned_init.shard_initializer(Shifted(seed=1), SHAPE, (500, 0)) is None


# ---- a real cluster: 1 worker, 2 PS, a split table --------------------------
# Launched as separate processes (tf_async.launch), so the chief's peak RSS is
# its own: an in-process cluster would count the parameter servers' memory.

ROWS, DIM = 2_000_000, 32  # 256 MB table + 256 MB Adagrad slot over 2 PS
RESULT = "partitioned_init_result: "
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHIEF_SCRIPT = f"""
import json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, {REPO!r})
from tf_async.cluster import serve_forever_if_server_task
serve_forever_if_server_task()
from tests import test_partitioned_init
print({RESULT!r} + json.dumps(test_partitioned_init.chief_split_table()), flush=True)
"""


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM")


def chief_split_table() -> dict:
    """The chief of the launched cluster: builds and fits a split table."""
    import tf_async
    from tf_async import _rows

    partitioner = tf.distribute.experimental.partitioners.FixedShardsPartitioner(2)
    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=1, ps=2), variable_partitioner=partitioner)
    results = {"rss_before": _peak_rss_mb()}
    with strategy.scope():
        inputs = keras.Input((4,), dtype="int32")
        table = keras.layers.Embedding(
            ROWS, DIM, embeddings_initializer=keras.initializers.RandomUniform(-0.05, 0.05, seed=9),
            name="table")
        h = keras.layers.GlobalAveragePooling1D()(table(inputs))
        head = keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(0.5))
        model = keras.Model(inputs, head(h))
        model.compile(optimizer=keras.optimizers.Adagrad(0.1), loss="mse")
        # Split too (2 shards of 3 rows); Orthogonal needs the whole matrix.
        small = keras.layers.Embedding(6, 4, name="small",
                                       embeddings_initializer=keras.initializers.Orthogonal(seed=4))
        small.build((None,))
    results["small"] = np.asarray(small.embeddings.numpy()).tolist()
    results["small_shards"] = [list(p.shape) for p in _rows.shards(small.embeddings)]
    results["head"] = np.asarray(head.kernel.numpy()).tolist()
    results["head_shards"] = [list(p.shape) for p in _rows.shards(head.kernel)]
    x = np.random.default_rng(0).integers(0, ROWS, size=(64, 4)).astype("int32")
    y = np.zeros((64, 1), np.float32)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # builds the Adagrad slot
    results["rss_after"] = _peak_rss_mb()
    parts = _rows.shards(table.embeddings)
    results["shapes"] = [list(p.shape) for p in parts]
    results["devices"] = sorted(p.device.split("/device")[0] for p in parts)
    # Rows at both ends of each shard the fit did not touch, read where they live.
    probe = [0, 1, ROWS // 2 - 1, ROWS // 2, ROWS - 1]
    untouched = [i for i in probe if i not in set(x.ravel().tolist())]
    results["untouched_rows"] = untouched
    ids = tf.constant(untouched, tf.int64)
    results["table_rows"] = _rows.gather(table.embeddings, ids).numpy().tolist()
    accumulator = [a for a in model.optimizer.variables if tuple(a.shape) == (ROWS, DIM)]
    results["accumulator_rows"] = _rows.gather(accumulator[0], ids).numpy().tolist()
    return results


@pytest.mark.slow
def test_split_table_is_made_shard_by_shard_on_the_ps(tmp_path):
    script = tmp_path / "chief.py"
    script.write_text(CHIEF_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CONFIG", None)
    completed = subprocess.run(
        [sys.executable, "-m", "tf_async.launch", "--workers", "1", "--ps", "2", "--", str(script)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [line.partition(RESULT)[2] for line in completed.stdout.splitlines() if RESULT in line]
    assert completed.returncode == 0 and lines, completed.stdout[-3000:] + completed.stderr[-3000:]
    r = json.loads(lines[-1])
    half = ROWS // 2
    assert r["shapes"] == [[half, DIM]] * 2
    assert r["devices"] == ["/job:ps/replica:0/task:0", "/job:ps/replica:0/task:1"]
    assert r["untouched_rows"], "every probe row was looked up (change the data seed)"
    # The chief never held the 256 MB table or its 256 MB slot (before: the
    # whole initial value of each was made on the chief and sliced).
    table_mb = ROWS * DIM * 4 / 2**20
    grown = r["rss_after"] - r["rss_before"]
    assert grown < table_mb / 4, (grown, table_mb)
    # Each shard drew RandomUniform with its derived seed, on its PS.
    shard_values = {
        offset: np.asarray(keras.initializers.RandomUniform(
            -0.05, 0.05, seed=_partitioned_init.shard_seed(9, (offset, 0)))((half, DIM), "float32"))
        for offset in (0, half)
    }
    expected = [shard_values[0][i] if i < half else shard_values[half][i - half]
                for i in r["untouched_rows"]]
    np.testing.assert_array_equal(np.asarray(r["table_rows"], np.float32), np.stack(expected))
    # Adagrad's accumulator (Constant 0.1) per shard; untouched rows keep it.
    np.testing.assert_array_equal(np.asarray(r["accumulator_rows"], np.float32),
                                  np.full((len(expected), DIM), 0.1, np.float32))
    # Orthogonal: the whole value, sliced by TF (exact); Constant per shard.
    assert r["small_shards"] == [[3, 4], [3, 4]]
    np.testing.assert_array_equal(np.asarray(r["small"], np.float32),
                                  keras.initializers.Orthogonal(seed=4)((6, 4), "float32"))
    assert r["head_shards"] == [[DIM // 2, 1]] * 2
    np.testing.assert_array_equal(np.asarray(r["head"], np.float32), np.full((DIM, 1), 0.5, np.float32))
