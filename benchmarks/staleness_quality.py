"""Does delay compensation recover accuracy lost to staleness?

Real handwritten digits (MNIST via tfds if on disk, else scikit-learn's 8x8
digits), one MLP, same seed, same number of steps for every run:

* sync          SGD-momentum, one worker (no staleness);
* async M=8/16  ``SimulatedAsyncStrategy(M, "round_robin")`` (τ = M − 1) with
  SGD-momentum, DCSGD (adaptive λ), Adam, DCAdam.

λ is tuned honestly: one small grid per DC optimizer and M, the value chosen
by accuracy on a validation split carved out of the training set; the test
split is only used for the reported numbers. The whole grid is printed.

Final line: ``dc_minus_async_accuracy: X`` — at M = 16, the larger of
(DCSGD − SGD-momentum) and (DCAdam − Adam) test accuracy, in points.
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
from tf_async.keras_optimizers import DCAdam, DCSGD  # noqa: E402
from tf_async.strategies import SimulatedAsyncStrategy  # noqa: E402

# Base learning rates are shared by every run. SGD's was lowered from 0.05 to
# 0.005 because with momentum 0.9 and τ = 7 async SGD diverged to chance at
# 0.05, 0.02 and 0.01 (sync trains at all of them); Adam keeps Keras' 1e-3.
SGD_LR, MOMENTUM, ADAM_LR = 0.005, 0.9, 1e-3
DCSGD_GRID = (1.0, 2.0, 4.0, 8.0, 16.0)  # λ0 of adaptive DC-ASGD (paper: 2.0)
DCADAM_GRID = (0.2, 1.0, 4.0)         # constant λ fed to Adam's moments


def _optimizer(kind: str, lam: float = 0.0):
    if kind == "sgdm":
        return keras.optimizers.SGD(SGD_LR, momentum=MOMENTUM)
    if kind == "dcsgd":
        return DCSGD(SGD_LR, momentum=MOMENTUM, lambda_=lam, adaptive=True)
    if kind == "adam":
        return keras.optimizers.Adam(ADAM_LR)
    if kind == "dcadam":
        return DCAdam(ADAM_LR, lambda_=lam)
    raise ValueError(kind)


def train(kind, workers, lam, data, args, seed):
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
            keras.layers.Dense(args.hidden, activation="relu"),
            keras.layers.Dense(10),
        ])
        model.compile(_optimizer(kind, lam),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    model.fit(dataset, epochs=1, steps_per_epoch=args.steps, verbose=0)
    train_loss, _ = model.evaluate(x_train, y_train, verbose=0, batch_size=512)
    _, val_acc = model.evaluate(x_val, y_val, verbose=0, batch_size=512)
    test_loss, test_acc = model.evaluate(x_test, y_test, verbose=0, batch_size=512)
    if not np.isfinite(train_loss):
        val_acc = test_acc = 0.0
    return {"train_loss": train_loss, "val_acc": val_acc, "test_acc": test_acc,
            "test_loss": test_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short run (< 2 min): sync and M=16 only, 2-point λ grids")
    parser.add_argument("--steps", type=positive_int, default=None)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--hidden", type=positive_int, default=64)
    parser.add_argument("--seeds", type=positive_int, default=None, help="seeds averaged")
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 400 if args.quick else 800
    if args.seeds is None:
        args.seeds = 1 if args.quick else 2
    dcsgd_grid = (2.0, 4.0) if args.quick else DCSGD_GRID
    dcadam_grid = (1.0, 4.0) if args.quick else DCADAM_GRID

    name, (x_train, y_train, x_test, y_test) = load_digits_dataset(seed=0)
    cut = int(0.8 * len(x_train))
    data = (x_train[:cut], y_train[:cut], x_train[cut:], y_train[cut:], x_test, y_test)
    print(f"data: {name}; train {cut}, val {len(x_train) - cut}, test {len(x_test)}; "
          f"MLP {args.hidden}x2, batch {args.batch}, {args.steps} steps, "
          f"{args.seeds} seed(s); SGD lr {SGD_LR} momentum {MOMENTUM}; Adam lr {ADAM_LR}")

    start = time.time()

    def run(kind, workers, lam=0.0):
        results = [train(kind, workers, lam, data, args, seed) for seed in range(args.seeds)]
        return {key: float(np.mean([r[key] for r in results])) for key in results[0]}

    def best_on_grid(kind, workers, lams, label, symbol):
        """The row of the λ chosen on the validation split (the grid is printed)."""
        grid = {lam: run(kind, workers, lam) for lam in lams}
        best = max(grid, key=lambda lam: grid[lam]["val_acc"])
        print(f"  M={workers} {label} grid {symbol} -> val/test acc: " + ", ".join(
            f"{lam}: {r['val_acc']:.3f}/{r['test_acc']:.3f}" for lam, r in grid.items()))
        return ("async", workers, label, grid[best], f"{symbol}={best}")

    rows = [("sync", 1, "SGD-momentum", run("sgdm", 1), "")]
    for workers in ((16,) if args.quick else (8, 16)):
        rows.append(("async", workers, "SGD-momentum", run("sgdm", workers), ""))
        rows.append(best_on_grid("dcsgd", workers, dcsgd_grid, "DCSGD adaptive", "λ0"))
        rows.append(("async", workers, "Adam", run("adam", workers), ""))
        rows.append(best_on_grid("dcadam", workers, dcadam_grid, "DCAdam", "λ"))

    print(f"\n{'mode':6} {'M':>3}  {'optimizer':16} {'test acc':>8} {'final loss':>10}"
          f" {'val acc':>8}  chosen")
    for mode, workers, label, r, note in rows:
        print(f"{mode:6} {workers:>3}  {label:16} {100 * r['test_acc']:8.2f} "
              f"{r['train_loss']:10.4f} {100 * r['val_acc']:8.2f}  {note}")
    print("(final loss: training-set loss of the final weights)")
    print(f"wall time {time.time() - start:.0f}s")

    at16 = {label: r["test_acc"] for mode, workers, label, r, _ in rows if workers == 16}
    gain = max(at16["DCSGD adaptive"] - at16["SGD-momentum"], at16["DCAdam"] - at16["Adam"])
    print(f"dc_minus_async_accuracy: {100 * gain:.2f}")


if __name__ == "__main__":
    main()
