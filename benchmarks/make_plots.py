"""Generates the user guide's plots (PNG, matplotlib) into docs/images/.

1. ``loss_vs_step.png`` — training loss vs step on real handwritten digits
   (scikit-learn's bundled set) for synchronous SGD-momentum, simulated
   asynchronous SGD-momentum with M = 32 workers (τ = 31, the deterministic
   ``SimulatedAsyncStrategy``) and the same with the recommended
   ``GapAware(DanaZeroSGD)``, plus sync Adam, async Adam and
   ``GapAware(DanaZeroAdam)`` at M = 32 (learning rates: the sync-best of
   ``staleness_quality.py`` for sync and the plain async base, the rate
   ``staleness_quality.py --quick`` chose on validation for the recommended
   method at M = 32).
2. ``straggler_throughput.png`` — steps/s of asynchronous ``model.fit`` (also with
   ``steps_per_execution=8``), the raw
   ClusterCoordinator hand loop and bulk-synchronous rounds with one 4x-slow
   worker, from ``benchmarks/straggler.py --quick`` run in a subprocess.

    python benchmarks/make_plots.py            # both plots
    python benchmarks/make_plots.py --only loss

Final line: ``plots_written: N``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

from _flags import positive_int  # noqa: E402 (benchmarks/ is on sys.path)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "examples"))
OUT = os.path.join(REPO, "docs", "images")

# Sync-best learning rates of benchmarks/staleness_quality.py (validation grid,
# mlp task), and the rates its --quick run (2026-12-04) chose on validation for
# GapAware(DanaZeroSGD) / GapAware(DanaZeroAdam) at M = 32.
SGD_LR, MOMENTUM, ADAM_LR = 0.1, 0.9, 3e-3
DANA_ZERO_SGD_LR, DANA_ZERO_ADAM_LR = 0.3, 9e-3
WORKERS = 32


def _loss_curve(kind: str, workers: int, steps: int, every: int, lr: float):
    import keras
    import tensorflow as tf

    import example_data
    from tf_async.keras_optimizers import DanaZeroAdam, DanaZeroSGD, GapAware
    from tf_async.strategies import SimulatedAsyncStrategy

    x_train, y_train, _, _, _ = example_data.load_digits()
    keras.utils.set_random_seed(0)
    strategy = (SimulatedAsyncStrategy(workers, "round_robin") if workers > 1
                else tf.distribute.OneDeviceStrategy("/cpu:0"))
    optimizers = {
        "sgdm": lambda: keras.optimizers.SGD(lr, momentum=MOMENTUM),
        "ga_dana_zero_sgd": lambda: GapAware(
            DanaZeroSGD(lr, momentum=MOMENTUM, num_workers=workers)),
        "adam": lambda: keras.optimizers.Adam(lr),
        "ga_dana_zero_adam": lambda: GapAware(DanaZeroAdam(lr, num_workers=workers)),
    }
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((x_train.shape[1],)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ])
        model.compile(optimizer=optimizers[kind](), loss="sparse_categorical_crossentropy")
    dataset = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
               .shuffle(len(x_train), seed=0).repeat().batch(32))
    losses = []

    class PerStepLoss(keras.callbacks.Callback):
        """Keras logs a running epoch mean; one-step epochs make it per-window."""

        def on_epoch_end(self, epoch, logs=None):
            losses.append(float(logs["loss"]))

    model.fit(dataset, epochs=steps // every, steps_per_epoch=every, verbose=0,
              callbacks=[PerStepLoss()])
    return [every * (i + 1) for i in range(len(losses))], losses


def plot_loss(steps: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = 10
    runs = [
        ("sync SGD-momentum", "sgdm", 1, SGD_LR, "black", "-"),
        (f"async M={WORKERS} SGD-momentum", "sgdm", WORKERS, SGD_LR, "tab:red", "-"),
        (f"async M={WORKERS} GapAware(DanaZeroSGD)", "ga_dana_zero_sgd", WORKERS,
         DANA_ZERO_SGD_LR, "tab:green", "-"),
        ("sync Adam", "adam", 1, ADAM_LR, "grey", "--"),
        (f"async M={WORKERS} Adam", "adam", WORKERS, ADAM_LR, "tab:blue", "--"),
        (f"async M={WORKERS} GapAware(DanaZeroAdam)", "ga_dana_zero_adam", WORKERS,
         DANA_ZERO_ADAM_LR, "tab:purple", "--"),
    ]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, kind, workers, lr, color, style in runs:
        x, y = _loss_curve(kind, workers, steps, every, lr)
        ax.plot(x, y, style, color=color, label=label)
        print(f"{label}: final windowed loss {y[-1]:.4f}", flush=True)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean over {every}-step windows)")
    ax.set_yscale("log")
    ax.set_title(f"Digits MLP: staleness τ = {WORKERS - 1} (simulated {WORKERS} workers), "
                 "Gap-Aware + DANA-Zero")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(OUT, "loss_vs_step.png")
    fig.savefig(path, dpi=110)
    return path


def plot_straggler() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    output = subprocess.run(
        [sys.executable, os.path.join(HERE, "straggler.py"), "--quick"],
        capture_output=True, text=True, env=env, timeout=900, check=True,
    ).stdout
    rates = {}
    for name, values in re.findall(r"^(\w+)_steps_per_s: (.*)$", output, re.M):
        numbers = [float(v) for v in values.split("(")[0].split()]
        rates[name] = max(numbers)
    if not rates:
        raise RuntimeError(f"straggler.py printed no *_steps_per_s lines:\n{output}")
    print(output.strip().splitlines()[-1], flush=True)
    labels = {"fit_spe8": "async model.fit\nsteps_per_execution=8",
              "fit": "async model.fit\n(tf_async)", "hand_loop": "raw coordinator\nhand loop",
              "sync": "bulk-synchronous\nrounds"}
    colors = {"fit_spe8": "tab:olive", "fit": "tab:green", "hand_loop": "tab:gray",
              "sync": "tab:red"}
    names = [n for n in ("fit_spe8", "fit", "hand_loop", "sync") if n in rates]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    bars = ax.bar([labels[n] for n in names], [rates[n] for n in names],
                  color=[colors[n] for n in names])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylim(0, 1.12 * max(rates[n] for n in names))  # room for the labels
    ax.set_ylabel("steps / s (best of repeats)")
    ax.set_title("4 workers + 1 PS, one worker 4x slower (local cluster, 2 cores)")
    fig.tight_layout()
    path = os.path.join(OUT, "straggler_throughput.png")
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["loss", "straggler"], default=None)
    parser.add_argument("--steps", type=positive_int, default=600, help="steps per loss curve")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    written = []
    if args.only in (None, "loss"):
        written.append(plot_loss(args.steps))
    if args.only in (None, "straggler"):
        written.append(plot_straggler())
    for path in written:
        print(f"wrote {os.path.relpath(path, REPO)}")
    print(f"plots_written: {len(written)}")


if __name__ == "__main__":
    main()
