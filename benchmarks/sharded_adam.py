"""Benchmark: ShardedAdam (ZeRO-1) vs keras.optimizers.Adam under MirroredStrategy.

For each replica count N (a separate process per N, its CPU split into N
logical devices, default MirroredStrategy), and for a 2-process
MultiWorkerMirroredStrategy with 2 logical CPUs per process (N = 4, launched
with ``tf_async.launch``; row ``MWMS 2x2``, custom training loop, see
``_mwms_child``; ``--no_mwms`` skips it), measures in the same run:

* exact optimizer-state bytes per replica device: every component of every
  optimizer variable (iterations and learning rate included), summed by the
  device it lives on; the per-replica figure is the maximum over devices;
* train-step time with each optimizer, in interleaved rounds: each round
  times Adam and ShardedAdam back to back (order alternating: A B, B A, ...),
  the round's ratio is ShardedAdam ÷ Adam, and the row's ``ratio`` is the
  median of the rounds' ratios (min-max printed beside it). A load burst
  from other jobs on the shared machine hits both halves of a round, and
  the median ignores the rounds it hit unevenly. Mirrored rows time the
  steps inside ``model.fit`` (a callback: end of the first step to end of
  the last; ``fit``'s per-call setup, ~0.3-0.6 s here, is not a step:
  ``call_ratio`` is the same median for the whole ``fit`` call); the MWMS
  row times ``steps`` custom-loop steps;
* reduction bytes per replica per step, counted at trace time
  (``_zero_collectives.count_bytes``) for one traced step
  (``optimizer.apply`` under ``strategy.run``): the bytes each replica hands
  to ``tf.distribute`` reductions (Keras Adam: ``ReplicaContext.all_reduce``
  of the gradients, B = P; ShardedAdam: a reduce-scatter of the padded flat
  gradient and an all-gather of its 1/N parameter slice), converted to the
  bytes a replica sends with bandwidth-optimal algorithms: all-reduce of B
  2(N-1)/N·B, reduce-scatter of B (N-1)/N·B, all-gather of a b-byte piece
  (N-1)·b. The ratio is ShardedAdam ÷ Adam (ZeRO-1's claim: 1, plus the
  padding of at most N-1 elements). The raw input bytes are printed too
  (ShardedAdam's are (1 + 1/N)·P: the all-gather's input is its slice).

Limit for the state: 2P/N bytes (P = parameter bytes: m and v split N ways).

Prints one row per N, then the final lines ``reduction_bytes_over_adam: R``,
``step_time_over_adam: R`` and, last, ``state_bytes_over_limit: R`` (each the
worst N). Goals: <= 1.01, <= 1.10 and <= 1.01.

    python benchmarks/sharded_adam.py --quick      # width 256; 19 min at load 10-16
    python benchmarks/sharded_adam.py              # bigger model, more rounds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _flags import at_least_two, non_negative_int, positive_int  # noqa: E402 (benchmarks/ is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dense_stack(width: int, depth: int):
    """The benchmark's MLP (+3 units on the first layer: sizes that do not divide N)."""
    import keras

    layers = [keras.Input((width,)), keras.layers.Dense(width + 3, activation="relu")]
    layers += [keras.layers.Dense(width, activation="relu") for _ in range(depth - 2)]
    layers += [keras.layers.Dense(width)]
    return keras.Sequential(layers)


def _apply_step(strategy, model, optimizer):
    """One custom-loop train step (MSE): ``optimizer.apply`` under ``strategy.run``."""
    import tensorflow as tf

    sys.path.insert(0, ROOT)
    from tests import _harness

    return _harness.apply_step(
        strategy, model, optimizer, lambda p, y: tf.reduce_mean(tf.square(p - y))
    )


def _step_clock():
    """A Keras callback timing ``fit``'s steps: ``step_time()`` is the wall time
    from the end of the first step to the end of the last, per step. It leaves
    out ``fit``'s per-call setup (data adapter, distributed iterator, first
    prefetch), which at the quick size is most of a short ``fit`` call."""
    import keras

    class StepClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

        def step_time(self) -> float:  # --steps >= 2 (argparse)
            return (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1)

    return StepClock()


