"""Staleness-robust optimizers: asynchronous accuracy vs synchronous.

scikit-learn's 8x8 handwritten digits (MNIST via tfds if on disk), MLP
64-128-10, batch 32, the same number of steps for every run. For each base,
SGD with momentum 0.9 and Adam:

1. sync: one worker, learning rate from a printed grid, chosen on a
   validation split carved out of the training set (the *sync-best* rate);
2. async M = 16 and 32: ``SimulatedAsyncStrategy(M, "round_robin")`` (τ = M − 1)
   with the plain base at the sync-best rate and with the recommended tf_async
   method GapAware(DANA base) (``GapAware(DanaSGD)`` / ``GapAware(DanaAdam)``;
   ``--all_methods`` adds GapAware(base) without the look-ahead), each
   with its learning rate chosen on the validation split from
   {sync-best, sync-best / 3} (seed 0; the chosen rate is then run on every
   seed). The test split is only used for the reported numbers.

Numbers are means over ``--seeds`` seeds, with the spread (min–max) printed.

Final line: ``worst_gap_to_sync_points: X`` — the minimum over
{SGD-momentum, Adam} x {M = 16, 32} of (recommended method − sync) test
accuracy in points. Recommended: GapAware(DanaSGD) and GapAware(DanaAdam).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _flags import positive_int  # noqa: E402 (benchmarks/ is on sys.path)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from _data import load_digits_dataset  # noqa: E402
from tf_async.keras_optimizers import DanaAdam, DanaSGD, GapAware  # noqa: E402
from tf_async.strategies import SimulatedAsyncStrategy  # noqa: E402

MOMENTUM = 0.9
SYNC_GRID = {"SGD-momentum": (0.01, 0.03, 0.1), "Adam": (1e-3, 3e-3)}
RECOMMENDED = {"SGD-momentum": "GapAware(DanaSGD)", "Adam": "GapAware(DanaAdam)"}


def make_optimizer(base: str, method: str, lr: float):
    if base == "SGD-momentum":
        plain = lambda: keras.optimizers.SGD(lr, momentum=MOMENTUM)  # noqa: E731
        dana = lambda: DanaSGD(lr, momentum=MOMENTUM)  # noqa: E731
    else:
        plain = lambda: keras.optimizers.Adam(lr)  # noqa: E731
        dana = lambda: DanaAdam(lr)  # noqa: E731
    if method == "base":
        return plain()
    if method.startswith("GapAware(Dana"):
        return GapAware(dana())
    if method == "GapAware":
        return GapAware(plain())
    raise ValueError(method)


def methods_for(base: str, every: bool):
    return ("base", "GapAware", RECOMMENDED[base]) if every else ("base", RECOMMENDED[base])


def train(base, method, lr, workers, data, args, seed):
    x_train, y_train, x_val, y_val, x_test, y_test = data
    strategy = (SimulatedAsyncStrategy(workers, "round_robin") if workers > 1
                else tf.distribute.OneDeviceStrategy("/cpu:0"))
    keras.utils.set_random_seed(seed)
    dataset = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
               .shuffle(len(x_train), seed=seed).repeat().batch(args.batch))
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((x_train.shape[1],)),
            keras.layers.Dense(args.hidden, activation="relu"),
            keras.layers.Dense(10),
        ])
        model.compile(make_optimizer(base, method, lr),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], jit_compile=True)
    model.fit(dataset, epochs=1, steps_per_epoch=args.steps, verbose=0)
    train_loss, _ = model.evaluate(x_train, y_train, verbose=0, batch_size=512)
    _, val_acc = model.evaluate(x_val, y_val, verbose=0, batch_size=512)
    _, test_acc = model.evaluate(x_test, y_test, verbose=0, batch_size=512)
    if not np.isfinite(train_loss):
        val_acc = test_acc = 0.0
    return {"val": 100 * val_acc, "test": 100 * test_acc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short run (< 10 min): 600 steps, one seed")
    parser.add_argument("--steps", type=positive_int, default=None)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--hidden", type=positive_int, default=128)
    parser.add_argument("--seeds", type=positive_int, default=None, help="seeds averaged")
    parser.add_argument("--workers", default="16,32", help="comma-separated M values")
    parser.add_argument("--all_methods", action="store_true",
                        help="also GapAware without the look-ahead")
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 600 if args.quick else 1500
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    worker_counts = [int(m) for m in args.workers.split(",")]

    name, (x_train, y_train, x_test, y_test) = load_digits_dataset(seed=0)
    cut = int(0.8 * len(x_train))
    data = (x_train[:cut], y_train[:cut], x_train[cut:], y_train[cut:], x_test, y_test)
    print(f"data: {name}; train {cut}, val {len(x_train) - cut}, test {len(x_test)}; "
          f"MLP {x_train.shape[1]}-{args.hidden}-10, batch {args.batch}, {args.steps} steps, "
          f"{args.seeds} seed(s); SGD momentum {MOMENTUM}", flush=True)
    start = time.time()
    seeds = range(args.seeds)

    def choose(base, method, workers, lrs):
        """lr chosen on validation accuracy (seed 0); the grid is printed."""
        grid = {lr: train(base, method, lr, workers, data, args, 0) for lr in lrs}
        best = max(grid, key=lambda lr: grid[lr]["val"])
        print(f"  {base:12} {method:20} M={workers:<3} lr grid (val/test): " + ", ".join(
            f"{lr:g}: {r['val']:.1f}/{r['test']:.1f}" for lr, r in grid.items()), flush=True)
        return best, grid[best]

    def over_seeds(base, method, lr, workers, first):
        tests = [first["test"]] + [
            train(base, method, lr, workers, data, args, seed)["test"] for seed in seeds[1:]]
        print(f"  {base:12} {method:20} M={workers:<3} lr {lr:g} test per seed: "
              + ", ".join(f"{t:.1f}" for t in tests), flush=True)  # kept if a run dies
        return float(np.mean(tests)), float(min(tests)), float(max(tests))

    rows = []  # (base, M, method, lr, mean, lo, hi)
    gaps = []
    for base in SYNC_GRID:
        lr_sync, first = choose(base, "base", 1, SYNC_GRID[base])
        sync = over_seeds(base, "base", lr_sync, 1, first)
        rows.append((base, 1, "base", lr_sync) + sync)
        for workers in worker_counts:
            for method in methods_for(base, args.all_methods):
                lrs = (lr_sync,) if method == "base" else (lr_sync, lr_sync / 3)
                lr, first = choose(base, method, workers, lrs)
                result = over_seeds(base, method, lr, workers, first)
                rows.append((base, workers, method, lr) + result)
                if method == RECOMMENDED[base]:
                    gaps.append((result[0] - sync[0], base, workers))

    print(f"\n{'base':12} {'M':>3}  {'method':20} {'lr':>7} {'test acc':>8}  spread (min-max)")
    for base, workers, method, lr, mean, lo, hi in rows:
        print(f"{base:12} {workers:>3}  {method:20} {lr:7.4g} {mean:8.2f}  {lo:.2f}-{hi:.2f}")
    print(f"wall time {time.time() - start:.0f}s")
    worst = min(gaps)
    print(f"(worst: {worst[1]} at M={worst[2]})")
    print(f"worst_gap_to_sync_points: {worst[0]:.2f}")


if __name__ == "__main__":
    main()
