"""Private cluster networks: ``python -m tf_async.launch`` (default) and
``local_cluster(private_network=True)`` run in a network namespace of their own
whose only interface is loopback.

These tests inspect namespaces only (``/proc/<pid>/ns/net``,
``/proc/self/net/dev``); nothing is sent beyond loopback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from tf_async import _netns, launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER_NAMESPACE = _netns.namespace_id()


def _can_isolate() -> bool:
    probe = subprocess.run(_netns.command(sys.executable, "hold"), input="",
                           capture_output=True, text=True, timeout=60)
    return probe.stdout.startswith("ready")


needs_namespaces = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _can_isolate(),
    reason="this OS allows no network namespace here (not root, no user namespaces)",
)

TASK = textwrap.dedent("""
    import os, pathlib, time
    from tf_async import _netns
    print("namespace", _netns.namespace_id(), "interfaces", ",".join(_netns.interfaces()),
          flush=True)
    done = pathlib.Path(os.environ["DONE_DIR"])
    (done / os.environ["TF_ASYNC_TASK"].replace(":", "_")).touch()
    if os.environ["TF_ASYNC_TASK"].startswith("chief"):
        # The chief's end stops the others: wait until they have printed.
        deadline = time.monotonic() + 90
        while len(list(done.iterdir())) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        time.sleep(120)
""")


def _launch(tmp_path, *flags):
    script = tmp_path / "task.py"
    script.write_text(TASK)
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TF_CONFIG", None)
    done = tmp_path / "done"
    done.mkdir()
    env["DONE_DIR"] = str(done)
    result = subprocess.run(
        [sys.executable, "-m", "tf_async.launch", "--workers", "2", "--ps", "1", *flags,
         "--", str(script)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    seen = dict(re.findall(r"^\[(\w+ \d)\] namespace (\S+) interfaces", result.stdout, re.M))
    interfaces = set(re.findall(r"interfaces (\S+)$", result.stdout, re.M))
    assert set(seen) == {"chief 0", "worker 0", "worker 1", "ps 0"}, result.stdout
    return seen, interfaces, result.stdout


@needs_namespaces
def test_launch_runs_every_task_in_one_private_loopback_namespace(tmp_path):
    seen, interfaces, out = _launch(tmp_path)
    namespaces = set(seen.values())
    assert len(namespaces) == 1, seen  # one namespace shared by the cluster
    assert namespaces != {LAUNCHER_NAMESPACE}
    assert interfaces == {"lo"}, interfaces
    assert f"private cluster network {namespaces.pop()} (only lo)" in out
    assert "warning" not in out


def test_network_host_opts_out(tmp_path):
    seen, _, out = _launch(tmp_path, "--network=host")
    assert set(seen.values()) == {LAUNCHER_NAMESPACE}, seen
    assert "private cluster network" not in out and "warning" not in out


def test_launch_warns_in_one_line_where_isolation_is_impossible(tmp_path):
    fake_python = tmp_path / "python"  # a holder the OS refused
    fake_python.write_text("#!/bin/sh\necho 'unavailable Operation not permitted'\n")
    fake_python.chmod(0o755)
    network, warning = launch.open_cluster_network("private", python=str(fake_python))
    assert not network.private
    assert warning.count("\n") == 0 and warning.startswith("[launch] warning:")
    assert "Operation not permitted" in warning and "all interfaces" in warning
    network, warning = launch.open_cluster_network("host")
    assert not network.private and warning is None
    with pytest.raises(ValueError, match=r"`--network` must be one of \('private', 'host'\)"):
        launch.launch(["x.py"], workers=1, network="bridge")


def test_holder_reports_why_isolation_failed(monkeypatch, capsys):
    def refuse():
        raise _netns.IsolationError(1, "not root, and no unprivileged user namespace")

    monkeypatch.setattr(_netns, "isolate", refuse)
    assert _netns._main(["hold"]) == 1
    assert capsys.readouterr().out == "unavailable not root, and no unprivileged user namespace\n"


def _listening_ports(pid) -> set:
    """TCP ports in LISTEN state in ``pid``'s network namespace (read from
    ``/proc/<pid>/net/tcp{,6}``: inspection only, nothing is sent)."""
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.readlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _child_local_cluster_namespace(parent_namespace):
    import numpy as np

    import keras
    import tensorflow as tf
    import tf_async

    tf.constant(1.0) + 1.0  # TensorFlow's thread pools exist before the cluster
    resolver = tf_async.local_cluster(workers=1, ps=1, private_network=True)
    ports = {int(address.rsplit(":", 1)[1])
             for job in resolver.cluster_spec().as_dict().values() for address in job}
    again = tf_async.cluster.isolate_this_process()  # idempotent: same namespace
    strategy = tf_async.strategies.AsyncParameterServerStrategy(resolver)
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    x = np.ones((32, 4), "float32")
    model.fit(x, x[:, :1], batch_size=8, epochs=1, verbose=0)
    return {
        "namespace": _netns.namespace_id(),
        "parent": parent_namespace,
        "interfaces": _netns.interfaces(),
        "again": again,
        "iterations": int(model.optimizer.iterations.numpy()),
        "ports": ports,
        "listening_here": _listening_ports("self"),
        "listening_in_parent": _listening_ports(os.getppid()),
    }


@pytest.mark.slow
@needs_namespaces
@pytest.mark.skipif(os.geteuid() != 0, reason="a multi-threaded process needs root")
def test_local_cluster_private_network(fresh_process):
    r = fresh_process(_child_local_cluster_namespace, LAUNCHER_NAMESPACE, timeout=300)
    assert r["namespace"] != r["parent"]
    assert r["interfaces"] == ["lo"]
    assert r["again"] is True
    assert r["iterations"] == 4  # the cluster trains inside the namespace
    # The servers listen inside the private namespace, not on the host's.
    assert r["ports"] <= r["listening_here"], (r["ports"], r["listening_here"])
    assert not r["ports"] & r["listening_in_parent"], r["listening_in_parent"]


def test_local_cluster_private_network_must_be_bool():
    from tf_async import cluster

    with pytest.raises(TypeError, match="`private_network` must be a bool"):
        cluster.local_cluster(workers=1, ps=1, private_network="yes")
