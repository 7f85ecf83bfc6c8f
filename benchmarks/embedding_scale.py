"""Embedding-table scale benchmark: async PS `model.fit` steps/s vs table rows.

Model (issue 12): ``Input(8 int ids) -> keras.layers.Embedding(rows, 32) ->
GlobalAveragePooling1D -> Dense(1)``, batch 256, mse, 2 workers. For rows in
1e3, 1e5, 1e6, 1e7 (``--quick``: 1e3 and 1e6) it times

* 1 PS and 2 PS (the table split by
  ``tf.distribute.experimental.partitioners.FixedShardsPartitioner(2)``),
* stock ``keras.optimizers.Adagrad(0.05)`` (row-sparse automatically under
  AsyncParameterServerStrategy) and ``tf_async.keras_optimizers.LazyAdam``,
* with ``--tf_keras_python PYTHON`` (a Python with ``tf_keras``, e.g.
  /work/venv-tfkeras/bin/python) the same model under tf-keras 2.x
  ``ParameterServerStrategy`` (``tf_keras.optimizers.Adagrad(0.05)``, 1 PS and
  2 PS) in the same run.

Every configuration runs in a fresh multi-process cluster started with
``python -m tf_async.launch --workers 2 --ps N`` (a PS cluster cannot be torn
down in-process, and one OS process per task gives honest per-task memory):
the chief reads the peak RSS (``VmHWM``) of every worker and PS process of
its cluster from ``/proc`` after the timed fits and prints it with steps/s.
Each fit is timed after a warm-up fit (tracing, iterator creation); a run's
steps/s is the best of ``--repeats`` fits. The configurations run in
``--rounds`` rounds (each once per round, the order reversed every other
round); every ratio is computed per round and the median over the rounds is
printed with the rounds' values (on a shared machine the first cluster of a
run, or a load burst, can be 1.5x slower: one run per configuration gave
``steps_per_s_large_over_small`` anywhere from 0.7 to 2.0).

The last line is ``steps_per_s_large_over_small: X`` -- steps/s at the
largest size run divided by steps/s at 1e3 (stock Adagrad, 1 PS), median
over rounds.
Goals: X >= 0.8; tf_async >= 1.0x tf-keras PSS at 1e6; worker RSS not
growing with rows.

    python benchmarks/embedding_scale.py --quick --tf_keras_python /work/venv-tfkeras/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _flags import positive_int  # noqa: E402 (benchmarks/ is on sys.path)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

IDS = 8
DIM = 32
WORKERS = 2
FULL_ROWS = (1_000, 100_000, 1_000_000, 10_000_000)
QUICK_ROWS = (1_000, 1_000_000)
OPTIMIZERS = ("adagrad", "lazy_adam")
RESULT = "embedding_scale_result: "


def make_model(keras, rows: int):
    inputs = keras.Input((IDS,), dtype="int32")
    x = keras.layers.Embedding(rows, DIM)(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(1)(x))


def make_dataset_fn(rows: int, batch_size: int):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    ids = rng.integers(0, rows, size=(64 * batch_size, IDS)).astype("int32")
    y = rng.normal(size=(64 * batch_size, 1)).astype("float32")

    def dataset_fn(input_context=None):
        return tf.data.Dataset.from_tensor_slices((ids, y)).repeat().batch(batch_size)

    return dataset_fn


def _peak_rss_mb(pid: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _cluster_pids() -> dict:
    """``{task type: [pid, ...]}`` of every process of this launched cluster.

    The tasks are found in /proc by their ``TF_ASYNC_TASK`` and a ``TF_CONFIG``
    naming the same cluster as ours (the launcher gives each task both)."""
    own = json.loads(os.environ["TF_CONFIG"])["cluster"]
    found: dict = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                env = dict(item.split(b"=", 1) for item in handle.read().split(b"\0")
                           if b"=" in item)
            task = env.get(b"TF_ASYNC_TASK")
            if task is None or json.loads(env[b"TF_CONFIG"])["cluster"] != own:
                continue
            found.setdefault(task.decode().split(":")[0], []).append(pid)
        except (OSError, KeyError, ValueError):
            continue  # gone, not ours, or not readable
    return found


def cluster_peak_rss() -> dict:
    """Peak RSS (MB) of every process of this launched cluster, by task type."""
    return {task: [_peak_rss_mb(pid) for pid in pids] for task, pids in _cluster_pids().items()}


def _cpu_seconds(pid: str) -> float:
    """User + system CPU time of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cluster_cpu_seconds() -> dict:
    """CPU seconds used so far by the cluster's processes, summed per task type
    (CPU time, unlike wall time, hardly depends on what else the machine runs)."""
    return {task: sum(_cpu_seconds(pid) for pid in pids)
            for task, pids in _cluster_pids().items()}