def _interleaved_rounds(time_once, names, rounds: int) -> list:
    """``rounds`` rounds, each timing every name once, back to back; the order
    alternates (A B, B A, A B, ...) so neither always runs first after the
    other. Returns one {name: time_once(name)} per round."""
    results = []
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        results.append({name: time_once(name) for name in order})
    return results


def _timing_summary(times: dict) -> dict:
    """Per-round ratios ShardedAdam ÷ Adam (same round: adjacent in time, so
    a load change on the shared machine hits both), their median, min, max;
    and each optimizer's median step time."""
    import numpy as np

    ratios = np.asarray(times["sharded"]) / np.asarray(times["adam"])
    summary = {
        "ratio": float(np.median(ratios)),
        "ratio_min": float(np.min(ratios)),
        "ratio_max": float(np.max(ratios)),
    }
    for name, values in times.items():
        summary[f"{name}_step_s"] = float(np.median(values))
    return summary


def _state_bytes_per_device(strategy, optimizer) -> dict:
    """Bytes of optimizer state held on each (local) replica device."""
    import numpy as np
    import tensorflow as tf
    from tf_async.keras_optimizers import ShardedAdam

    if isinstance(optimizer, ShardedAdam):
        variables = optimizer.state_variables()
    else:
        variables = [v.value for v in optimizer.variables]
    per_device: dict = {}
    for variable in variables:
        for component in strategy.experimental_local_results(variable):
            size = int(np.prod(component.shape)) * component.dtype.size
            device = tf.DeviceSpec.from_string(component.device).to_string()
            per_device[device] = per_device.get(device, 0) + size
    return per_device


def _max_weight_diff(a, b) -> float:
    """Both optimizers must have trained to the same weights (sanity)."""
    import numpy as np

    return max(
        float(np.max(np.abs(u.numpy() - w.numpy())))
        for u, w in zip(a.trainable_weights, b.trainable_weights)
    )


