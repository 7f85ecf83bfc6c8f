"""Local updates over a slow link: time to synchronous training's validation loss.

    python benchmarks/slow_link.py [--quick] [--workers 2] [--link_latency_ms 20]
        [--link_mbit 100] [--steps N] [--runs R] [--plot docs/images/slow_link.png]
        [--weight_decay 0.01] [--lr_schedule constant|cosine] [--warmup_steps 0]

Each mode runs as a real multi-process cluster (``python -m tf_async.launch``,
one worker process per worker) whose every cross-worker connection goes
through the throttling relay (``--link_latency_ms`` one-way, ``--link_mbit``
per direction), so MultiWorkerMirrored's gRPC collectives pay what a WAN would:

* ``sync``: stock ``MultiWorkerMirroredStrategy``, gradients all-reduced every step;
* ``local_sgd_h16``: ``LocalUpdateStrategy(averaging="mean", sync_every=16)``;
* ``diloco_h64``: ``LocalUpdateStrategy(averaging="diloco", sync_every=64,
  outer_learning_rate=0.7, outer_momentum=0.9)`` (outer Nesterov, as Douillard
  et al. 2023).

Inner optimizer AdamW for all; the task is the byte-level transformer LM on the
Python standard library (``benchmarks/_text_lm.py``); every mode starts from the
same initial weights and sees the same batches in the same order (worker ``w``'s
batch ``t`` is the same in every mode; sync's global batch is the workers'
batches together). Validation loss (nats/byte; bits/byte = nats/ln 2) on the
same fixed ``--val_windows`` windows every ``--eval_every`` steps. Three clocks,
measured in worker 0, the first step's tracing excluded: wall (training time,
validation excluded), step (the train steps' own times summed) and profile
(every step priced at the median time of its kind: sync's all-reduce step, a
local mode's inner step, its outer step), which the final line uses. Times to a
loss interpolate the crossing between evaluations. The mode order rotates per
run; each mode's 1-minute load average is logged; DiLoCo prints its drift
(‖outer step‖ / ‖mean delta‖ and ``local_divergence`` per outer step).

Prints per mode: final validation loss, wall time, seconds per step, time to
reach sync's final validation loss, the loss at sync's last step, and the link
the relay measured; then each local mode's gap to sync at every common
evaluation step, and each mode's median step time, local and syncing (the
profile: a local step should not pay the link). Final lines (2 workers, 20 ms / 100 Mbit/s by default):
``diloco_loss_gap_at_equal_steps: X`` (relative: (DiLoCo − sync) / sync at
sync's step count; goal <= 0.02) and ``diloco_speedup_to_sync_loss: X`` (sync's
time to its final loss ÷ DiLoCo's time to the same loss; goal >= 4; ``0`` if
DiLoCo never reached it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

from _flags import non_negative_int, positive_int  # noqa: E402 (benchmarks/ is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MODES = ("sync", "local_sgd_h16", "diloco_h64")
# Not run by default: plain averaging at DiLoCo's H (= DiLoCo with outer lr 1,
# momentum 0), to tell what the outer Nesterov step adds.
EXTRA_MODES = ("local_sgd_h64",)
SYNC_EVERY = {"sync": 1, "local_sgd_h16": 16, "diloco_h64": 64, "local_sgd_h64": 64}
LR_SCHEDULES = ("constant", "cosine")
COSINE_FINAL_FRACTION = 0.1  # cosine decays the inner lr to 10 % of its peak


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _momentum(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small run (< 10 minutes)")
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--link_latency_ms", type=_non_negative_float, default=20.0)
    p.add_argument("--link_mbit", type=_positive_float, default=100.0)
    p.add_argument("--steps", type=positive_int, default=None,
                   help="training steps of sync (default 128 quick, 512 full)")
    p.add_argument("--local_steps_factor", type=_positive_float, default=2.0,
                   help="local modes train this many times sync's steps (to reach its loss)")
    p.add_argument("--eval_every", type=positive_int, default=64)
    p.add_argument("--batch", type=positive_int, default=16, help="per-worker batch")
    p.add_argument("--context", type=positive_int, default=64)
    p.add_argument("--width", type=positive_int, default=96)
    p.add_argument("--layers", type=positive_int, default=2)
    p.add_argument("--learning_rate", type=_positive_float, default=2e-3)
    p.add_argument("--weight_decay", type=_non_negative_float, default=0.01,
                   help="inner AdamW's decoupled weight decay")
    p.add_argument("--lr_schedule", choices=LR_SCHEDULES, default="constant",
                   help="inner lr after warmup: constant, or cosine to 10%% of the peak "
                        "over each mode's own steps")
    p.add_argument("--warmup_steps", type=non_negative_int, default=0,
                   help="linear inner-lr warmup from 0 (fewer than sync's --steps)")
    p.add_argument("--val_windows", type=positive_int, default=512,
                   help="fixed validation windows (the same for every mode)")
    p.add_argument("--outer_learning_rate", type=_positive_float, default=0.7,
                   help="DiLoCo's outer Nesterov learning rate (paper: 0.7)")
    p.add_argument("--outer_momentum", type=_momentum, default=0.9,
                   help="DiLoCo's outer Nesterov momentum, in [0, 1) (paper: 0.9)")
    p.add_argument("--runs", type=positive_int, default=1)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results JSON (default: no file)")
    p.add_argument("--plot", default=None, help="write the loss-vs-time plot here")
    p.add_argument("--from_json", default=None, help="plot/summarise saved results only")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # mode, in a task
    return p


# ------------------------------------------------------------------ worker


def _worker(args) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, REPO)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    import keras

    keras.config.disable_traceback_filtering()

    import numpy as np

    import _text_lm
    from tf_async.strategies import LocalUpdateStrategy

    class SyncStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        """Stock MWMS plus the two Keras-3 reduce workarounds LocalUpdateStrategy
        carries (keras#20585: an eager reduce of a tuple of PerReplica values
        fails; rank-0 logs reduced with axis=0) — nothing else."""

        def reduce(self, reduce_op, value, axis):
            if not isinstance(value, tf.distribute.DistributedValues) and len(
                tf.nest.flatten(value)
            ) > 1:
                return tf.nest.map_structure(lambda v: self.reduce(reduce_op, v, axis), value)
            if axis is not None:
                first = self.experimental_local_results(value)[0]
                if getattr(first, "shape", None) is not None and first.shape.rank == 0:
                    axis = None
            return super().reduce(reduce_op, value, axis)

    mode = args.worker
    strategy = (SyncStrategy if mode == "sync" else tf.distribute.MultiWorkerMirroredStrategy)()
    if mode in ("local_sgd_h16", "local_sgd_h64"):
        strategy = LocalUpdateStrategy(strategy, sync_every=SYNC_EVERY[mode], averaging="mean")
    elif mode == "diloco_h64":
        strategy = LocalUpdateStrategy(
            strategy, sync_every=SYNC_EVERY[mode], averaging="diloco",
            outer_learning_rate=args.outer_learning_rate, outer_momentum=args.outer_momentum,
        )
    elif mode != "sync":
        raise ValueError(f"unknown mode {mode!r}")
    # Traces of a step (``strategy.run`` called in graph mode): a retrace after
    # an evaluation would show as more than one train + one test trace.
    traced_runs = []
    untraced_run = strategy.run

    def counting_run(fn, *a, **k):
        if not tf.executing_eagerly():
            traced_runs.append(getattr(fn, "__name__", "?"))
        return untraced_run(fn, *a, **k)

    strategy.run = counting_run
    train, val, info = _text_lm.load_corpus()
    # The same fixed windows for every mode (and worker count); each worker
    # evaluates every `workers`-th one, evaluate's result is their global mean.
    val_x, val_y = _text_lm.val_windows(val, args.context, args.val_windows)
    total_steps = args.steps if mode == "sync" else int(args.steps * args.local_steps_factor)
    total_steps = -(-total_steps // args.eval_every) * args.eval_every

    def train_fn(context):
        worker = context.input_pipeline_id

        def gen():
            step = 0
            while True:  # bounded by fit's steps
                yield _text_lm.train_batch(
                    train, args.context, args.batch, args.seed, step, worker
                )
                step += 1

        spec = tf.TensorSpec((args.batch, args.context), tf.int32)
        dataset = tf.data.Dataset.from_generator(gen, output_signature=(spec, spec))
        # Declared infinite: for a dataset that may end, TF's multi-worker
        # iterator adds a cross-worker reduce to every step.
        dataset = dataset.apply(
            tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY)
        )
        return dataset.prefetch(2)

    def val_fn(context):
        k = context.input_pipeline_id
        n = context.num_input_pipelines
        return tf.data.Dataset.from_tensor_slices((val_x[k::n], val_y[k::n])).batch(32).repeat()

    train_ds = strategy.distribute_datasets_from_function(train_fn)
    val_ds = strategy.distribute_datasets_from_function(val_fn)
    val_steps = -(-(args.val_windows // args.workers) // 32)
    with strategy.scope():
        model = _text_lm.make_model(args.context, args.width, args.layers, 4, args.seed)
        model.compile(
            optimizer=keras.optimizers.AdamW(
                _inner_learning_rate(args, total_steps), weight_decay=args.weight_decay),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        # Build the compiled loss on a plain batch: Keras' symbolic build would
        # convert a distributed dataset's first (PerReplica) batch, and fail.
        model.compute_loss(val_x[:2], val_y[:2], model(val_x[:2]))
    initial = model.evaluate(val_ds, steps=val_steps, verbose=0)
    curve = [{"step": 0, "seconds": 0.0, "step_clock": 0.0, "val_loss": float(initial)}]

    every = SYNC_EVERY[mode]
    diagnose = mode == "diloco_h64"

    class Clock(keras.callbacks.Callback):
        """Three clocks: wall (training time, evaluations excluded), step (sum of
        the train steps' own times) and, in the driver, profile (median time per
        step kind). Plus DiLoCo's drift diagnostics at every outer step."""

        def __init__(self):
            super().__init__()
            self.train_seconds = 0.0
            self.started = None
            self.step = 0
            self.first_step_seconds = None
            self.step_seconds = []  # each step's own time
            self.batch_started = None
            self.outer = []  # per outer step: |outer step|, |mean delta|, divergence
            self.last_centre = None

        def on_train_batch_begin(self, batch, logs=None):
            self.batch_started = time.monotonic()
            if self.started is None:
                self.started = self.batch_started

        def on_train_batch_end(self, batch, logs=None):
            now = time.monotonic()
            self.step += 1
            self.step_seconds.append(round(now - self.batch_started, 4))
            if self.step == 1:  # exclude the first step (tracing)
                self.first_step_seconds = now - self.started
                self.started = time.monotonic()
            if diagnose:
                self._diagnose()

        def _diagnose(self):
            """Outer step ``c_old − c_new`` and mean delta ``Δ = m_new − μ m_old``
            (``m ← μm + Δ``), from the averager's centre and momentum."""
            if self.step == 1 or self.step % every == 0:
                # The averager's centre and momentum exist once the step was traced.
                outer_state = strategy.state_variables()[3:5]
                centre, momentum = (v.numpy().astype("float64") for v in outer_state)
                if self.last_centre is not None and self.step % every == 0:
                    c_old, m_old = self.last_centre
                    step = float(np.linalg.norm(c_old - centre))
                    delta = float(np.linalg.norm(momentum - args.outer_momentum * m_old))
                    self.outer.append({
                        "step": self.step, "outer_step_norm": round(step, 5),
                        "mean_delta_norm": round(delta, 5),
                        "ratio": round(step / delta, 3) if delta else None,
                        "divergence": round(float(strategy.local_divergence.numpy()), 5),
                    })
                self.last_centre = (centre, momentum)

        def on_test_begin(self, logs=None):
            if self.started is not None:
                self.train_seconds += time.monotonic() - self.started
                self.started = None

        def on_epoch_end(self, epoch, logs=None):
            curve.append({"step": self.step, "seconds": round(self.train_seconds, 3),
                          "step_clock": round(sum(self.step_seconds[1:]), 3),
                          "val_loss": float(logs["val_loss"])})

    clock = Clock()
    model.fit(
        train_ds, epochs=total_steps // args.eval_every, steps_per_epoch=args.eval_every,
        validation_data=val_ds, validation_steps=val_steps, verbose=0, callbacks=[clock],
    )
    syncs = int(strategy.sync_count.numpy()) if mode != "sync" else total_steps
    result = {
        "mode": mode, "task": os.environ.get("TF_ASYNC_TASK"), "curve": curve,
        "params": model.count_params(), "syncs": syncs, "corpus": info,
        "first_step_seconds": clock.first_step_seconds, "step_seconds": clock.step_seconds,
        "outer": clock.outer, "val_windows": int(len(val_x)),
        "traced_runs": traced_runs,
    }
    print("CURVE " + json.dumps(result), flush=True)