def child(args) -> None:
    """One configuration, run by every task of a launched cluster."""
    from tf_async.cluster import local_cluster, serve_forever_if_server_task

    serve_forever_if_server_task()  # worker/ps tasks serve here and never return
    import tensorflow as tf

    partitioner = None
    if args.ps > 1:
        partitioner = tf.distribute.experimental.partitioners.FixedShardsPartitioner(args.ps)
    resolver = local_cluster(workers=WORKERS, ps=args.ps)  # joins TF_CONFIG's cluster
    dataset_fn = make_dataset_fn(args.rows, args.batch_size)
    if args.framework == "tf_keras":
        import tf_keras as keras

        strategy = tf.distribute.experimental.ParameterServerStrategy(
            resolver, variable_partitioner=partitioner)
        data = keras.utils.experimental.DatasetCreator(dataset_fn)
        make_optimizer = lambda: keras.optimizers.Adagrad(0.05)  # noqa: E731
    else:
        import keras

        import tf_async

        strategy = tf_async.strategies.AsyncParameterServerStrategy(
            resolver, variable_partitioner=partitioner)
        data = dataset_fn
        make_optimizer = (lambda: keras.optimizers.Adagrad(0.05)) if args.optimizer == "adagrad" \
            else (lambda: tf_async.keras_optimizers.LazyAdam(1e-3))
    with strategy.scope():
        model = make_model(keras, args.rows)
        model.compile(optimizer=make_optimizer(), loss="mse")
    built_rss = cluster_peak_rss()  # after the variables exist, before any step
    model.fit(data, epochs=1, steps_per_epoch=args.warmup, verbose=0)
    rates, cpu_ms = [], {}
    for _ in range(args.repeats):
        cpu_before = cluster_cpu_seconds()
        start = time.perf_counter()
        model.fit(data, epochs=1, steps_per_epoch=args.steps, verbose=0)
        rates.append(args.steps / (time.perf_counter() - start))
        for task, seconds in cluster_cpu_seconds().items():
            per_step = 1000.0 * (seconds - cpu_before.get(task, 0.0)) / args.steps
            cpu_ms[task] = min(cpu_ms.get(task, per_step), per_step)
    rss = cluster_peak_rss()
    result = {
        "framework": args.framework, "optimizer": args.optimizer, "rows": args.rows,
        "ps": args.ps, "steps_per_s": max(rates), "all_steps_per_s": rates,
        "cpu_ms_per_step": cpu_ms,
        "worker_rss_mb": max(rss.get("worker", [float("nan")])),
        "ps_rss_mb": max(rss.get("ps", [float("nan")])),
        "chief_rss_mb": _peak_rss_mb("self"),
        "worker_rss_built_mb": max(built_rss.get("worker", [float("nan")])),
        "ps_rss_built_mb": max(built_rss.get("ps", [float("nan")])),
        "chief_rss_built_mb": max(built_rss.get("chief", [float("nan")])),
    }
    print(RESULT + json.dumps(result), flush=True)
    os._exit(0)  # the launcher stops the servers; skip TF's slow teardown


def run_config(args, python: str, framework: str, optimizer: str, rows: int, ps: int) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CONFIG", None)
    command = [python, "-m", "tf_async.launch", "--workers", str(WORKERS), "--ps", str(ps),
               f"--network={args.network}", "--",
               os.path.abspath(__file__), "--child", "--framework", framework,
               "--optimizer", optimizer, "--rows", str(rows), "--ps", str(ps),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--repeats", str(args.repeats), "--batch_size", str(args.batch_size)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True,
                               timeout=args.timeout)
    for line in completed.stdout.splitlines():
        _, sep, rest = line.partition(RESULT)
        if sep:
            return json.loads(rest)
    raise RuntimeError(f"{framework}/{optimizer} rows={rows} ps={ps} failed "
                       f"(exit {completed.returncode}):\n{completed.stdout[-4000:]}"
                       f"{completed.stderr[-2000:]}")


def _row(r: dict, label: str) -> str:
    return (f"{r['framework']:9} {r['optimizer']:9} {r['rows']:9.0e} {r['ps']:2d} "
            f"{r['steps_per_s']:8.1f} {r['worker_rss_mb']:9.0f} {r['ps_rss_mb']:8.0f} "
            f"{r['chief_rss_mb']:8.0f} {r['chief_rss_built_mb']:14.0f}  {label}  cpu ms/step "
            + " ".join(f"{task}={ms:.2f}"
                       for task, ms in sorted(r.get("cpu_ms_per_step", {}).items())))


def _median(values):
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else 0.5 * (values[middle - 1] + values[middle])