def _child(num_replicas: int, width: int, depth: int, steps: int, rounds: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    sys.path.insert(0, ROOT)
    from tests import _harness

    _harness.split_cpu(num_replicas)
    import keras
    import numpy as np

    from tf_async.keras_optimizers import ShardedAdam, _zero_collectives

    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    global_batch = 8 * num_replicas
    rng = np.random.default_rng(0)
    x = rng.normal(size=(global_batch * steps, width)).astype("float32")
    y = rng.normal(size=(global_batch * steps, width)).astype("float32")

    def build(make_optimizer):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = _dense_stack(width, depth)
            optimizer = make_optimizer()
            model.compile(optimizer=optimizer, loss="mse")
        return model, optimizer

    runs = {
        "adam": build(lambda: keras.optimizers.Adam(1e-3)),
        "sharded": build(lambda: ShardedAdam(1e-3)),
    }
    param_bytes = sum(
        int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size
        for v in runs["adam"][0].trainable_weights
    )

    def fit_once(name):
        """(step time, fit-call wall time / steps) of one ``fit`` of ``steps`` steps."""
        model, _ = runs[name]
        clock = _step_clock()
        start = time.perf_counter()
        model.fit(x, y, batch_size=global_batch, epochs=1, shuffle=False, verbose=0,
                  callbacks=[clock])
        call = (time.perf_counter() - start) / steps
        return clock.step_time(), call

    for name in runs:  # trace + warm up
        fit_once(name)
        fit_once(name)
    rounds_times = _interleaved_rounds(fit_once, list(runs), rounds)
    times = {name: [t[name][0] for t in rounds_times] for name in runs}
    calls = {name: [t[name][1] for t in rounds_times] for name in runs}

    def reduction_bytes(name) -> dict:
        """Trace-time reduction bytes of one step (``apply`` in ``run``)."""
        model, optimizer = runs[name]
        per_replica_batch = global_batch // num_replicas
        step = _apply_step(strategy, model, optimizer)
        spec = tf.TensorSpec([per_replica_batch, width], tf.float32)
        with _zero_collectives.count_bytes(strategy) as counter:
            step.get_concrete_function(spec, spec)
        return {
            "input": counter.input_bytes(),
            "wire": counter.wire_bytes(num_replicas),
        }

    result = {"N": num_replicas, "param_bytes": param_bytes}
    for name in runs:
        reduced = reduction_bytes(name)
        result[f"{name}_reduction_input_bytes"] = reduced["input"]
        result[f"{name}_reduction_wire_bytes"] = reduced["wire"]
        per_device = _state_bytes_per_device(strategy, runs[name][1])
        result[f"{name}_state_bytes_per_replica"] = max(per_device.values())
        result[f"{name}_state_devices"] = len(per_device)
    result.update(_timing_summary(times))
    result["call_ratio"] = _timing_summary(calls)["ratio"]
    result["max_weight_diff"] = _max_weight_diff(runs["adam"][0], runs["sharded"][0])
    return result


def _mwms_child(width: int, depth: int, steps: int, rounds: int) -> dict:
    """One worker of a 2-process MultiWorkerMirroredStrategy, 2 CPU devices each.

    TF gives a CPU worker one device; the two logical CPUs are handed to the
    strategy by ``tests/_harness.split_cpu_for_multi_worker`` (as in
    tests/_sharded_adam_mwms_script.py). Keras 3.15's ``fit`` cannot start
    with several local devices under MultiWorkerMirrored (its symbolic build
    reduces a tuple of PerReplica batches), so the step is a custom loop:
    ``optimizer.apply`` under ``strategy.run``, timed the same way for both.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    sys.path.insert(0, ROOT)
    from tests import _harness

    local = 2
    _harness.split_cpu_for_multi_worker(local)
    import keras
    import numpy as np

    from tf_async.keras_optimizers import ShardedAdam, _zero_collectives

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    num_replicas = strategy.num_replicas_in_sync
    per_replica_batch = 8
    rng = np.random.default_rng(strategy.cluster_resolver.task_id)
    x = tf.constant(rng.normal(size=(per_replica_batch, width)).astype("float32"))
    y = tf.constant(rng.normal(size=(per_replica_batch, width)).astype("float32"))

    def build(make_optimizer):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = _dense_stack(width, depth)
            optimizer = make_optimizer()
            optimizer.build(model.trainable_variables)
        return model, optimizer, _apply_step(strategy, model, optimizer)

    runs = {
        "adam": build(lambda: keras.optimizers.Adam(1e-3)),
        "sharded": build(lambda: ShardedAdam(1e-3)),
    }
    result = {"N": num_replicas, "label": f"MWMS 2x{local}"}
    spec = tf.TensorSpec([per_replica_batch, width], tf.float32)
    for name, (model, optimizer, step) in runs.items():
        with _zero_collectives.count_bytes(strategy) as counter:
            step.get_concrete_function(spec, spec)
        result[f"{name}_reduction_input_bytes"] = counter.input_bytes()
        result[f"{name}_reduction_wire_bytes"] = counter.wire_bytes(num_replicas)
    result["param_bytes"] = sum(
        int(np.prod(v.shape)) * 4 for v in runs["adam"][0].trainable_weights
    )

    def run_steps(name):
        step = runs[name][2]
        start = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        runs[name][0].trainable_weights[0].numpy()  # wait for the last step
        return (time.perf_counter() - start) / steps

    for name in runs:
        run_steps(name)
    rounds_times = _interleaved_rounds(run_steps, list(runs), rounds)
    result.update(_timing_summary({name: [t[name] for t in rounds_times] for name in runs}))
    for name, (model, optimizer, _) in runs.items():
        per_device = _state_bytes_per_device(strategy, optimizer)
        result[f"{name}_state_bytes_per_replica"] = max(per_device.values())
    result["max_weight_diff"] = _max_weight_diff(runs["adam"][0], runs["sharded"][0])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model (width 256), 16 steps x 9 rounds")
    parser.add_argument("--replicas", default=None, help="comma list, default 2,4,8")
    parser.add_argument("--child", type=non_negative_int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mwms_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no_mwms", action="store_true",
                        help="skip the 2-process MultiWorkerMirrored row")
    parser.add_argument("--width", type=positive_int, default=None)
    parser.add_argument("--depth", type=positive_int, default=None)
    parser.add_argument("--steps", type=at_least_two, default=None,
                        help="steps per timed half-round (a step is timed end to end: >= 2)")
    parser.add_argument("--rounds", type=positive_int, default=None)
    args = parser.parse_args()
    width = args.width or (256 if args.quick else 1024)
    depth = args.depth or 4
    steps = args.steps or (16 if args.quick else 20)
    rounds = args.rounds or 9

    if args.child is not None:
        print("RESULT " + json.dumps(_child(args.child, width, depth, steps, rounds)))
        return
    if args.mwms_child:
        result = _mwms_child(width, depth, steps, rounds)
        if os.environ.get("TF_ASYNC_TASK", "worker:0") == "worker:0":
            print("RESULT " + json.dumps(result), flush=True)
        return

    replicas = [int(n) for n in (args.replicas or "2,4,8").split(",")]
    results = []
    for n in replicas:
        command = [
            sys.executable, os.path.abspath(__file__), "--child", str(n),
            "--width", str(width), "--depth", str(depth),
            "--steps", str(steps), "--rounds", str(rounds),
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [l for l in output.stdout.splitlines() if l.startswith("RESULT ")]
        if output.returncode != 0 or not lines:
            sys.stderr.write(output.stderr[-3000:])
            raise SystemExit(f"child for N={n} failed (exit {output.returncode})")
        results.append(json.loads(lines[-1][len("RESULT "):]))

    if not args.no_mwms:
        command = [
            sys.executable, "-m", "tf_async.launch", "--workers", "2", "--ps", "0", "--",
            os.path.abspath(__file__), "--mwms_child",
            "--width", str(width), "--depth", str(depth),
            "--steps", str(steps), "--rounds", str(rounds),
        ]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("TF_CONFIG", None)
        output = subprocess.run(
            command, capture_output=True, text=True, check=False, env=env, cwd=ROOT
        )
        lines = [l for l in output.stdout.splitlines() if "RESULT " in l]
        if output.returncode != 0 or not lines:
            sys.stderr.write((output.stdout + output.stderr)[-3000:])
            raise SystemExit(f"MultiWorkerMirrored run failed (exit {output.returncode})")
        results.append(json.loads(lines[-1].split("RESULT ", 1)[1]))

    print(f"model: {depth} Dense layers, width {width}; P = {results[0]['param_bytes']} bytes;"
          f" {steps} steps x {rounds} interleaved rounds")
    print("N  adam_state/replica  sharded_state/replica  limit(2P/N)  sharded/limit"
          "  adam_step_ms  sharded_step_ms  ratio  (min-max)  call_ratio  max|dw|"
          "  adam_in_B  sharded_in_B  adam_wire_B  sharded_wire_B  wire_ratio")
    worst_state, worst_time, worst_bytes = 0.0, 0.0, 0.0
    for r in results:
        bytes_ratio = r["sharded_reduction_wire_bytes"] / r["adam_reduction_wire_bytes"]
        worst_bytes = max(worst_bytes, bytes_ratio)
        limit = 2 * r["param_bytes"] / r["N"]
        state_ratio = r["sharded_state_bytes_per_replica"] / limit
        time_ratio = r["ratio"]
        worst_state, worst_time = max(worst_state, state_ratio), max(worst_time, time_ratio)
        call_ratio = f"{r['call_ratio']:.3f}" if "call_ratio" in r else "-"
        print(
            f"{r.get('label', r['N'])!s:<2} {r['adam_state_bytes_per_replica']:>18} "
            f"{r['sharded_state_bytes_per_replica']:>22} {limit:>12.0f} {state_ratio:>14.5f}"
            f"  {1e3 * r['adam_step_s']:>12.2f} {1e3 * r['sharded_step_s']:>16.2f}"
            f"  {time_ratio:>5.3f}  ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})"
            f"  {call_ratio:>10}  {r['max_weight_diff']:.1e}"
            f"  {r['adam_reduction_input_bytes']:>9.0f}"
            f"  {r['sharded_reduction_input_bytes']:>12.0f}"
            f"  {r['adam_reduction_wire_bytes']:>11.0f}"
            f"  {r['sharded_reduction_wire_bytes']:>14.0f}  {bytes_ratio:>10.5f}"
        )
    print(f"reduction_bytes_over_adam: {worst_bytes:.5f}")
    print(f"step_time_over_adam: {worst_time:.3f}")
    print(f"state_bytes_over_limit: {worst_state:.5f}")


if __name__ == "__main__":
    main()
