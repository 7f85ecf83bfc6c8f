"""DLRM-style click-through model, trained with async parameter-server ``model.fit``.

    python examples/recommender.py --quick                       # < 2 min, synthetic data
    python examples/recommender.py                               # tables of up to 1e6 rows
    python examples/recommender.py --data_path=/data/criteo/train.txt --max_examples=2000000
    python -m tf_async.launch --workers 2 --ps 2 -- examples/recommender.py --quick

Model (DLRM, Naumov et al. 2019): the 13 dense features go through a bottom MLP
to a ``--embedding_dim`` vector; each of the 26 categorical features is looked
up in its own ``keras.layers.Embedding`` table (rows: the feature's Criteo
cardinality capped at ``--max_rows``, i.e. tables of 1e5-1e6 rows for the big
features); the pairwise dot products of all 27 vectors plus the bottom vector
feed a top MLP with a sigmoid click probability.

Training: ``tf_async.strategies.AsyncParameterServerStrategy`` over the
embedded ``tf_async.local_cluster(--workers, --ps)`` (or the launched cluster
under TF_CONFIG); every variable larger than 1 MiB (the big tables) is split
over the ``--ps`` parameter servers by
``tf.distribute.experimental.partitioners.MinSizePartitioner``. The tables get
row-sparse steps: only the rows of a batch travel and are updated (stock
Adagrad by default, ``--optimizer=lazy_adam`` for
``tf_async.keras_optimizers.LazyAdam``). The last line printed is
``test_auc: X``.

Data: without ``--data_path``, a seeded synthetic dataset with Criteo's shape
(13 log-normal counts, 26 Zipf-distributed categorical ids per example, labels
drawn from a logistic model of both, so there is signal to learn; generated
here, offline). With ``--data_path`` (one or more comma-separated files in the
Criteo Kaggle display-advertising ``train.txt`` format: ``label \\t I1..I13 \\t
C1..C26``, tab-separated, empty fields for missing values, C* as hex strings),
the first ``--max_examples`` lines are read: dense features become
``log(1 + max(x, 0))`` (missing: 0), categorical hex values are hashed into
their table (missing: row 0); the last 10% are the test set.
"""

from __future__ import annotations

import os
import sys
from typing import List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small run (< 2 min): tables capped at 1e5 rows, few steps.")
flags.DEFINE_string("data_path", None,
                    "Criteo Kaggle train.txt file(s), comma-separated; default: synthetic data.")
flags.DEFINE_integer("max_examples", 1_000_000, "Criteo: lines read from --data_path.",
                     lower_bound=10)
flags.DEFINE_integer("num_examples", 200_000, "Synthetic: examples generated.", lower_bound=10)
flags.DEFINE_integer("max_rows", 1_000_000, "Rows of the largest tables (Criteo "
                     "cardinalities are capped at this).", lower_bound=1)
flags.DEFINE_integer("embedding_dim", 16, "Width of every table and of the bottom MLP output.",
                     lower_bound=1)
flags.DEFINE_integer("workers", 2, "Workers of the embedded cluster.", lower_bound=1)
flags.DEFINE_integer("ps", 2, "Parameter servers of the embedded cluster (tables split "
                     "over them).", lower_bound=1)
flags.DEFINE_enum("optimizer", "adagrad", ["adagrad", "lazy_adam"],
                  "adagrad: keras.optimizers.Adagrad (row-sparse under the strategy); "
                  "lazy_adam: tf_async.keras_optimizers.LazyAdam.")
flags.DEFINE_float("learning_rate", None, "Learning rate (default: 0.05 adagrad, 1e-3 lazy_adam).")
flags.DEFINE_integer("epochs", 4, "Epochs.", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", 200, "Steps (batches) per epoch.", lower_bound=1)
flags.DEFINE_integer("batch_size", 256, "Batch size per step.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the synthetic data and of the initializers.")

NUM_DENSE = 13
# Per-feature cardinalities of Criteo's Kaggle display-advertising train.txt (C1..C26).
CRITEO_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)
NUM_CATEGORICAL = len(CRITEO_CARDINALITIES)

Data = Tuple[np.ndarray, np.ndarray, np.ndarray]  # dense float32, ids int32, labels float32


def table_rows(max_rows: int) -> List[int]:
    """Rows of each categorical feature's table: its cardinality, capped."""
    return [min(c, max_rows) for c in CRITEO_CARDINALITIES]


