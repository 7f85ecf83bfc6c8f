"""Staleness-robust optimizers: asynchronous accuracy vs synchronous.

Two tasks on scikit-learn's 8x8 handwritten digits (MNIST via tfds if on
disk): ``mlp`` (MLP 64-128-10) and ``cnn`` (a small conv net on the 8x8
images: conv 3x3x16, max-pool 2, conv 3x3x32, dense 10). Batch 32, the same
number of steps for every run. The training set is split 80/20 into train and
validation; the test split is only used for the reported numbers. For each
task and base, SGD with momentum 0.9 and Adam:

1. sync: one worker, the learning rate from a printed grid (``SYNC_GRID``)
   chosen on validation accuracy averaged over the seeds (the *sync-best*
   rate);
2. async M in ``--workers`` (8, 16, 32; ``--quick``: 16, 32):
   ``SimulatedAsyncStrategy(M, "round_robin")`` (τ = M − 1) with the plain
   base at the sync-best rate and the recommended tf_async method
   (``RECOMMENDED``: GapAware around DANA-Zero, one momentum buffer per
   worker; ``--all_methods`` adds GapAware(base) without a look-ahead,
   GapAware around the single-buffer DANA look-ahead and DANA-Zero alone),
   each method's hyper-parameters chosen from a printed grid (``method_grid``:
   learning rate 3×, 1×, ⅓ of sync-best) on validation accuracy averaged
   over the seeds;
3. ``AsyncParameterServerStrategy`` with ``--ps_workers`` (8) in-process
   workers (real, not simulated, staleness; ``mlp`` task): the same
   comparison, the measured ``staleness_mean`` printed. ``--ps_workers 0``
   skips it.

Every run of a grid is repeated on each of ``--seeds`` seeds (quick: 2, full:
3); numbers are means over seeds with the spread (min–max).

Final line: ``worst_gap_to_sync_points: X`` — the minimum over the tasks x
{SGD-momentum, Adam} x {M = 16, 32} of (best tf_async method, chosen on
validation − sync) test accuracy in points.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _flags import non_negative_int, positive_int  # noqa: E402 (benchmarks/ is on sys.path)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# TensorFlow, Keras and tf_async are imported by _load() after the flags are
# parsed: a bad flag costs a second, not TensorFlow's import.
keras = np = tf = None
DanaAdam = DanaSGD = DanaZeroAdam = DanaZeroSGD = GapAware = SimulatedAsyncStrategy = None
load_digits_dataset = None


def _load() -> None:
    global keras, np, tf, DanaAdam, DanaSGD, DanaZeroAdam, DanaZeroSGD, GapAware
    global SimulatedAsyncStrategy, load_digits_dataset
    import keras as _keras
    import numpy as _np
    import tensorflow as _tf

    from _data import load_digits_dataset as _load_digits
    from tf_async import keras_optimizers as _optimizers
    from tf_async.strategies import SimulatedAsyncStrategy as _Simulated

    keras, np, tf = _keras, _np, _tf
    DanaAdam, DanaSGD = _optimizers.DanaAdam, _optimizers.DanaSGD
    DanaZeroAdam, DanaZeroSGD = _optimizers.DanaZeroAdam, _optimizers.DanaZeroSGD
    GapAware, SimulatedAsyncStrategy = _optimizers.GapAware, _Simulated
    load_digits_dataset = _load_digits


MOMENTUM = 0.9
TASKS = ("mlp", "cnn")
BASES = ("SGD-momentum", "Adam")
SYNC_GRID = {"SGD-momentum": (0.01, 0.03, 0.1, 0.3), "Adam": (3e-4, 1e-3, 3e-3)}
RECOMMENDED = {"SGD-momentum": "GapAware(DanaZeroSGD)", "Adam": "GapAware(DanaZeroAdam)"}
OTHER_METHODS = {  # --all_methods
    "SGD-momentum": ("GapAware", "GapAware(DanaSGD)", "DanaZeroSGD"),
    "Adam": ("GapAware", "GapAware(DanaAdam)", "DanaZeroAdam"),
}
GAP_WORKERS = (16, 32)  # the final line's M


def make_optimizer(base: str, method: str, config: dict, workers: int = 1):
    """``workers``: the strategy's worker count (DANA-Zero's ``num_workers``)."""
    lr = config["lr"]
    if base == "SGD-momentum":
        momentum = config.get("momentum", MOMENTUM)
        plain = lambda: keras.optimizers.SGD(lr, momentum=momentum)  # noqa: E731
        dana = lambda: DanaSGD(lr, momentum=momentum)  # noqa: E731
        zero = lambda: DanaZeroSGD(lr, momentum=momentum, num_workers=workers)  # noqa: E731
    else:
        plain = lambda: keras.optimizers.Adam(lr)  # noqa: E731
        dana = lambda: DanaAdam(lr)  # noqa: E731
        zero = lambda: DanaZeroAdam(lr, num_workers=workers)  # noqa: E731
    makers = {"base": plain, "GapAware": lambda: GapAware(plain()),
              "GapAware(DanaSGD)": lambda: GapAware(dana()),
              "GapAware(DanaAdam)": lambda: GapAware(dana()),
              "GapAware(DanaZeroSGD)": lambda: GapAware(zero()),
              "GapAware(DanaZeroAdam)": lambda: GapAware(zero()),
              "DanaZeroSGD": zero, "DanaZeroAdam": zero}
    if method not in makers:
        raise ValueError(method)
    return makers[method]()


def methods_for(base: str, every: bool):
    if every:
        return ("base", *OTHER_METHODS[base], RECOMMENDED[base])
    return ("base", RECOMMENDED[base])


def method_grid(base: str, method: str, lr_sync: float):
    """The hyper-parameter candidates of ``method`` (the base: the sync-best rate)."""
    if method == "base":
        return [{"lr": lr_sync}]
    return [{"lr": 3 * lr_sync}, {"lr": lr_sync}, {"lr": lr_sync / 3}]


def build_model(task: str, inputs: int, hidden: int) -> keras.Model:
    if task == "mlp":
        return keras.Sequential([
            keras.Input((inputs,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(10),
        ])
    side = int(round(inputs ** 0.5))
    return keras.Sequential([
        keras.Input((inputs,)),
        keras.layers.Reshape((side, side, 1)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])


def _accuracy(model, x, y) -> float:
    logits = np.asarray(model(x, training=False))
    if not np.all(np.isfinite(logits)):
        return 0.0
    return 100.0 * float(np.mean(np.argmax(logits, -1) == y))


def train(task, base, method, config, strategy, data, args, seed):
    """One run; returns validation and test accuracy (points) and the strategy's
    last ``staleness_mean`` (None without one)."""
    x_train, y_train, x_val, y_val, x_test, y_test = data
    keras.utils.set_random_seed(seed)
    dataset = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
               .shuffle(len(x_train), seed=seed).repeat().batch(args.batch))
    workers = getattr(strategy, "num_workers", 1)
    with strategy.scope():
        model = build_model(task, x_train.shape[1], args.hidden)
        model.compile(make_optimizer(base, method, config, workers),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=args.jit)
    history = model.fit(dataset, epochs=1, steps_per_epoch=args.steps, verbose=0)
    tau = history.history.get("staleness_mean", [None])[-1]
    return {"val": _accuracy(model, x_val, y_val), "test": _accuracy(model, x_test, y_test),
            "tau": tau}


def simulated(workers: int):
    if workers == 1:
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    return SimulatedAsyncStrategy(workers, "round_robin")


def _describe(config: dict) -> str:
    return " ".join(f"{key} {value:g}" for key, value in config.items())


def select(label, task, base, method, grid, strategy_for, data, args):
    """Every candidate on every seed; the one with the best mean validation
    accuracy wins. Prints the grid (val/test means) and the winner's seeds."""
    seeds = range(args.seeds)
    runs = [[train(task, base, method, config, strategy_for(), data, args, seed)
             for seed in seeds] for config in grid]
    means = [float(np.mean([r["val"] for r in results])) for results in runs]
    print(f"  {task:4} {base:12} {method:22} {label:6} grid (val/test mean): " + ", ".join(
        f"[{_describe(c)}] {v:.2f}/{np.mean([r['test'] for r in rs]):.2f}"
        for c, v, rs in zip(grid, means, runs)), flush=True)
    best = int(np.argmax(means))
    tests = [r["test"] for r in runs[best]]
    taus = [r["tau"] for r in runs[best] if r["tau"] is not None]
    print(f"  {task:4} {base:12} {method:22} {label:6} chosen [{_describe(grid[best])}] "
          f"test per seed: " + ", ".join(f"{t:.2f}" for t in tests)
          + (f"; staleness_mean {np.mean(taus):.2f}" if taus else ""), flush=True)
    return {"config": grid[best], "val": means[best], "test": float(np.mean(tests)),
            "lo": float(min(tests)), "hi": float(max(tests))}