def _inner_learning_rate(args, total_steps):
    """AdamW's lr: ``--learning_rate`` after a linear warmup from 0 over
    ``--warmup_steps``, then constant or cosine-decayed to
    ``COSINE_FINAL_FRACTION`` of it at the mode's last step."""
    if args.lr_schedule == "constant" and not args.warmup_steps:
        return args.learning_rate
    import keras

    alpha = 1.0 if args.lr_schedule == "constant" else COSINE_FINAL_FRACTION
    return keras.optimizers.schedules.CosineDecay(
        0.0 if args.warmup_steps else args.learning_rate,
        decay_steps=total_steps - args.warmup_steps, alpha=alpha,
        warmup_target=args.learning_rate if args.warmup_steps else None,
        warmup_steps=args.warmup_steps,
    )


# ------------------------------------------------------------------ driver


def _run_mode(mode: str, args, passthrough) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TF_CONFIG", None)
    command = [
        sys.executable, "-m", "tf_async.launch", "--workers", str(args.workers),
        "--link_latency_ms", str(args.link_latency_ms), "--link_mbit", str(args.link_mbit),
        "--", os.path.abspath(__file__), "--worker", mode, *passthrough,
    ]
    start = time.monotonic()
    load_before = os.getloadavg()[0]
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=3600)
    load_after = os.getloadavg()[0]
    output = proc.stdout + proc.stderr
    curves = [json.loads(m) for m in re.findall(r"^\[worker 0\] CURVE (\{.*\})$", output, re.M)]
    if proc.returncode != 0 or not curves:
        raise SystemExit(f"mode {mode} failed (exit {proc.returncode}):\n{output[-6000:]}")
    stats = re.search(r"\[launch\] relay-stats (\[.*\])", output)
    result = curves[0]
    result["link"] = json.loads(stats.group(1)) if stats else []
    result["process_seconds"] = round(time.monotonic() - start, 1)
    result["load"] = [round(load_before, 2), round(load_after, 2)]  # 1-min load average
    return result