def synthetic_criteo(num_examples: int, rows: Sequence[int], seed: int = 0) -> Data:
    """Criteo-shaped examples with a learnable logistic signal.

    Ids are Zipf-like (a few frequent values per feature, a long tail), each id
    has a hidden effect on the click logit, and so do the log dense counts."""
    rng = np.random.default_rng(seed)
    counts = np.floor(rng.lognormal(mean=1.0, sigma=1.5, size=(num_examples, NUM_DENSE)))
    dense = np.log1p(counts).astype("float32")
    ids = np.empty((num_examples, len(rows)), dtype="int32")
    logit = dense @ rng.normal(0.0, 0.3, size=NUM_DENSE) - 1.0
    for f, n in enumerate(rows):
        rank = np.floor(n ** rng.random(num_examples) - 1).astype("int64")  # log-uniform rank
        permutation_seed = int(rng.integers(1 << 30))
        ids[:, f] = (rank * 2654435761 + permutation_seed) % n  # scatter ranks over the table
        head = min(n, 1000)  # the frequent ids carry the signal
        effect = rng.normal(0.0, 0.6, size=head)
        logit += np.where(rank < head, effect[np.minimum(rank, head - 1)], 0.0)
    labels = (rng.random(num_examples) < 1.0 / (1.0 + np.exp(-logit))).astype("float32")
    return dense, ids, labels


def write_criteo_tsv(path: str, dense_counts: np.ndarray, categorical: Sequence[Sequence[str]],
                     labels: np.ndarray) -> None:
    """Writes examples in Criteo train.txt format (None / NaN -> empty field)."""
    with open(path, "w", encoding="ascii") as out:
        for label, counts, cats in zip(labels, dense_counts, categorical):
            fields = [str(int(label))]
            fields += ["" if np.isnan(c) else str(int(c)) for c in counts]
            fields += ["" if c is None else c for c in cats]
            out.write("\t".join(fields) + "\n")


def hash_category(value: str, rows: int) -> int:
    """A Criteo categorical hex string's row in a table of ``rows`` rows (empty: row 0)."""
    if not value:
        return 0
    return 1 + int(value, 16) % (rows - 1) if rows > 1 else 0


def load_criteo(paths: Sequence[str], rows: Sequence[int], max_examples: int) -> Data:
    """The first ``max_examples`` lines of Criteo train.txt file(s) as arrays."""
    dense, ids, labels = [], [], []
    for path in paths:
        with open(path, encoding="ascii", errors="replace") as handle:
            for line_number, line in enumerate(handle, 1):
                if len(labels) >= max_examples:
                    break
                fields = line.rstrip("\r\n").split("\t")
                if len(fields) != 1 + NUM_DENSE + NUM_CATEGORICAL:
                    raise ValueError(
                        f"--data_path: {path}:{line_number} has {len(fields)} tab-separated "
                        f"fields; Criteo train.txt lines have {1 + NUM_DENSE + NUM_CATEGORICAL} "
                        "(label, I1..I13, C1..C26).")
                labels.append(float(fields[0]))
                dense.append([np.log1p(max(int(v), 0)) if v else 0.0
                              for v in fields[1:1 + NUM_DENSE]])
                ids.append([hash_category(v, n)
                            for v, n in zip(fields[1 + NUM_DENSE:], rows)])
    if not labels:
        raise ValueError(f"--data_path: no examples in {list(paths)}.")
    return (np.asarray(dense, dtype="float32"), np.asarray(ids, dtype="int32"),
            np.asarray(labels, dtype="float32"))


