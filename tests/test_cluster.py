"""local_cluster() and the TF_CONFIG helpers."""

import json
import os
import socket

import pytest

from tf_async import cluster


def test_tf_config_round_trip():
    spec = {"chief": ["localhost:1111"], "worker": ["localhost:2222", "localhost:3333"]}
    text = cluster.make_tf_config(spec, "worker", 1)
    config = cluster.parse_tf_config(text)
    assert config["task"] == {"type": "worker", "index": 1}
    assert config["cluster"] == spec


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json", "not valid JSON"),
        ("[]", "JSON object"),
        (json.dumps({"task": {"type": "worker", "index": 0}}), "cluster"),
        (json.dumps({"cluster": {"boss": ["h:1"]}, "task": {"type": "boss"}}), "unknown job"),
        (json.dumps({"cluster": {"worker": ["nohostport"]}, "task": {"type": "worker"}}), "malformed address"),
        (json.dumps({"cluster": {"worker": ["h:1"]}, "task": {"type": "ps", "index": 0}}), "not a job"),
        (json.dumps({"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 3}}), r"\[0, 0\]"),
        (json.dumps({"cluster": {"worker": ["h:1"], "chief": ["h:2", "h:3"]}, "task": {"type": "worker"}}), "exactly one"),
    ],
)
def test_malformed_tf_config_raises_value_error(text, message):
    with pytest.raises(ValueError, match=message):
        cluster.parse_tf_config(text)


def test_unset_tf_config_raises(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="not set"):
        cluster.parse_tf_config()


@pytest.mark.parametrize("kwargs, message", [
    ({"workers": 0}, "`workers` must be >= 1"),
    ({"workers": 1, "ps": -1}, "`ps` must be >= 0"),
    ({"workers": 1, "ps": 1, "worker_inter_op_threads": 0}, "worker_inter_op_threads"),
    ({"workers": 1, "ps": 1, "worker_inter_op_threads": 2.5},
     "`worker_inter_op_threads` must be an int >= 1"),
    ({"workers": 1, "ps": 1, "intra_op_threads": 0}, "`intra_op_threads` must be an int >= 1"),
    ({"workers": 1, "ps": 1, "intra_op_threads": 1.5}, "`intra_op_threads` must be an int"),
    ({"workers": 1, "ps": 1, "intra_op_threads": True}, "`intra_op_threads` must be an int"),
    ({"workers": 2, "ps": 0, "worker_ports": [5000]}, "must list 2 ports"),
])
def test_local_cluster_bad_counts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cluster.local_cluster(**kwargs)


def test_local_cluster_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"`ps_ports`={port} is already in use"):
            cluster.local_cluster(workers=1, ps=1, ps_ports=[port])


def _train_on_local_cluster(workers, ps, steps):
    """Child process: raw TF parameter-server training on local_cluster()."""
    import tensorflow as tf

    from tf_async import cluster as cluster_module

    resolver = cluster_module.local_cluster(workers=workers, ps=ps)
    spec = resolver.cluster_spec().as_dict()
    strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
    coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
        w = tf.Variable(0.0)
        counter = tf.Variable(0, dtype=tf.int64)

    @tf.function
    def step():
        def replica_fn():
            w.assign_add(1.0)
            counter.assign_add(1)

        strategy.run(replica_fn)

    for _ in range(steps):
        coordinator.schedule(step)
    coordinator.join()
    configs = {
        server.server_def.job_name: server.server_def.default_session_config
        for server in cluster_module._LIVE_SERVERS
    }
    return {
        "spec": spec,
        "counter": int(counter.numpy()),
        "w_device": w.device,
        "threads": {
            job: (c.inter_op_parallelism_threads, c.intra_op_parallelism_threads,
                  c.experimental.disable_thread_spinning)
            for job, c in configs.items()
        },
    }