def _mode_order(modes, run):
    """Run ``run``'s mode order: rotated by one per run, so no mode always runs
    first (or right after another one) while the machine's load drifts."""
    k = run % len(modes)
    return list(modes[k:]) + list(modes[:k])


def _time_to(curve, target, clock="seconds"):
    """Time on ``clock`` at which the validation loss first reaches ``target``:
    the crossing, linearly interpolated between the two evaluations around it;
    None if never."""
    for a, b in zip(curve, curve[1:]):
        if b["val_loss"] <= target:
            if a["val_loss"] <= target:
                return a[clock]
            frac = (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"])
            return a[clock] + frac * (b[clock] - a[clock])
    return None


def _step_kind(mode, step):
    """``sync`` (every step of sync: an all-reduce), ``outer`` (a local mode's
    step that ends in a synchronisation) or ``inner`` (a local step)."""
    if mode == "sync":
        return "sync"
    return "outer" if step % SYNC_EVERY[mode] == 0 else "inner"


def _kind_medians(result, mode):
    """Median seconds per step kind, the first (traced) step left out."""
    import statistics

    by_kind = {}
    for k, t in enumerate((result.get("step_seconds") or [])[1:], start=2):
        by_kind.setdefault(_step_kind(mode, k), []).append(t)
    return {kind: statistics.median(times) for kind, times in by_kind.items()}


def _profile_clock(curve, mode, medians):
    """Each evaluation's time on the profile clock: every step so far priced at
    its kind's median time, so a burst of load on the machine during a few
    steps does not move the time to a loss."""
    out = []
    for point in curve:
        seconds = sum(medians.get(_step_kind(mode, k), 0.0) for k in range(1, point["step"] + 1))
        # (Results saved before the step clock existed: their wall time.)
        out.append(dict(point, profile=round(seconds, 3),
                        step_clock=point.get("step_clock", point["seconds"])))
    return out


def _loss_at(curve, step):
    for point in curve:
        if point["step"] == step:
            return point["val_loss"]
    return None


def _step_profile(result, mode):
    """Median seconds of a local (inner) step and of a step that ends in a sync
    (sync's every step, a local mode's outer step); None where a mode has no
    such steps."""
    medians = _kind_medians(result, mode)
    return medians.get("inner"), medians.get("outer", medians.get("sync"))


CLOCKS = ("profile", "step_clock", "seconds")  # the final line uses the first


def _summarise(runs, args) -> dict:
    """Per-run metrics, and the summary lines. Times to sync's final loss on
    three clocks: ``profile`` (each step priced at its kind's median time: the
    final line's), ``step_clock`` (sum of the train steps' own times) and
    ``seconds`` (wall time of training, evaluations excluded)."""
    import math

    per_run = []
    for modes in runs:
        curves = {mode: _profile_clock(result["curve"], mode, _kind_medians(result, mode))
                  for mode, result in modes.items()}
        sync = curves["sync"]
        target = sync[-1]["val_loss"]
        sync_times = {clock: _time_to(sync, target, clock) for clock in CLOCKS}
        row = {}
        for mode, result in modes.items():
            curve = curves[mode]
            steps = curve[-1]["step"]
            times = {clock: _time_to(curve, target, clock) for clock in CLOCKS}
            speedups = {clock: (sync_times[clock] / t) if t else 0.0
                        for clock, t in times.items()}
            row[mode] = {
                "final_val_loss": curve[-1]["val_loss"],
                "final_bpb": curve[-1]["val_loss"] / math.log(2),
                "steps": steps,
                "seconds": curve[-1]["seconds"],
                "seconds_per_step": curve[-1]["seconds"] / max(1, steps - 1),
                "time_to_sync_loss": times["profile"],
                "speedup_to_sync_loss": speedups["profile"],
                "time_to_sync_loss_by_clock": times,
                "speedup_by_clock": speedups,
                "loss_at_sync_steps": _loss_at(curve, sync[-1]["step"]),
                "syncs": result["syncs"],
                "link": _link_summary(result["link"]),
                "load": result.get("load"),
                "outer": result.get("outer") or [],
                "first_of_epoch_seconds": _first_of_epoch(result, args),
                "gap_by_step": {
                    p["step"]: (_loss_at(curve, p["step"]) - p["val_loss"]) / p["val_loss"]
                    for p in sync[1:] if _loss_at(curve, p["step"]) is not None
                },
            }
            row[mode]["local_step_seconds"], row[mode]["sync_step_seconds"] = (
                _step_profile(result, mode))
            at = row[mode]["loss_at_sync_steps"]
            row[mode]["gap_at_equal_steps"] = None if at is None else (at - target) / target
        per_run.append(row)
    return per_run


def _first_of_epoch(result, args):
    """Median time of the first step of the 2nd, 3rd, ... epoch (after an
    evaluation); None for a single epoch."""
    import statistics

    every = getattr(args, "eval_every", None) or 64
    times = (result.get("step_seconds") or [])[every::every]
    return statistics.median(times) if times else None


def _link_summary(links):
    used = [l for l in links if l["bytes"]]
    if not used:
        return {}
    rates = [l["saturated_mbit"] for l in used if l["saturated_mbit"]]
    return {
        "bytes": sum(l["bytes"] for l in used),
        "one_way_ms_min": min(l["one_way_ms_min"] for l in used),
        "one_way_ms_mean": round(sum(l["one_way_ms_mean"] for l in used) / len(used), 2),
        "saturated_mbit": round(sum(rates) / len(rates), 1) if rates else None,
    }


def _print(per_run, args, info) -> None:
    print(f"# corpus: {info}")
    print(f"# link: {args.link_latency_ms:g} ms one-way, {args.link_mbit:g} Mbit/s, "
          f"{args.workers} workers")
    header = (f"{'run':>3} {'mode':>14} {'steps':>5} {'syncs':>5} {'s/step':>7} {'wall s':>7} "
              f"{'val loss':>8} {'bpb':>6} {'loss@sync steps':>15} {'t→sync loss':>11} "
              f"{'speedup':>7} {'(step, wall)':>12} {'load':>10}  "
              "link (min/mean one-way ms, saturated Mbit/s)")
    print(header)
    for k, row in enumerate(per_run):
        for mode, r in row.items():
            t = r["time_to_sync_loss"]
            at = r["loss_at_sync_steps"]
            link = r["link"]
            other = r["speedup_by_clock"]
            load = r["load"] or ["-", "-"]
            print(f"{k:>3} {mode:>14} {r['steps']:>5} {r['syncs']:>5} "
                  f"{r['seconds_per_step']:>7.3f} {r['seconds']:>7.1f} "
                  f"{r['final_val_loss']:>8.4f} {r['final_bpb']:>6.3f} "
                  f"{'-' if at is None else f'{at:.4f}':>15} "
                  f"{'never' if t is None else f'{t:.1f}':>11} "
                  f"{r['speedup_to_sync_loss']:>7.2f} "
                  f"{other['step_clock']:>5.2f},{other['seconds']:>5.2f} "
                  f"{load[0]:>4}→{load[1]:<5}  "
                  f"{link.get('one_way_ms_min')}/{link.get('one_way_ms_mean')}, "
                  f"{link.get('saturated_mbit')}")
    print("# t→sync loss and speedup on the profile clock (each step at its kind's median "
          "time); in brackets the speedup on the step clock and on wall time")
    for mode in per_run[0]:
        if mode == "sync":
            continue
        speedups = [row[mode]["speedup_to_sync_loss"] for row in per_run]
        gaps = [row[mode]["gap_at_equal_steps"] for row in per_run]
        print(f"{mode}_speedup_to_sync_loss_runs: {[round(s, 2) for s in speedups]}")
        print(f"{mode}_loss_gap_at_equal_steps_runs: "
              f"{[None if g is None else round(g, 4) for g in gaps]}")
        print(f"# {mode} gap to sync by step, per run: "
              f"{[{k: round(g, 4) for k, g in row[mode]['gap_by_step'].items()} for row in per_run]}")
    for mode in per_run[0]:
        profile = [(row[mode]["local_step_seconds"], row[mode]["sync_step_seconds"],
                    row[mode]["first_of_epoch_seconds"]) for row in per_run]
        text = ", ".join(
            f"local {'-' if a is None else f'{a:.3f}'} s, syncing {'-' if b is None else f'{b:.3f}'}"
            f" s, first after an evaluation {'-' if c is None else f'{c:.3f}'} s"
            for a, b, c in profile)
        print(f"# {mode} median step time per run: {text}")
    for mode in per_run[0]:
        for k, row in enumerate(per_run):
            outer = row[mode]["outer"]
            if outer:
                print(f"# {mode} run {k} drift: |outer step| / |mean delta| per outer step "
                      f"{[o['ratio'] for o in outer]}; |mean delta| "
                      f"{[o['mean_delta_norm'] for o in outer]}; local_divergence "
                      f"{[o['divergence'] for o in outer]}")
    if "diloco_h64" in per_run[0]:
        import statistics

        gaps = [row["diloco_h64"]["gap_at_equal_steps"] for row in per_run]
        speedups = [row["diloco_h64"]["speedup_to_sync_loss"] for row in per_run]
        print(f"diloco_loss_gap_at_equal_steps: {statistics.median(gaps):.4f}")
        print(f"diloco_speedup_to_sync_loss: {statistics.median(speedups):.2f}")


def _plot(runs, path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"sync": "black", "local_sgd_h16": "tab:blue", "diloco_h64": "tab:red",
               "local_sgd_h64": "tab:green"}
    for k, modes in enumerate(runs):
        for mode, result in modes.items():
            curve = result["curve"]
            label = mode if k == 0 else None
            ax_t.plot([p["seconds"] for p in curve], [p["val_loss"] for p in curve],
                      color=colours.get(mode), marker=".", label=label, alpha=0.8)
            ax_s.plot([p["step"] for p in curve], [p["val_loss"] for p in curve],
                      color=colours.get(mode), marker=".", label=label, alpha=0.8)
    target = runs[0]["sync"]["curve"][-1]["val_loss"]
    top = max(r["curve"][1]["val_loss"] for modes in runs for r in modes.values())
    for ax in (ax_t, ax_s):
        ax.set_ylim(target - 0.25 * (top - target), top + 1.5 * (top - target))
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.legend()
        ax.grid(alpha=0.3)
    ax_t.set_xlabel("training wall time (s)")
    ax_s.set_xlabel("step")
    meta = runs[0]["sync"]
    fig.suptitle(
        f"byte-level transformer LM ({meta['params']} params) on the Python stdlib, "
        f"{args.workers} worker processes over a {args.link_latency_ms:g} ms / "
        f"{args.link_mbit:g} Mbit/s relay ({len(runs)} runs)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"# wrote {path}")


def main(argv=None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 128 if args.quick else 512
    if args.worker:
        _worker(args)
        return
    if args.eval_every % 64 and not args.from_json:
        # An evaluation (an epoch end) forces a sync: between two of them, a
        # DiLoCo period of 64 steps would be cut short.
        parser.error(f"argument --eval_every: must be a multiple of 64, got {args.eval_every}")
        return
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:
        if mode not in MODES + EXTRA_MODES:
            parser.error(
                f"argument --modes: each must be one of {MODES + EXTRA_MODES}, got {mode!r}")
    if "sync" not in modes:
        parser.error("argument --modes: must include 'sync' (the target loss)")
    if args.warmup_steps >= args.steps:
        parser.error(f"argument --warmup_steps: must be < --steps ({args.steps}), "
                     f"got {args.warmup_steps}")
    if args.val_windows < args.workers:
        parser.error(f"argument --val_windows: must be >= --workers ({args.workers}), "
                     f"got {args.val_windows}")
    if args.from_json:
        with open(args.from_json) as f:
            runs = json.load(f)["runs"]
    else:
        passthrough = [
            "--steps", str(args.steps), "--local_steps_factor", str(args.local_steps_factor),
            "--eval_every", str(args.eval_every), "--batch", str(args.batch),
            "--context", str(args.context), "--width", str(args.width),
            "--layers", str(args.layers), "--learning_rate", str(args.learning_rate),
            "--seed", str(args.seed), "--workers", str(args.workers),
            "--outer_learning_rate", str(args.outer_learning_rate),
            "--outer_momentum", str(args.outer_momentum),
            "--weight_decay", str(args.weight_decay), "--lr_schedule", args.lr_schedule,
            "--warmup_steps", str(args.warmup_steps), "--val_windows", str(args.val_windows),
        ]
        runs = []
        for run in range(args.runs):
            results = {}
            for mode in _mode_order(modes, run):
                results[mode] = _run_mode(mode, args, passthrough)
                r = results[mode]
                print(f"# run {run} {mode}: {r['curve'][-1]} ({r['process_seconds']} s "
                      f"in total, 1-min load {r['load'][0]} -> {r['load'][1]})", flush=True)
            runs.append({mode: results[mode] for mode in modes})
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"args": vars(args), "runs": runs}, f)
    per_run = _summarise(runs, args)
    _print(per_run, args, runs[0]["sync"]["corpus"])
    if args.plot:
        _plot(runs, args.plot, args)


if __name__ == "__main__":
    main()
