"""Straggler benchmark: asynchronous parameter-server `model.fit` vs bulk-synchronous rounds.

4 workers + 1 PS on `tf_async.local_cluster`; worker 3's input pipeline sleeps
`--delay_ms` per batch (tf.data's SleepDataset), making it several times
slower than the others. On the same cluster and model we measure steps/s of:

* `fit`       — `model.fit` under AsyncParameterServerStrategy (this plugin);
* `hand_loop` — a raw `ClusterCoordinator.schedule` loop, one step per batch,
                Keras 3 optimizer `apply`, no fit (the engine itself);
* `sync`      — bulk-synchronous rounds: schedule one step per worker, `join()`;
* `fit_spe8`  — `model.fit` with `compile(steps_per_execution=8)` (8 steps per
                scheduled call; reported, not part of the goals).

Prints `fit_over_hand_loop_throughput: R` (goal >= 0.9) and, last,
`async_over_sync_throughput: R` (fit vs sync; goal >= 4).

With `--tf_keras_python PYTHON` (a Python whose environment has `tf_keras`,
e.g. /work/venv-tfkeras/bin/python) it also times tf-keras' own
ParameterServerStrategy `model.fit` (DatasetCreator) in a child process on an
identical local cluster and prints `fit_over_tf_keras_fit_throughput: R`.
tf-keras gives every worker the same InputContext under PSS, so the straggler
cannot be injected there: that comparison runs both fits without the delay.

    python benchmarks/straggler.py --quick
"""

from __future__ import annotations

import argparse
import os
import time

from _flags import non_negative_int, positive_int  # noqa: E402 (benchmarks/ is on sys.path)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FEATURES = 64
CLASSES = 10
WORKERS = 4
SLOW_WORKER = 3


HIDDEN = [128, 128]  # --hidden / --layers change it (e.g. 512 x 6: 1 MiB kernels)


def make_model(keras=None):
    if keras is None:
        import keras

    return keras.Sequential(
        [keras.Input((FEATURES,))]
        + [keras.layers.Dense(width, activation="relu") for width in HIDDEN]
        + [keras.layers.Dense(CLASSES, activation="softmax")]
    )


