"""Local SGD vs synchronous MirroredStrategy: collectives and step time.

    python benchmarks/local_sgd.py [--quick] [--steps N]

4 replicas (logical CPU devices), an MLP on synthetic classification data,
``model.fit`` with Adam. Runs synchronous ``MirroredStrategy`` and
``LocalUpdateStrategy(sync_every=H)`` for H in {1, 4, 16}, each for the same
number of steps from the same initial weights, in this one process.

Collectives are COUNTED, not estimated: every strategy gets a
``CountingCrossDeviceOps`` (a ``tf.distribute.ReductionToOneDevice`` whose
``reduce`` / ``batch_reduce`` implementations increment in-graph counters), so
a collective inside a ``tf.cond`` branch that does not run is not counted.
"launches" counts cross-replica reduce calls (a batched all-reduce of many
tensors is one launch), "tensors" counts the tensors reduced. Keras' loss
metrics are replica-local (ON_READ) and cost no collective per step.

Final line: ``collectives_per_step_at_h16: X`` (launches; sync = 1 per step,
goal exactly 1/16 of it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _flags import positive_int  # noqa: E402 (benchmarks/ is on sys.path)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

NUM_REPLICAS = 4
cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_REPLICAS
)

import keras  # noqa: E402

tf.get_logger().setLevel("ERROR")

from tf_async.strategies import LocalUpdateStrategy  # noqa: E402


class CountingCrossDeviceOps(tf.distribute.ReductionToOneDevice):
    """ReductionToOneDevice that counts, in the graph, what it reduces."""

    def __init__(self) -> None:
        super().__init__()
        with tf.device("/cpu:0"):
            self.launches = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.tensors = tf.Variable(0, dtype=tf.int64, trainable=False)

    def _count(self, tensors: int) -> None:
        with tf.device("/cpu:0"):
            self.launches.assign_add(1)
            self.tensors.assign_add(tensors)

    # The public entry points (the *_implementation methods call each other).
    def reduce(self, reduce_op, per_replica_value, destinations, options=None):
        self._count(1)
        return super().reduce(reduce_op, per_replica_value, destinations, options)

    def batch_reduce(self, reduce_op, value_destination_pairs, options=None):
        self._count(len(value_destination_pairs))
        return super().batch_reduce(reduce_op, value_destination_pairs, options)

    def counts(self) -> tuple:
        return int(self.launches.numpy()), int(self.tensors.numpy())


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 256)).astype("float32")
    w = rng.normal(size=(256, 10)).astype("float32")
    y = np.argmax(np.tanh(x @ w) + 0.3 * rng.normal(size=(n, 10)), axis=1).astype("int32")
    return x, y


def build(strategy):
    with strategy.scope():
        keras.utils.set_random_seed(7)
        model = keras.Sequential(
            [
                keras.Input((256,)),
                keras.layers.Dense(512, activation="relu"),
                keras.layers.Dense(256, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    return model


class Config:
    """One strategy + model, trained chunk by chunk (chunks interleaved)."""

    CHUNK = 16  # steps per fit() call: a multiple of every H, so fit's
    # epoch-end flush never adds a synchronisation.

    def __init__(self, name, strategy, ops, data, batch):
        self.name, self.strategy, self.ops = name, strategy, ops
        self.x, self.y, self.x_test, self.y_test = data
        self.per_step = batch * NUM_REPLICAS
        self.model = build(strategy)
        self.offset = 0
        self.times, self.steps, self.launches, self.tensors = [], 0, 0, 0
        self.train_loss, self.divergence = float("nan"), 0.0
        self.chunk(timed=False)  # warm-up: traces and compiles

    def chunk(self, timed=True):
        n = self.CHUNK * self.per_step
        x, y = self.x[self.offset : self.offset + n], self.y[self.offset : self.offset + n]
        self.offset += n
        launches0, tensors0 = self.ops.counts()
        start = time.perf_counter()
        history = self.model.fit(x, y, batch_size=self.per_step, shuffle=False, verbose=0)
        seconds = time.perf_counter() - start
        launches1, tensors1 = self.ops.counts()
        self.train_loss = history.history["loss"][-1]
        self.divergence = history.history.get("local_divergence", [0.0])[-1]
        if timed:
            self.times.append(seconds / self.CHUNK)
            self.steps += self.CHUNK
            self.launches += launches1 - launches0
            self.tensors += tensors1 - tensors0

    def report(self):
        self.step_ms = 1000.0 * float(np.median(self.times))
        self.launches_per_step = self.launches / self.steps
        test_loss = float(self.model.evaluate(self.x_test, self.y_test, batch_size=1024, verbose=0))
        print(
            f"{self.name:>10}: step {self.step_ms:7.2f} ms (median of {len(self.times)} chunks)  "
            f"collectives/step {self.launches_per_step:.4f} launches, "
            f"{self.tensors / self.steps:.4f} tensors  loss after {self.offset // self.per_step} "
            f"steps: train {self.train_loss:.4f} test {test_loss:.4f}  "
            f"local_divergence {self.divergence:.4f}",
            flush=True,
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 2 minutes)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="timed steps per config (rounded to multiples of 16)")
    parser.add_argument("--batch", type=positive_int, default=64, help="per-replica batch size")
    args = parser.parse_args(argv)
    rounds = max(1, (args.steps or (48 if args.quick else 320)) // Config.CHUNK)
    steps = rounds * Config.CHUNK
    warmup = Config.CHUNK
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    total = args.batch * NUM_REPLICAS * (warmup + steps)
    x, y = make_data(total + 2048)
    data = (x[:total], y[:total], x[total:], y[total:])
    print(f"{NUM_REPLICAS} replicas, per-replica batch {args.batch}, {warmup} warm-up "
          f"+ {steps} timed steps, Adam 1e-3", flush=True)

    configs = []
    ops = CountingCrossDeviceOps()
    configs.append(Config("sync", tf.distribute.MirroredStrategy(devices, cross_device_ops=ops),
                          ops, data, args.batch))
    for h in (1, 4, 16):
        ops = CountingCrossDeviceOps()
        strategy = LocalUpdateStrategy(
            tf.distribute.MirroredStrategy(devices, cross_device_ops=ops), sync_every=h
        )
        configs.append(Config(f"local H={h}", strategy, ops, data, args.batch))
    for _ in range(rounds):  # interleaved, so machine load hits all alike
        for config in configs:
            config.chunk()
    for config in configs:
        config.report()
    sync = configs[0]
    results = {h: c for h, c in zip((1, 4, 16), configs[1:])}
    for h, r in results.items():
        ratio = r.launches_per_step / sync.launches_per_step
        print(f"H={h:>2}: collectives {ratio:.4f}x sync, step time "
              f"{r.step_ms / sync.step_ms:.3f}x sync", flush=True)
    print(f"collectives_per_step_at_h16: {results[16].launches_per_step:.4f}")


if __name__ == "__main__":
    main()
