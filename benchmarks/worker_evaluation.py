"""Worker-side vs coordinator-side `model.evaluate` under AsyncParameterServerStrategy.

One `tf_async.local_cluster` (`--workers` workers + 1 PS, in this process);
the same compiled model is evaluated on the same in-memory arrays with

* `coordinator` — `evaluation_shards=None` (the default): Keras' own loop on
  the chief, reading the weights from the PS every batch;
* `workers_S`   — `evaluation_shards=S` for S = workers and S = "auto"
  (5 × workers): S closures on the workers, each reading the weights once,
  running its 1/S of the batches (its pipeline builds the whole dataset and
  keeps every S-th batch), metric states summed on the chief.

Three cases: `small` (64 → 128 → 128 → 10, the straggler benchmark's model),
`wide` (64 → 4 × 1024 → 10: compute per batch dominates), both on `--samples`
rows, `small_2_batches` (the small model on 2 batches: per-call costs
dominate) and `small_slow_input` (a `tf.data.Dataset` of `--samples` rows
whose pipeline sleeps `--input_delay_ms` per batch: input-bound; every shard's
pipeline sleeps for all batches, also those it skips). Every mode is timed
`--repeats` times, interleaved, after one untimed warm-up call (tracing); the
median is reported with the spread, and the warm-up call's time (the first
evaluate of a model in that mode). Prints one line per model and mode,
`<model>_<mode>_over_coordinator_eval_time: R` and, last,
`worker_over_coordinator_eval_time: R` (small model, S = workers: the case
that decides the default).

    nice -n 5 python benchmarks/worker_evaluation.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from _flags import positive_int  # noqa: E402 (benchmarks/ is on sys.path)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FEATURES = 64
CLASSES = 10
SMALL, WIDE = [128, 128], [1024] * 4


def make_model(hidden):
    import keras

    return keras.Sequential(
        [keras.Input((FEATURES,))]
        + [keras.layers.Dense(width, activation="relu") for width in hidden]
        + [keras.layers.Dense(CLASSES, activation="softmax")]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (~1-2 min)")
    parser.add_argument("--workers", type=positive_int, default=2)
    parser.add_argument("--samples", type=positive_int, default=None,
                        help="evaluation samples (default 32768, --quick 8192)")
    parser.add_argument("--batch_size", type=positive_int, default=256)
    parser.add_argument("--input_delay_ms", type=positive_int, default=5,
                        help="per-batch sleep of the small_slow_input case")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed calls per mode (default 5, --quick 3)")
    args = parser.parse_args()
    samples = args.samples or (8192 if args.quick else 32768)
    repeats = args.repeats or (3 if args.quick else 5)

    import keras
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.data.experimental.ops import testing  # tf.data's sleep

    import tf_async

    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=args.workers, ps=1))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, FEATURES)).astype("float32")
    y = np.abs(x[:, :CLASSES]).argmax(1).astype("int32")
    modes = {"coordinator": None, f"workers_{args.workers}": args.workers,
             "workers_auto": "auto"}
    print(f"load_average: {open('/proc/loadavg').read().split()[:3]}")
    print(f"samples: {samples}, batch_size: {args.batch_size}, workers: {args.workers}, "
          f"repeats: {repeats}")
    ratios = {}
    slow = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size).apply(
        testing.sleep(args.input_delay_ms * 1000))

    def arrays(rows):
        return dict(x=x[:rows], y=y[:rows], batch_size=args.batch_size)

    cases = {"small": (SMALL, arrays(samples)), "wide": (WIDE, arrays(samples)),
             "small_2_batches": (SMALL, arrays(2 * args.batch_size)),
             "small_slow_input": (SMALL, dict(x=slow))}
    for name, (hidden, data) in cases.items():
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = make_model(hidden)
            model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy",
                          metrics=["accuracy"])
        results, first, times = {}, {}, {mode: [] for mode in modes}
        for mode, shards in modes.items():  # warm-up: tracing, dataset shipping
            strategy.evaluation_shards = shards
            start = time.perf_counter()
            results[mode] = model.evaluate(verbose=0, return_dict=True, **data)
            first[mode] = time.perf_counter() - start
        for _ in range(repeats):
            for mode, shards in modes.items():
                strategy.evaluation_shards = shards
                start = time.perf_counter()
                model.evaluate(verbose=0, **data)
                times[mode].append(time.perf_counter() - start)
        base = statistics.median(times["coordinator"])
        for mode in modes:
            loss_gap = abs(results[mode]["loss"] - results["coordinator"]["loss"])
            print(f"{name}_{mode}_eval_seconds: median {statistics.median(times[mode]):.3f} "
                  f"min {min(times[mode]):.3f} max {max(times[mode]):.3f} first call "
                  f"{first[mode]:.3f} (|loss - coordinator's| {loss_gap:.1e})")
        for mode in modes:
            if mode != "coordinator":
                ratios[(name, mode)] = statistics.median(times[mode]) / base
                print(f"{name}_{mode}_over_coordinator_eval_time: {ratios[(name, mode)]:.3f}")
    print(f"load_average_after: {open('/proc/loadavg').read().split()[:3]}")
    print(f"worker_over_coordinator_eval_time: "
          f"{ratios[('small', f'workers_{args.workers}')]:.3f}")


if __name__ == "__main__":
    main()
