"""Chaos benchmark: asynchronous PS training that loses and duplicates nothing.

A real multi-process cluster (``python -m tf_async.launch --workers 4 --ps 1
--keep_going``, private network) trains a fit of a planned number of steps
(``--epochs`` x ``--steps``) while:

1. the chief ``kill -9``s a random worker and restarts it (same address)
   ``--down`` seconds later; within ``--kill_every`` seconds of it serving
   again comes the next kill; TF's
   ``ClusterCoordinator`` re-runs the lost closures elsewhere and rebuilds the
   restarted worker's dataset;
2. every worker's input carries a NaN/Inf batch every ``--nan_every`` batches
   (the default ``on_nonfinite="skip"`` guard must skip them);
3. in epoch ``--ps_kill_epoch`` the chief ``kill -9``s the parameter server;
   fit must fail with a clear error (timed: goal < 60 s, no hang). A second
   launch (a new cluster) resumes with ``keras.callbacks.BackupAndRestore`` from
   the last epoch end and completes the planned epochs (worker chaos again).

Accounting, per completed epoch, from the parameter server's own counters
after the epoch's ``join`` (each epoch is counted by the phase that completed
it): its ``--steps`` step ids must each be marked done once (a per-step ledger:
the PS's done ring), and the updates applied (version delta) plus the
non-finite steps skipped (``nonfinite_skipped``) must equal ``--steps``; the
final ``optimizer.iterations`` must equal the applied total. A ledger optimizer
(SGD) counts, on the PS, every apply whose gradient is not finite.

Prints kills survived, wall time, ``ps_loss_to_error_seconds``, then, last,
``steps_lost_or_duplicated: N`` and ``nonfinite_updates_applied: N`` (goals 0).

    python benchmarks/chaos.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

from _flags import non_negative_int, positive_int  # noqa: E402 (benchmarks/ is on sys.path)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKERS = 4
FEATURES = 16
HIDDEN = 256
T0 = time.monotonic()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (< 5 min)")
    parser.add_argument("--epochs", type=positive_int, default=None, help="planned epochs")
    parser.add_argument("--steps", type=positive_int, default=None, help="steps per epoch")
    parser.add_argument("--kill_every", type=positive_int, default=None,
                        help="seconds between worker kills")
    parser.add_argument("--down", type=non_negative_int, default=2,
                        help="seconds a killed worker stays down")
    parser.add_argument("--nan_every", type=positive_int, default=13,
                        help="every worker's input has a non-finite batch this often")
    parser.add_argument("--ps_kill_epoch", type=non_negative_int, default=None,
                        help="epoch in which the PS is killed (default: the middle one)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--phase_timeout", type=positive_int, default=None,
                        help="seconds a phase may take before it counts as a hang")
    # Internal: how the launcher runs this file as a task of the cluster.
    parser.add_argument("--task", default=None, help=argparse.SUPPRESS)
    return parser


def _settings(args) -> argparse.Namespace:
    quick = args.quick
    args.epochs = args.epochs or (4 if quick else 8)
    args.steps = args.steps or (800 if quick else 4000)
    args.kill_every = args.kill_every or (4 if quick else 8)
    if args.ps_kill_epoch is None:
        args.ps_kill_epoch = args.epochs // 2
    if not 0 < args.ps_kill_epoch < args.epochs:
        raise SystemExit("--ps_kill_epoch must be in [1, --epochs - 1]")
    args.phase_timeout = args.phase_timeout or (240 if quick else 900)
    return args


# ----------------------------------------------------------------- the task


def _pid_file(directory: str, task: str) -> str:
    return os.path.join(directory, task.replace(":", "_") + ".pid")


def _task_main(args) -> None:
    """One process of the cluster (run by the launcher or restarted by the chief)."""
    work = os.environ["CHAOS_DIR"]
    task = os.environ.get("TF_ASYNC_TASK", "")
    with open(_pid_file(work, task), "w") as f:
        f.write(str(os.getpid()))
    import tf_async

    tf_async.cluster.serve_forever_if_server_task()  # workers and the PS stop here
    _chief(args, work, phase=args.task)


def _dataset_fn(nan_every: int):
    import tensorflow as tf

    def dataset_fn(input_context):
        worker = input_context.input_pipeline_id

        def batch(i):
            seed = tf.stack([tf.cast(worker, tf.int64), i])
            x = tf.random.stateless_normal([32, FEATURES], seed=seed)
            y = tf.cast(tf.reduce_sum(x[:, :4], axis=1) > 0, tf.int32)
            poison = tf.equal(i % nan_every, worker % nan_every)
            bad = tf.tensor_scatter_nd_update(x, [[0, 0], [1, 1]], [float("nan"), float("inf")])
            return tf.where(poison, bad, x), y

        return tf.data.Dataset.range(2**62).map(batch)

    return dataset_fn


def _ledger_optimizer():
    import keras
    import tensorflow as tf

    class LedgerSGD(keras.optimizers.SGD):
        """SGD that counts, where it applies, every non-finite gradient it applies."""

        def build(self, variables):
            super().build(variables)
            self.nonfinite_applied = self.add_variable((), dtype="int64",
                                                       name="nonfinite_applied")
            self._first = self._var_key(variables[0])

        def update_step(self, gradient, variable, learning_rate):
            if self._var_key(variable) == self._first:
                values = gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient
                bad = tf.logical_not(tf.reduce_all(tf.math.is_finite(values)))
                self.nonfinite_applied.assign_add(tf.cast(bad, tf.int64))
            super().update_step(gradient, variable, learning_rate)

    return LedgerSGD(0.05)


class _WorkerChaos:
    """``kill -9`` a random worker, restart it at the same address ``down`` s
    later, and kill the next one within ``every`` s of it serving again
    (one worker down at a time: each kill is survived before the next one —
    overlapping failures on an overloaded machine mostly measure TF's
    recovery, which re-registers the cluster once every lost worker is back)."""

    def __init__(self, work: str, cluster: dict, every: float, down: float, seed: int):
        self.work, self.cluster, self.every, self.down = work, cluster, every, down
        self.rng = random.Random(seed)
        self.kills = 0
        self.children = []
        self.restarting: set = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self):
        while not self._stop.wait(self.every):
            with self._lock:
                serving = [i for i in range(len(self.cluster["worker"]))
                           if i not in self.restarting]
                if self.restarting:
                    continue
                index = self.rng.choice(serving)
                self.restarting.add(index)
            with open(_pid_file(self.work, f"worker:{index}")) as f:
                pid = int(f.read())
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.kills += 1
            print(f"chaos: {time.monotonic() - T0:.1f}s killed worker {index} (pid {pid})",
                  flush=True)
            threading.Thread(target=self._restart, args=(index,), daemon=True).start()

    def _restart(self, index: int) -> None:
        from tf_async.cluster import make_tf_config

        if self._stop.wait(self.down):
            return
        env = dict(os.environ, TF_CONFIG=make_tf_config(self.cluster, "worker", index),
                   TF_ASYNC_TASK=f"worker:{index}")
        log = open(os.path.join(self.work, f"worker_{index}_restart{self.kills}.log"), "w")
        # A child of the chief: in the cluster's network namespace, and in the
        # chief's process group, so the launcher's cleanup ends it too.
        with self._lock:
            self.children.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--task=server"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        started = time.monotonic()
        if self._wait_until_serving(self.cluster["worker"][index]):
            print(f"chaos: {time.monotonic() - T0:.1f}s worker {index} serving again "
                  f"({time.monotonic() - started:.1f}s after its restart)", flush=True)
        with self._lock:
            self.restarting.discard(index)

    def _wait_until_serving(self, address: str) -> bool:
        """Whether the restarted worker's server came up (a connect to its port
        on this namespace's loopback)."""
        import socket

        host, port = address.rsplit(":", 1)
        while not self._stop.wait(0.2):
            with socket.socket() as probe:
                if probe.connect_ex((host, int(port))) == 0:
                    return True
        return False

    def kill_children(self):
        with self._lock:
            for child in self.children:
                if child.poll() is None:
                    child.kill()
                    child.wait()