@pytest.mark.slow
def test_local_cluster_trains_with_parameter_server_strategy(fresh_process):
    result = fresh_process(_train_on_local_cluster, 2, 1, 20, timeout=300)
    assert len(result["spec"]["worker"]) == 2 and len(result["spec"]["ps"]) == 1
    assert all(a.startswith("localhost:") for a in result["spec"]["worker"])
    assert result["counter"] == 20
    assert "/job:ps" in result["w_device"]
    # Tasks share the cores: workers + 1 inter-op threads, a share of the
    # cores each for intra-op, no spinning.
    share = max(1, (os.cpu_count() or 1) // 3)
    assert result["threads"]["worker"] == (3, share, True)
    assert result["threads"]["ps"] == (0, share, True)


# ------------------------------------------- local_cluster() under TF_CONFIG
# A script run by `python -m tf_async.launch` that calls local_cluster() joins
# the launched cluster instead of training alone in every process.

LAUNCHED = {"chief": ["localhost:1111"], "worker": ["localhost:2222", "localhost:3333"],
            "ps": ["localhost:4444"]}


def _launched_task(monkeypatch, task_type, index=0, spec=LAUNCHED):
    monkeypatch.setenv("TF_CONFIG", cluster.make_tf_config(spec, task_type, index))


def test_local_cluster_in_the_launched_chief_returns_its_resolver(monkeypatch):
    import tensorflow as tf

    _launched_task(monkeypatch, "chief")
    servers = len(cluster._LIVE_SERVERS)
    resolver = cluster.local_cluster(workers=2, ps=1)
    assert isinstance(resolver, tf.distribute.cluster_resolver.TFConfigClusterResolver)
    assert resolver.cluster_spec().as_dict() == LAUNCHED
    assert resolver.rpc_layer == "grpc"
    assert len(cluster._LIVE_SERVERS) == servers  # no embedded servers started


class _Served(Exception):
    pass


@pytest.mark.parametrize("task_type, index", [("worker", 1), ("ps", 0)])
def test_local_cluster_in_a_launched_server_task_serves_it(monkeypatch, task_type, index):
    calls = []

    def serve(config, **threads):
        calls.append((config["task"], threads))
        raise _Served  # the real one never returns

    monkeypatch.setattr(cluster, "_serve_forever", serve)
    _launched_task(monkeypatch, task_type, index)
    with pytest.raises(_Served):
        cluster.local_cluster(workers=2, ps=1, intra_op_threads=1)
    assert calls == [({"type": task_type, "index": index},
                      {"inter_op_threads": None, "intra_op_threads": 1})]


@pytest.mark.parametrize("task_type, kwargs, message", [
    ("chief", {"workers": 3, "ps": 1},
     r"local_cluster\(workers=3, ps=1\) runs under TF_CONFIG, whose cluster has 2 worker"),
    ("worker", {"workers": 2, "ps": 2}, r"--workers 2 --ps 2"),
    ("chief", {"workers": 2, "ps": 1, "worker_ports": [2222, 9999]},
     r"`worker_ports`=\[2222, 9999\] differs from TF_CONFIG's worker ports \[2222, 3333\]"),
    ("chief", {"workers": 2, "ps": 1, "ps_ports": [5555]}, r"`ps_ports`"),
    ("evaluator", {"workers": 2, "ps": 1}, r"evaluator task"),
])
def test_local_cluster_under_tf_config_rejects_what_does_not_match(
        monkeypatch, task_type, kwargs, message):
    spec = dict(LAUNCHED, evaluator=["localhost:5555"])
    _launched_task(monkeypatch, task_type, spec=spec)
    with pytest.raises(ValueError, match=message):
        cluster.local_cluster(**kwargs)


def test_task_count_mismatch_under_tf_config_says_what_to_write(monkeypatch):
    _launched_task(monkeypatch, "chief")
    with pytest.raises(ValueError) as error:
        cluster.local_cluster(workers=4, ps=1)
    assert ("tf_async.cluster.serve_forever_if_server_task(); resolver = "
            "tf.distribute.cluster_resolver.TFConfigClusterResolver()") in str(error.value)


def test_local_cluster_under_tf_config_without_a_chief(monkeypatch):
    spec = {"worker": ["localhost:2222"], "ps": ["localhost:4444"]}
    _launched_task(monkeypatch, "worker", spec=spec)
    with pytest.raises(ValueError, match="no chief"):
        cluster.local_cluster(workers=1, ps=1)


def test_matching_ports_under_tf_config_are_accepted(monkeypatch):
    _launched_task(monkeypatch, "chief")
    resolver = cluster.local_cluster(workers=2, ps=1, worker_ports=[2222, 3333],
                                     ps_ports=[4444])
    assert resolver.cluster_spec().as_dict() == LAUNCHED
