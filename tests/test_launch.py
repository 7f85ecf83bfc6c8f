"""python -m tf_async.launch: roles, log streaming, exit codes, cleanup."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tf_async import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TF_CONFIG", None)
    return env


def _run_launcher(args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "tf_async.launch", *args],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


def _started_pids(output):
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"\[launch\] started (\w+ \d+) pid=(\d+)", output)}


def _assert_all_gone(pids):
    for name, pid in pids.items():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"{name} (pid {pid}) still running")


def _script(tmp_path, body):
    path = tmp_path / "task.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_build_cluster_validation():
    with pytest.raises(ValueError, match="--workers"):
        launch.build_cluster(0, 0)
    with pytest.raises(ValueError, match="--ps"):
        launch.build_cluster(1, -1)
    cluster = launch.build_cluster(2, 1)
    assert set(cluster) == {"chief", "worker", "ps"}  # chief implied by --ps
    assert len(cluster["worker"]) == 2 and len(cluster["ps"]) == 1
    assert set(launch.build_cluster(2, 0)) == {"worker"}
    assert set(launch.build_cluster(2, 0, chief=True)) == {"chief", "worker"}


def test_each_task_gets_its_tf_config_and_prefixed_logs(tmp_path):
    script = _script(tmp_path, f"""
        import json, os, pathlib, time
        config = json.loads(os.environ["TF_CONFIG"])
        print("role", config["task"]["type"], config["task"]["index"],
              os.environ["TF_ASYNC_TASK"], json.dumps(config["cluster"], sort_keys=True),
              flush=True)
        done = pathlib.Path({str(tmp_path)!r})
        (done / os.environ["TF_ASYNC_TASK"].replace(":", "_")).touch()
        if config["task"]["type"] == "chief":  # the chief's end stops the others: wait
            deadline = time.monotonic() + 60
            while len(list(done.glob("worker_*"))) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
    """)
    result = _run_launcher(["--workers", "2", "--chief", "--", script])
    assert result.returncode == 0, result.stdout + result.stderr
    roles = re.findall(r"^\[(\w+ \d)\] role (\w+) (\d) (\w+:\d) (.*)$", result.stdout, re.M)
    assert sorted((r[0], r[1], r[2], r[3]) for r in roles) == [
        ("chief 0", "chief", "0", "chief:0"),
        ("worker 0", "worker", "0", "worker:0"),
        ("worker 1", "worker", "1", "worker:1"),
    ]
    clusters = {r[4] for r in roles}
    assert len(clusters) == 1  # every task sees the same cluster
    assert set(json.loads(clusters.pop())) == {"chief", "worker"}


def test_chief_exit_code_is_returned_and_servers_are_stopped(tmp_path):
    script = _script(tmp_path, """
        import os, sys, time
        if os.environ["TF_ASYNC_TASK"].startswith("chief"):
            sys.exit(7)
        time.sleep(600)
    """)
    start = time.monotonic()
    result = _run_launcher(["--workers", "2", "--chief", "--", script])
    assert result.returncode == 7, result.stdout
    assert time.monotonic() - start < 60
    _assert_all_gone(_started_pids(result.stdout))


def test_crashed_worker_stops_the_cluster(tmp_path):
    script = _script(tmp_path, """
        import os, sys, time
        if os.environ["TF_ASYNC_TASK"] == "worker:1":
            sys.exit(3)
        time.sleep(600)
    """)
    result = _run_launcher(["--workers", "2", "--chief", "--", script])
    assert result.returncode == 3, result.stdout
    assert "worker 1 failed: stopping all tasks" in result.stdout
    _assert_all_gone(_started_pids(result.stdout))


def test_keep_going_survives_a_crashed_worker(tmp_path):
    script = _script(tmp_path, """
        import os, sys, time
        task = os.environ["TF_ASYNC_TASK"]
        if task == "worker:1":
            sys.exit(3)
        if task.startswith("chief"):
            time.sleep(2)
            print("chief done")
            sys.exit(0)
        time.sleep(600)
    """)
    result = _run_launcher(["--workers", "2", "--chief", "--keep_going", "--", script])
    assert result.returncode == 0, result.stdout
    assert "[chief 0] chief done" in result.stdout
    assert "worker 1 exited with code 3" in result.stdout
    _assert_all_gone(_started_pids(result.stdout))


def test_ctrl_c_stops_every_task(tmp_path):
    script = _script(tmp_path, """
        import time
        print("up", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tf_async.launch", "--workers", "2", "--ps", "1", "--", script],
        env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum("] up" in l for l in lines) < 4:
        lines.append(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    output = "".join(lines) + out
    assert proc.returncode == 128 + signal.SIGINT, output
    assert "interrupted" in output
    pids = _started_pids(output)
    assert len(pids) == 4  # chief, 2 workers, 1 ps
    _assert_all_gone(pids)


def test_cli_rejects_bad_arguments(tmp_path):
    result = _run_launcher(["--workers", "0", "--", "x.py"])
    assert result.returncode == 2 and "--workers` must be >= 1" in result.stderr
    result = _run_launcher(["--workers", "1", "--", str(tmp_path / "missing.py")])
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = _run_launcher(["--workers", "1"])
    assert result.returncode == 2 and "No script given" in result.stderr
    result = _run_launcher(["--workers", "2", "--link_latency_ms", "-1", "--", "x.py"])
    assert result.returncode == 2 and "`--link_latency_ms` must be a number in [0, 10000]" \
        in result.stderr
    result = _run_launcher(["--workers", "2", "--link_mbit", "0", "--", "x.py"])
    assert result.returncode == 2 and "`--link_mbit` must be a number in (0, 1e6]" in result.stderr


PS_TRAINING_SCRIPT = """
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from tf_async import cluster
cluster.serve_forever_if_server_task()  # workers and ps serve; only the chief continues

import tensorflow as tf
resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(strategy)
with strategy.scope():
    w = tf.Variable(0.0)
    steps = tf.Variable(0, dtype=tf.int64)

@tf.function
def step():
    def replica_fn():
        w.assign_add(0.5)
        steps.assign_add(1)
    strategy.run(replica_fn)

for _ in range(30):
    coordinator.schedule(step)
coordinator.join()
print("steps", int(steps.numpy()), "w", float(w.numpy()), "on", w.device, flush=True)
"""


@pytest.mark.slow
def test_parameter_server_cluster_as_real_processes(tmp_path):
    script = _script(tmp_path, PS_TRAINING_SCRIPT)
    result = _run_launcher(["--workers", "2", "--ps", "1", "--", script], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\[chief 0\] steps 30 w 15.0 on /job:ps", result.stdout), result.stdout
    pids = _started_pids(result.stdout)
    assert set(pids) == {"chief 0", "worker 0", "worker 1", "ps 0"}
    # Servers end through SIGTERM with a clean exit code 0.
    final = re.search(r"all tasks stopped \((.*)\)", result.stdout).group(1)
    assert final == "chief 0=0, worker 0=0, worker 1=0, ps 0=0", final
    _assert_all_gone(pids)


README_UNDER_LAUNCHER = """
import json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, {repo!r})
from tests import _doc_blocks
import tf_async.cluster

resolvers, embedded = [], tf_async.cluster.local_cluster
def local_cluster(*args, **kwargs):  # records what the README's call returns
    resolvers.append(embedded(*args, **kwargs))
    return resolvers[-1]
tf_async.cluster.local_cluster = local_cluster

_doc_blocks.run_block({code!r}, {stand_ins!r}, "README.md:{line}")
spec = resolvers[0].cluster_spec().as_dict()
print("trained on", json.dumps(spec, sort_keys=True), flush=True)
"""


@pytest.mark.slow
def test_readme_usage_under_the_launcher_trains_once_on_the_launched_cluster(tmp_path):
    """README's Usage code as train.py: its local_cluster() joins the launched cluster."""
    from tests import _doc_blocks

    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as readme:
        usage = [b for b in _doc_blocks.parse(readme.read(), "README.md").blocks
                 if "local_cluster(" in b.code]
    assert len(usage) == 1, usage
    block = usage[0]
    script = tmp_path / "train.py"
    script.write_text(README_UNDER_LAUNCHER.format(
        repo=REPO, code=block.code, stand_ins=block.stand_ins, line=block.line))
    result = _run_launcher(["--workers", "2", "--ps", "1", "--", str(script)], timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    launched = {}
    for task, address in re.findall(r"\[launch\] started (\w+) \d+ pid=\d+ at (\S+)",
                                    result.stdout):
        launched.setdefault(task, []).append(address)
    trained = re.findall(r"^\[(\w+ \d+)\] trained on (.*)$", result.stdout, re.M)
    assert [task for task, _ in trained] == ["chief 0"], output  # once, not once per process
    assert json.loads(trained[0][1]) == launched, output
    # The Usage code's own last line (the staleness lists) printed in the chief only.
    printed = re.findall(r"^\[(\w+ \d+)\] \[[0-9., ]+\] \[[0-9., ]+\]$", result.stdout, re.M)
    assert printed == ["chief 0"], output
    final = re.search(r"all tasks stopped \((.*)\)", result.stdout).group(1)
    assert final == "chief 0=0, worker 0=0, worker 1=0, ps 0=0", final