def make_model(rows: Sequence[int], dim: int, seed: int = 0):
    """DLRM: bottom MLP, one table per feature, pairwise dot interactions, top MLP."""
    import keras
    from keras import ops

    dense_in = keras.Input((NUM_DENSE,), name="dense_features")
    ids_in = keras.Input((len(rows),), dtype="int32", name="categorical_ids")
    bottom = keras.layers.Dense(64, activation="relu")(dense_in)
    bottom = keras.layers.Dense(dim, activation="relu")(bottom)
    vectors = [bottom]
    for f, n in enumerate(rows):
        table = keras.layers.Embedding(
            n, dim, embeddings_initializer=keras.initializers.RandomUniform(-0.05, 0.05, seed + f),
            name=f"table_{f}")
        vectors.append(table(ids_in[:, f]))
    stacked = ops.stack(vectors, axis=1)  # (batch, 27, dim)
    dots = ops.matmul(stacked, ops.transpose(stacked, (0, 2, 1)))  # (batch, 27, 27)
    upper = [i * len(vectors) + j for i in range(len(vectors)) for j in range(i)]
    pairs = ops.take(ops.reshape(dots, (-1, len(vectors) ** 2)), upper, axis=1)
    top = ops.concatenate([bottom, pairs], axis=1)
    top = keras.layers.Dense(64, activation="relu")(top)
    click = keras.layers.Dense(1, activation="sigmoid")(top)
    return keras.Model({"dense_features": dense_in, "categorical_ids": ids_in}, click)


def load_data(rows: Sequence[int]) -> Tuple[Data, Data, str]:
    if FLAGS.data_path:
        paths = FLAGS.data_path.split(",")
        dense, ids, labels = load_criteo(paths, rows, FLAGS.max_examples)
        name = f"criteo ({', '.join(paths)})"
    else:
        dense, ids, labels = synthetic_criteo(FLAGS.num_examples, rows, FLAGS.seed)
        name = "synthetic criteo-shaped (offline)"
    split = int(0.9 * len(labels))
    train = (dense[:split], ids[:split], labels[:split])
    test = (dense[split:], ids[split:], labels[split:])
    return train, test, name


def main(argv):
    del argv
    import tf_async

    logging.set_verbosity(logging.WARNING)
    tf_async.cluster.serve_forever_if_server_task()  # launched worker/ps tasks stop here
    if FLAGS.quick:
        FLAGS.max_rows = min(FLAGS.max_rows, 100_000)
        FLAGS.num_examples = min(FLAGS.num_examples, 60_000)
        FLAGS.epochs, FLAGS.steps_per_epoch = min(FLAGS.epochs, 2), min(FLAGS.steps_per_epoch, 100)
    import keras
    import tensorflow as tf

    rows = table_rows(FLAGS.max_rows)
    (x_dense, x_ids, y), (t_dense, t_ids, t_y), name = load_data(rows)
    print(f"dataset: {name} ({len(y)} train / {len(t_y)} test, click rate {y.mean():.3f})")
    print(f"tables: {len(rows)}, {sum(rows)} rows in all, largest {max(rows)}")

    resolver = (tf.distribute.cluster_resolver.TFConfigClusterResolver()
                if os.environ.get("TF_CONFIG")
                else tf_async.local_cluster(workers=FLAGS.workers, ps=FLAGS.ps))
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=1 << 20, max_shards=FLAGS.ps)
    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        resolver, variable_partitioner=partitioner)
    with strategy.scope():
        model = make_model(rows, FLAGS.embedding_dim, FLAGS.seed)
        if FLAGS.optimizer == "adagrad":
            optimizer = keras.optimizers.Adagrad(FLAGS.learning_rate or 0.05)
        else:
            optimizer = tf_async.keras_optimizers.LazyAdam(FLAGS.learning_rate or 1e-3)
        model.compile(optimizer=optimizer, loss="binary_crossentropy",
                      metrics=[keras.metrics.AUC(name="auc")])

    def dataset_fn(input_context=None):
        dataset = tf.data.Dataset.from_tensor_slices(
            ({"dense_features": x_dense, "categorical_ids": x_ids}, y))
        if input_context is not None and input_context.num_input_pipelines > 1:
            dataset = dataset.shard(input_context.num_input_pipelines,
                                    input_context.input_pipeline_id)
        return dataset.shuffle(50_000, seed=FLAGS.seed).repeat().batch(
            FLAGS.batch_size, drop_remainder=True)

    history = model.fit(dataset_fn, epochs=FLAGS.epochs, steps_per_epoch=FLAGS.steps_per_epoch,
                        verbose=2)
    if "staleness_mean" in history.history:
        print(f"staleness_mean: {history.history['staleness_mean'][-1]:.4f}")
    _, auc = model.evaluate({"dense_features": t_dense, "categorical_ids": t_ids}, t_y,
                            batch_size=1024, verbose=0)
    print(f"test_auc: {auc:.4f}")


if __name__ == "__main__":
    app.run(main)