def parse_workers(text: str):
    try:
        values = [int(m) for m in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated ints >= 2, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short run (< 10 min): 1000 steps, 2 seeds, M = 16, 32")
    parser.add_argument("--steps", type=positive_int, default=None)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--hidden", type=positive_int, default=128)
    parser.add_argument("--seeds", type=positive_int, default=None,
                        help="seeds averaged (quick 2, full 3)")
    parser.add_argument("--workers", type=parse_workers, default=None,
                        help="comma-separated simulated M values (quick 16,32; full 8,16,32)")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--bases", default=",".join(BASES),
                        help=f"comma-separated subset of {','.join(BASES)}")
    parser.add_argument("--ps_workers", type=non_negative_int, default=8,
                        help="in-process AsyncParameterServerStrategy workers (0: skip)")
    parser.add_argument("--all_methods", action="store_true",
                        help="also GapAware without a look-ahead, GapAware with the "
                        "single-buffer DANA look-ahead and DANA-Zero alone")
    parser.add_argument("--jit", action="store_true", help="jit_compile=True (slower to compile)")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    if not tasks or any(task not in TASKS for task in tasks):
        parser.error(f"argument --tasks: each must be one of {', '.join(TASKS)}, "
                     f"got {args.tasks!r}")
    bases = args.bases.split(",")
    if not bases or any(base not in BASES for base in bases):
        parser.error(f"argument --bases: each must be one of {', '.join(BASES)}, "
                     f"got {args.bases!r}")
    if args.steps is None:
        args.steps = 1000 if args.quick else 1500
    if args.seeds is None:
        args.seeds = 2 if args.quick else 3
    if args.workers is None:
        args.workers = [16, 32] if args.quick else [8, 16, 32]
    _load()

    name, (x_train, y_train, x_test, y_test) = load_digits_dataset(seed=0)
    cut = int(0.8 * len(x_train))
    data = (x_train[:cut], y_train[:cut], x_train[cut:], y_train[cut:], x_test, y_test)
    print(f"data: {name}; train {cut}, val {len(x_train) - cut}, test {len(x_test)}; "
          f"tasks {', '.join(tasks)} (MLP {x_train.shape[1]}-{args.hidden}-10), batch "
          f"{args.batch}, {args.steps} steps, {args.seeds} seed(s); SGD momentum {MOMENTUM}",
          flush=True)
    start = time.time()

    rows = []  # (task, base, strategy label, method, result)
    gaps = []  # (gap, task, base, M)
    sync_best = {}
    for task in tasks:
        for base in bases:
            sync = select("sync", task, base, "base", [{"lr": lr} for lr in SYNC_GRID[base]],
                          lambda: simulated(1), data, args)
            lr_sync = sync["config"]["lr"]
            sync_best[task, base] = (lr_sync, sync)
            rows.append((task, base, "sync", "base", sync))
            for workers in args.workers:
                best = None
                for method in methods_for(base, args.all_methods):
                    result = select(f"M={workers}", task, base, method,
                                    method_grid(base, method, lr_sync),
                                    lambda: simulated(workers), data, args)
                    rows.append((task, base, f"M={workers}", method, result))
                    if method != "base" and (best is None or result["val"] > best["val"]):
                        best = result
                gaps.append((best["test"] - sync["test"], task, base, workers))

    if args.ps_workers and "mlp" in tasks:
        import gc

        import tf_async

        # The one-device runs' functions are freed before the cluster connects
        # (freed after it, TF tries to remove them on the remote tasks and logs
        # an error per function).
        gc.collect()
        strategy = tf_async.strategies.AsyncParameterServerStrategy(
            tf_async.local_cluster(workers=args.ps_workers, ps=1))
        label = f"PS{args.ps_workers}"
        print(f"AsyncParameterServerStrategy: {args.ps_workers} in-process workers, 1 PS, "
              f"look_ahead_horizon {strategy.look_ahead_horizon:g}", flush=True)
        for base in bases:
            lr_sync, _ = sync_best["mlp", base]
            for method in methods_for(base, args.all_methods):
                result = select(label, "mlp", base, method, method_grid(base, method, lr_sync),
                                lambda: strategy, data, args)
                rows.append(("mlp", base, label, method, result))

    print(f"\n{'task':4} {'base':12} {'run':6} {'method':22} {'chosen':22} {'test acc':>8}  "
          "spread (min-max)  vs sync")
    for task, base, label, method, result in rows:
        sync = sync_best[task, base][1]["test"]
        print(f"{task:4} {base:12} {label:6} {method:22} {_describe(result['config']):22} "
              f"{result['test']:8.2f}  {result['lo']:.2f}-{result['hi']:.2f}"
              f"       {result['test'] - sync:+.2f}")
    print(f"wall time {time.time() - start:.0f}s")
    if any(g[3] in GAP_WORKERS for g in gaps):
        gaps = [g for g in gaps if g[3] in GAP_WORKERS]
    for task in tasks:
        worst = min(g for g in gaps if g[1] == task)
        print(f"{task} worst gap: {worst[0]:+.2f} ({worst[2]} at M={worst[3]})")
    worst = min(gaps)
    print(f"(worst: {worst[1]} {worst[2]} at M={worst[3]})")
    print(f"worst_gap_to_sync_points: {worst[0]:.2f}")


if __name__ == "__main__":
    main()