def _summary(runs: list) -> dict:
    """One configuration over the rounds: median steps/s and CPU, peak RSS."""
    out = dict(runs[0])
    out["steps_per_s"] = _median([r["steps_per_s"] for r in runs])
    for key in [k for k in runs[0] if k.endswith("_mb")]:
        out[key] = max(r[key] for r in runs)
    tasks = {task for r in runs for task in r.get("cpu_ms_per_step", {})}
    out["cpu_ms_per_step"] = {
        task: _median([r["cpu_ms_per_step"][task] for r in runs if task in r["cpu_ms_per_step"]])
        for task in tasks
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="rows 1e3 and 1e6; 2 PS at 1e6 with Adagrad only (~7 min idle)")
    parser.add_argument("--rows", type=positive_int, nargs="*", default=None,
                        help="table sizes to run (default: 1e3 1e5 1e6 1e7; --quick: 1e3 1e6)")
    parser.add_argument("--batch_size", type=positive_int, default=256)
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="steps per timed fit (default 400; --quick 200)")
    parser.add_argument("--warmup", type=positive_int, default=20, help="steps of the warm-up fit")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="rounds over all configurations (ratios: median over rounds)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed fits per configuration and round, best reported (default 2)")
    parser.add_argument("--ps_counts", type=positive_int, nargs="*", default=[1, 2],
                        help="parameter-server counts to run (tables split over >1 PS)")
    parser.add_argument("--optimizers", nargs="*", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--network", choices=("private", "host"), default="private",
                        help="tf_async.launch --network")
    parser.add_argument("--timeout", type=positive_int, default=900,
                        help="seconds per configuration")
    parser.add_argument("--tf_keras_python", default=None,
                        help="Python with tf_keras installed: also time tf-keras' PSS fit")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--framework", default="tf_async", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", default="adagrad", help=argparse.SUPPRESS)
    parser.add_argument("--ps", type=positive_int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.rows = args.rows[0]
        child(args)
        return
    rows_list = args.rows or (QUICK_ROWS if args.quick else FULL_ROWS)
    args.steps = args.steps or (200 if args.quick else 400)
    args.repeats = args.repeats or 2

    configs = []
    for rows in rows_list:
        for ps in args.ps_counts:
            # --quick: the split table (ps > 1) at the largest size, stock Adagrad only.
            quick_skip = args.quick and ps > 1 and rows != max(rows_list)
            for optimizer in args.optimizers:
                if not (quick_skip or (args.quick and ps > 1 and optimizer != "adagrad")):
                    configs.append((sys.executable, "tf_async", optimizer, rows, ps))
            if args.tf_keras_python and not quick_skip:
                configs.append((args.tf_keras_python, "tf_keras", "adagrad", rows, ps))
    header = (f"{'framework':9} {'optimizer':9} {'rows':>9} {'ps':>2} {'steps/s':>8} "
              f"{'worker_MB':>9} {'ps_MB':>8} {'chief_MB':>8} {'chief_MB_built':>14}")
    print(header + "  round", flush=True)
    # Rounds: every configuration once per round, the order reversed every
    # other round, so a load burst or drift on the shared machine hits the
    # configurations a ratio compares alike; ratios are per round, then the
    # median over rounds.
    runs: dict = {key: [] for key in configs}
    for round_index in range(args.rounds):
        order = configs if round_index % 2 == 0 else configs[::-1]
        for key in order:
            python, framework, optimizer, rows, ps = key
            r = run_config(args, python, framework, optimizer, rows, ps)
            runs[key].append(r)
            print(_row(r, f"{round_index + 1}"), flush=True)

    def rates(framework, optimizer, rows, ps):
        for (_, f, o, r, p), found in runs.items():
            if (f, o, r, p) == (framework, optimizer, rows, ps):
                return [run["steps_per_s"] for run in found]
        return None

    def ratio(name, top, base):
        if not (top and base):
            return
        per_round = [t / b for t, b in zip(top, base)]
        print(f"{name} per round: " + ", ".join(f"{v:.2f}" for v in per_round))
        print(f"{name}: {_median(per_round):.2f}", flush=True)

    print("median over rounds:\n" + header)
    for key in configs:
        print(_row(_summary(runs[key]), "median"), flush=True)
    if args.tf_keras_python:
        for rows in rows_list:
            for ps in args.ps_counts:
                ratio(f"tf_async_over_tf_keras_adagrad_rows{rows:.0e}_ps{ps}",
                      rates("tf_async", "adagrad", rows, ps), rates("tf_keras", "adagrad", rows, ps))
    small, large = min(rows_list), max(rows_list)
    if small == 1_000 and large > small:
        ratio("steps_per_s_large_over_small",
              rates("tf_async", "adagrad", large, 1), rates("tf_async", "adagrad", small, 1))


if __name__ == "__main__":
    main()