def make_dataset_fn(delay_ms: int, batch_size: int):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, FEATURES)).astype("float32")
    y = (np.abs(x[:, :CLASSES]).argmax(1)).astype("int32")

    def dataset_fn(input_context):
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(batch_size)
        if input_context.input_pipeline_id == SLOW_WORKER and delay_ms > 0:
            # tf.data's own sleep transformation (not exported in tf 2.21's API).
            from tensorflow.python.data.experimental.ops import testing

            dataset = dataset.apply(testing.sleep(delay_ms * 1000))
        return dataset

    return dataset_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 2 min)")
    parser.add_argument("--delay_ms", type=non_negative_int, default=40)
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--steps", type=positive_int, default=None, help="async steps measured")
    parser.add_argument("--rounds", type=positive_int, default=None, help="sync rounds measured")
    parser.add_argument("--hidden", type=positive_int, default=128, help="width of the hidden layers")
    parser.add_argument("--layers", type=positive_int, default=2, help="number of hidden layers")
    parser.add_argument("--tf_keras_python", default=None,
                        help="Python with tf_keras installed: also time tf-keras' PSS fit")
    parser.add_argument("--tf_keras_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    HIDDEN[:] = [args.hidden] * args.layers
    steps = args.steps or (600 if args.quick else 3000)
    rounds = args.rounds or (60 if args.quick else 300)
    if args.tf_keras_child:
        tf_keras_child(steps, args.batch_size, 2 if args.quick else 3)
        return

    import keras
    import tensorflow as tf

    import tf_async

    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=WORKERS, ps=1)
    )
    coordinator = strategy.coordinator
    dataset_fn = make_dataset_fn(args.delay_ms, args.batch_size)

    with strategy.scope():
        model = make_model()
        model.compile(optimizer=keras.optimizers.SGD(0.01),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        spe_model = make_model()
        spe_model.compile(optimizer=keras.optimizers.SGD(0.01),
                          loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                          steps_per_execution=8)
        hand_model = make_model()
        hand_optimizer = keras.optimizers.SGD(0.01)
        hand_optimizer.build(hand_model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    # Per-worker iterators with the same InputContexts fit gives its dataset_fn.
    from tf_async.strategies import _ps_data

    hand_iterator = _ps_data.per_worker_iterator(strategy, coordinator, dataset_fn)

    @tf.function
    def hand_step(iterator):
        def replica_fn(batch):
            x, y = batch
            with tf.GradientTape() as tape:
                loss = loss_fn(y, hand_model(x, training=True))
            grads = tape.gradient(loss, hand_model.trainable_variables)
            hand_optimizer.apply(grads, hand_model.trainable_variables)
            return loss

        return strategy.run(replica_fn, args=(next(iterator),))

    def hand_loop(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            coordinator.schedule(hand_step, args=(hand_iterator,))
        coordinator.join()
        return n / (time.perf_counter() - start)

    def sync_rounds(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            for _ in range(WORKERS):
                coordinator.schedule(hand_step, args=(hand_iterator,))
            coordinator.join()
        return n * WORKERS / (time.perf_counter() - start)

    def fit(n: int, fit_model=model) -> float:
        start = time.perf_counter()
        fit_model.fit(dataset_fn, epochs=1, steps_per_epoch=n, verbose=0)
        return n / (time.perf_counter() - start)

    # Warm up (tracing, iterator creation, first copies) outside the timed runs.
    hand_loop(50 * WORKERS)
    sync_rounds(5)
    fit(50 * WORKERS)
    fit(50 * WORKERS, spe_model)

    results = {"hand_loop": [], "sync": [], "fit": [], "fit_spe8": []}
    repeats = 3
    for _ in range(repeats):  # interleaved, so load changes hit all three alike
        results["fit"].append(fit(steps))
        results["hand_loop"].append(hand_loop(steps))
        results["sync"].append(sync_rounds(rounds))
        results["fit_spe8"].append(fit(steps, spe_model))
    best = {name: max(values) for name, values in results.items()}
    for name, values in results.items():
        print(f"{name}_steps_per_s: " + " ".join(f"{v:.1f}" for v in values)
              + f" (best {best[name]:.1f})")
    print(f"fit_final_loss: {model.history.history['loss'][-1]:.4f}")
    print(f"fit_staleness_mean: {model.history.history['staleness_mean'][-1]:.2f}")
    print(f"hand_loop_over_sync_throughput: {best['hand_loop'] / best['sync']:.2f}")
    print(f"fit_spe8_over_sync_throughput: {best['fit_spe8'] / best['sync']:.2f}")
    print(f"fit_over_hand_loop_throughput: {best['fit'] / best['hand_loop']:.2f}")
    if args.tf_keras_python:
        # Same model and cluster shape, no straggler (see module docstring).
        no_delay_fn = make_dataset_fn(0, args.batch_size)
        ours = max(
            steps / _timed(lambda: model.fit(no_delay_fn, epochs=1, steps_per_epoch=steps,
                                             verbose=0))
            for _ in range(repeats))
        theirs = _run_tf_keras_child(args, steps)
        print(f"fit_no_straggler_steps_per_s: {ours:.1f}")
        print(f"tf_keras_fit_no_straggler_steps_per_s: {theirs:.1f}")
        print(f"fit_over_tf_keras_fit_throughput: {ours / theirs:.2f}")
    print(f"async_over_sync_throughput: {best['fit'] / best['sync']:.2f}")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _run_tf_keras_child(args, steps: int) -> float:
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [args.tf_keras_python, os.path.abspath(__file__), "--tf_keras_child",
               "--steps", str(steps), "--batch_size", str(args.batch_size),
               "--hidden", str(args.hidden), "--layers", str(args.layers)]
    if args.quick:
        command.append("--quick")
    output = subprocess.run(command, env=env, capture_output=True, text=True,
                            timeout=600, check=True).stdout
    return float(output.strip().splitlines()[-1].split(":")[1])


def tf_keras_child(steps: int, batch_size: int, repeats: int) -> None:
    """tf-keras (Keras 2) PSS `model.fit` on a fresh identical local cluster."""
    import tensorflow as tf
    import tf_keras

    from tf_async.cluster import local_cluster

    strategy = tf.distribute.experimental.ParameterServerStrategy(
        local_cluster(workers=WORKERS, ps=1))
    dataset_fn = make_dataset_fn(0, batch_size)
    with strategy.scope():
        model = make_model(tf_keras)
        model.compile(optimizer=tf_keras.optimizers.SGD(0.01),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    creator = tf_keras.utils.experimental.DatasetCreator(dataset_fn)
    model.fit(creator, epochs=1, steps_per_epoch=2 * WORKERS, verbose=0)
    best = max(
        steps / _timed(lambda: model.fit(creator, epochs=1, steps_per_epoch=steps, verbose=0))
        for _ in range(repeats))
    print(f"tf_keras_fit_steps_per_s: {best:.1f}", flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