def _record(work: str, kind: str, record: dict) -> None:
    """One result line in ``work/records.jsonl`` (stdout is shared with TF's logs)."""
    print(f"{kind} {json.dumps(record)}", flush=True)
    with open(os.path.join(work, "records.jsonl"), "a") as f:
        f.write(json.dumps({"kind": kind, **record}) + "\n")


def _chief(args, work: str, phase: str) -> None:
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_async

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    cluster = resolver.cluster_spec().as_dict()
    strategy = tf_async.strategies.AsyncParameterServerStrategy(resolver)
    with strategy.scope():
        model = keras.Sequential([keras.Input((FEATURES,)),
                                  keras.layers.Dense(HIDDEN, activation="relu"),
                                  keras.layers.Dense(HIDDEN, activation="relu"),
                                  keras.layers.Dense(2)])
        model.compile(optimizer=_ledger_optimizer(), metrics=["accuracy"],
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    chaos = _WorkerChaos(work, cluster, args.kill_every, args.down,
                         args.seed + (phase == "resume"))
    ps_killed_at = []

    class Ledger(keras.callbacks.Callback):
        """Per epoch, after the epoch's join: what the PS counted."""

        def on_train_begin(self, logs=None):
            self.first_epoch = None

        def on_epoch_begin(self, epoch, logs=None):
            if self.first_epoch is None:
                self.first_epoch = epoch
            self.epoch = epoch
            self.version = strategy.global_version
            self.nonfinite = int(model.optimizer.nonfinite_applied.numpy())
            if phase == "chaos" and epoch == args.ps_kill_epoch:
                chaos.stop()

        def on_train_batch_end(self, batch, logs=None):
            if not ps_killed_at and not (phase == "chaos" and self.epoch >= args.ps_kill_epoch):
                chaos.start()  # once training runs (start-up is not what is tested)
            now = time.monotonic()
            if now - getattr(self, "shown", 0.0) > 10:
                self.shown = now
                print(f"progress: {now - T0:.1f}s epoch {self.epoch} batch {batch}", flush=True)
            if (phase == "chaos" and not ps_killed_at and batch >= args.steps // 2
                    and self.epoch == args.ps_kill_epoch):
                with open(_pid_file(work, "ps:0")) as f:
                    os.kill(int(f.read()), signal.SIGKILL)
                ps_killed_at.append(time.monotonic())
                print("chaos: killed ps 0", flush=True)

        def on_epoch_end(self, epoch, logs=None):
            first = (epoch - self.first_epoch) * args.steps  # this fit's step ids
            _record(work, "LEDGER", {
                "phase": phase, "epoch": epoch, "planned": args.steps,
                "at_seconds": round(time.monotonic() - T0, 1),
                "done": int(np.sum(strategy.steps_applied(first, args.steps, model))),
                "applied": strategy.global_version - self.version,
                "skipped": int(logs["nonfinite_skipped"]),
                "nonfinite_applied":
                    int(model.optimizer.nonfinite_applied.numpy()) - self.nonfinite,
                "kills": chaos.kills,
            })

    backup = keras.callbacks.BackupAndRestore(os.path.join(work, "backup"))
    start = time.monotonic()
    try:
        model.fit(_dataset_fn(args.nan_every), epochs=args.epochs,
                  steps_per_epoch=args.steps, verbose=0, callbacks=[backup, Ledger()])
    except Exception as error:  # noqa: BLE001 - reported, then this task ends
        chaos.stop()
        since = time.monotonic() - ps_killed_at[0] if ps_killed_at else float("nan")
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        _record(work, "ERROR", {"phase": phase, "seconds_after_ps_kill": since,
                                "type": type(error).__name__, "message": first_line})
        chaos.kill_children()
        os._exit(3)
    chaos.stop()
    weights = model.get_weights()
    _record(work, "RESULT", {
        "phase": phase, "seconds": time.monotonic() - start,
        "iterations": int(model.optimizer.iterations.numpy()),
        "version": strategy.global_version,
        "weights_finite": bool(all(np.isfinite(w).all() for w in weights)),
        "kills": chaos.kills,
    })
    chaos.kill_children()
    os._exit(0)  # the coordinator would keep reconnecting to killed workers


# ------------------------------------------------------------ orchestration


def _launch_phase(args, work: str, phase: str):
    env = dict(os.environ, CHAOS_DIR=work)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env.pop("TF_CONFIG", None)
    command = [sys.executable, "-m", "tf_async.launch", "--workers", str(WORKERS), "--ps", "1",
               "--keep_going", "--", os.path.abspath(__file__), f"--task={phase}"]
    for name in ("epochs", "steps", "kill_every", "down", "nan_every", "ps_kill_epoch", "seed"):
        command.append(f"--{name}={getattr(args, name)}")
    started = time.monotonic()
    launcher = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = launcher.communicate(timeout=args.phase_timeout)
        hung = False
    except subprocess.TimeoutExpired:  # a hang: the launcher stops every task on SIGTERM
        launcher.send_signal(signal.SIGTERM)
        out, _ = launcher.communicate()
        hung = True
    with open(os.path.join(work, f"{phase}.log"), "w") as f:
        f.write(out)
    records = {"LEDGER": [], "RESULT": [], "ERROR": []}
    path = os.path.join(work, "records.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if record["phase"] == phase:
                    records[record.pop("kind")].append(record)
    return records, hung, time.monotonic() - started, out


def main(argv=None) -> int:
    args = _settings(_parser().parse_args(argv))
    if args.task is not None:
        _task_main(args)
        return 0
    work = tempfile.mkdtemp(prefix="tf_async_chaos_")
    print(f"chaos: 1 ps, {WORKERS} workers, {args.epochs} epochs x {args.steps} steps planned; "
          f"kill -9 a worker every {args.kill_every}s; NaN batch every {args.nan_every}; "
          f"ps killed in epoch {args.ps_kill_epoch}; logs in {work}")
    start = time.monotonic()
    chaos, hung_a, seconds_a, out_a = _launch_phase(args, work, "chaos")
    print(f"phase 1 (worker chaos, then PS kill): {seconds_a:.1f}s"
          + (" -- HUNG (timeout)" if hung_a else ""))
    resume, hung_b, seconds_b, out_b = _launch_phase(args, work, "resume")
    print(f"phase 2 (resume with BackupAndRestore): {seconds_b:.1f}s"
          + (" -- HUNG (timeout)" if hung_b else ""))

    # Each epoch counts once: the phase that completed it (the PS-kill epoch
    # and those after it are completed by the resume).
    epochs = {r["epoch"]: r for r in chaos["LEDGER"] if r["epoch"] < args.ps_kill_epoch}
    epochs.update({r["epoch"]: r for r in resume["LEDGER"]})
    lost_or_duplicated = 0
    for epoch in range(args.epochs):
        record = epochs.get(epoch)
        if record is None:
            print(f"epoch {epoch}: no ledger (not completed): {args.steps} steps lost")
            lost_or_duplicated += args.steps
            continue
        bad = abs(record["planned"] - record["done"]) + abs(
            record["done"] - record["applied"] - record["skipped"])
        lost_or_duplicated += bad
        print(f"epoch {epoch} ({record['phase']}): planned {record['planned']}, done "
              f"{record['done']}, applied {record['applied']}, skipped non-finite "
              f"{record['skipped']}, non-finite applied {record['nonfinite_applied']}"
              + (f"  <-- {bad} lost or duplicated" if bad else ""))
    applied = sum(r["applied"] for r in epochs.values())
    final = resume["RESULT"][0] if resume["RESULT"] else None
    if final is None:
        print("resume did not finish:\n" + out_b[-3000:])
        lost_or_duplicated += 1
    else:
        if final["iterations"] != applied or final["version"] != applied:
            print(f"final iterations {final['iterations']} / version {final['version']} "
                  f"!= applied {applied}")
            lost_or_duplicated += abs(final["iterations"] - applied)
        print(f"weights_finite: {final['weights_finite']}")
    nonfinite_applied = sum(r["nonfinite_applied"] for r in epochs.values())
    if final is not None and not final["weights_finite"]:
        nonfinite_applied = max(nonfinite_applied, 1)
    kills = (chaos["LEDGER"][-1]["kills"] if chaos["LEDGER"] else 0) + (
        final["kills"] if final else 0)
    error = chaos["ERROR"][0] if chaos["ERROR"] else None
    if error is None:
        print("the PS kill gave no error on the chief:\n" + out_a[-3000:])
        seconds_to_error = float("inf")
    else:
        seconds_to_error = error["seconds_after_ps_kill"]
        print(f"error on the chief after the PS kill: {error['type']}: {error['message']}")
    print(f"nonfinite_skipped_total: {sum(r['skipped'] for r in epochs.values())}")
    print(f"kills_survived: {kills}")
    print(f"wall_time_seconds: {time.monotonic() - start:.1f}")
    print(f"ps_loss_to_error_seconds: {seconds_to_error:.1f}")
    print(f"steps_lost_or_duplicated: {lost_or_duplicated}")
    print(f"nonfinite_updates_applied: {nonfinite_applied}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
