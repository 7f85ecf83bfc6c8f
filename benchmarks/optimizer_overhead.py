"""Step time of DCAdam vs keras.optimizers.Adam (same model, one device, jit).

Both train the same MLP (``jit_compile=True``, ``model.train_on_batch``) under
``SimulatedAsyncStrategy(num_workers=4)``, so DCAdam's compensation
g̃ = g + λ·g⊙g⊙(w_now − w_read) is really computed (τ = 3 published every
step) and the simulator's own cost is common to both. Runs are interleaved
(Adam, DCAdam, DCAdam, Adam, ...); the reported ratio is the median over rounds of
DCAdam/Adam per-step time of the same round (robust to load drift on a
shared machine).

Also printed, for information: the same ratio with no strategy (no published
staleness, where DCAdam builds no compensation at all).

Final line: ``dc_adam_over_adam_step_time: R`` (goal <= 1.15).
"""

from __future__ import annotations

import argparse
import os
import time

from _flags import positive_int  # noqa: E402 (benchmarks/ is on sys.path)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_async.keras_optimizers import DCAdam  # noqa: E402
from tf_async.strategies import SimulatedAsyncStrategy  # noqa: E402


def _model(inputs: int, hidden: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((inputs,)),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(10),
    ])


def _build(strategy, make_optimizer, inputs, hidden):
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = _model(inputs, hidden)
        model.compile(optimizer=make_optimizer(),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=True)
    return model


def _time_per_step(model, batches, steps) -> float:
    start = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        model.train_on_batch(x, y)  # returns floats: the step has finished
    return (time.perf_counter() - start) / steps


def measure(strategy_factory, args) -> float:
    rng = np.random.RandomState(0)
    x = rng.rand(args.batch * 64, args.inputs).astype("float32")
    y = rng.randint(0, 10, len(x))
    dataset = [(tf.constant(x[i:i + args.batch]), tf.constant(y[i:i + args.batch]))
               for i in range(0, len(x), args.batch)]
    models = {
        "adam": _build(strategy_factory(), lambda: keras.optimizers.Adam(1e-3),
                       args.inputs, args.hidden),
        "dcadam": _build(strategy_factory(), lambda: DCAdam(1e-3, lambda_=0.04),
                         args.inputs, args.hidden),
    }
    for model in models.values():  # compile + warm up
        _time_per_step(model, dataset, args.warmup)
    times = {name: [] for name in models}
    names = list(models)
    for round_index in range(args.rounds):
        # ABBA order: neither optimizer always runs first.
        for name in names if round_index % 2 == 0 else names[::-1]:
            times[name].append(_time_per_step(models[name], dataset, args.steps))
    adam, dcadam = np.array(times["adam"]), np.array(times["dcadam"])
    # Each round runs the two back to back: the paired ratio cancels most of
    # the load drift of a shared machine; report its median.
    paired = float(np.median(dcadam / adam))
    best = float(dcadam.min() / adam.min())
    return float(np.median(adam)), float(np.median(dcadam)), paired, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 2 min)")
    parser.add_argument("--inputs", type=positive_int, default=784)
    parser.add_argument("--hidden", type=positive_int, default=512)
    parser.add_argument("--batch", type=positive_int, default=128)
    args = parser.parse_args()
    args.rounds, args.steps, args.warmup = (60, 5, 10) if args.quick else (200, 5, 20)

    for label, factory in (("no staleness context", lambda: None),
                           ("simulated async M=4 ", lambda: SimulatedAsyncStrategy(4))):
        adam, dcadam, paired, best = measure(factory, args)
        print(f"{label}: median adam {adam * 1e3:.2f} ms/step, dcadam "
              f"{dcadam * 1e3:.2f} ms/step; median paired ratio {paired:.3f}, "
              f"best-of ratio {best:.3f}")
    print(f"model {args.inputs}-{args.hidden}-{args.hidden}-10, batch {args.batch}, "
          f"jit_compile=True, {args.rounds} interleaved rounds x {args.steps} steps")
    print(f"dc_adam_over_adam_step_time: {paired:.3f}")


if __name__ == "__main__":
    main()
