"""Clusters on one machine: the embedded in-process cluster and TF_CONFIG helpers.

* ``local_cluster(workers=2, ps=1)`` starts ``tf.distribute.Server``s for the
  worker and parameter-server tasks inside this process, on loopback ports, and
  returns a ``tf.distribute.cluster_resolver.ClusterResolver`` whose chief is
  this process. It is the default cluster of every example and test. Under
  ``TF_CONFIG`` (a script run by ``python -m tf_async.launch``) it joins that
  cluster instead: worker/ps tasks serve, the chief gets the
  ``TFConfigClusterResolver`` (``_join_tf_config_cluster``).
* ``make_tf_config`` / ``parse_tf_config`` build and validate ``TF_CONFIG``
  (used by ``python -m tf_async.launch``).
* ``serve_forever_if_server_task()`` is what a script run by the launcher
  calls first: in a ``worker``/``ps`` task of a parameter-server cluster it
  starts the task's server and never returns.

A process that connected to a cluster (ParameterServerStrategy sets a remote
eager context) cannot disconnect; run each cluster in a fresh process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence

if TYPE_CHECKING:  # TensorFlow is imported lazily: the launcher must stay light.
    import tensorflow as tf

__all__ = [
    "local_cluster",
    "pick_unused_port",
    "pick_unused_ports",
    "check_task_counts",
    "check_port_free",
    "make_tf_config",
    "parse_tf_config",
    "serve_forever_if_server_task",
]

LOOPBACK = "localhost"

# Servers of local clusters must outlive the resolver objects users may drop;
# TF gives no way to stop an in-process server, so they live with the process.
_LIVE_SERVERS: List["tf.distribute.Server"] = []


def pick_unused_port() -> int:
    """A TCP port that is free on loopback right now (kernel-assigned)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_port_free(port: int, argument: str = "port") -> None:
    """Raises ``ValueError`` naming ``argument`` if ``port`` is taken or invalid."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"`{argument}` must be an int, got {port!r}.")
    if not 1 <= port <= 65535:
        raise ValueError(f"`{argument}` must be in [1, 65535], got {port}.")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as error:
            raise ValueError(
                f"`{argument}`={port} is already in use on localhost ({error}). "
                "Pick another port or leave it unset to choose free ones."
            ) from None


def check_task_counts(workers: int, ps: int, flag_prefix: str = "") -> None:
    """``ValueError``/``TypeError`` naming ``{flag_prefix}workers`` / ``ps``."""
    for name, value, low in (("workers", workers, 1), ("ps", ps, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{flag_prefix}{name}` must be an int, got {value!r}.")
        if value < low:
            raise ValueError(f"`{flag_prefix}{name}` must be >= {low}, got {value}.")


def pick_unused_ports(count: int) -> List[int]:
    """``count`` distinct ports free on loopback right now."""
    chosen: List[int] = []
    while len(chosen) < count:
        port = pick_unused_port()
        if port not in chosen:
            chosen.append(port)
    return chosen


def _ports(count: int, ports: Optional[Sequence[int]], argument: str) -> List[int]:
    if ports is None:
        return pick_unused_ports(count)
    ports = list(ports)
    if len(ports) != count:
        raise ValueError(f"`{argument}` must list {count} ports, got {len(ports)}.")
    if len(set(ports)) != len(ports):
        raise ValueError(f"`{argument}` has duplicate ports: {ports}.")
    for port in ports:
        check_port_free(port, argument)
    return ports


def local_cluster(
    workers: int = 2,
    ps: int = 1,
    *,
    worker_ports: Optional[Sequence[int]] = None,
    ps_ports: Optional[Sequence[int]] = None,
    worker_inter_op_threads: Optional[int] = None,
    intra_op_threads: Optional[int] = None,
    private_network: bool = False,
) -> "tf.distribute.cluster_resolver.ClusterResolver":
    """Starts an in-process cluster on localhost; returns its resolver.

    This process is the ``chief`` (coordinator); ``workers`` worker servers and
    ``ps`` parameter-server servers run inside it. The tasks share this
    machine's cores, so each server gets its share of them for intra-op
    parallelism and its threads do not spin while idle (a spinning thread of
    one task takes cycles from the others).

    Under ``TF_CONFIG`` (e.g. the script runs under ``python -m
    tf_async.launch``) no servers start here: the call joins the configured
    cluster, so the same script trains once on the launched cluster instead of
    once per process. In a ``worker``/``ps`` task it serves that task and never
    returns (``serve_forever_if_server_task``); in the ``chief`` it returns a
    ``TFConfigClusterResolver``. ``workers``/``ps`` (and ports, if given) must
    match ``TF_CONFIG``; the thread arguments apply to the task's server.

    Args:
      workers: number of worker tasks, >= 1.
      ps: number of parameter-server tasks, >= 0 (0 gives a worker-only
        cluster, e.g. for inspection; parameter-server strategies need >= 1).
      worker_ports / ps_ports: explicit ports (default: free ones).
      worker_inter_op_threads: inter-op threads of each worker server. The
        default ``workers + 1`` keeps scheduled steps from deadlocking on
        small (2-core) machines.
      intra_op_threads: intra-op threads of each server; default: the CPU
        count divided by the number of tasks, at least 1.
      private_network: first move this process into a network namespace of
        its own whose only interface is loopback (Linux, as root), so the
        servers — which TensorFlow binds to all interfaces, without
        authentication — are reachable from this process only. It changes
        the rest of the process too: from then on no thread started by it
        reaches any other host or the machine's other interfaces (no
        downloads, no remote TensorBoard/profiler clients; files and the
        clusters' localhost traffic are unaffected). Where it is not possible
        (not root, not Linux) one warning says so and the cluster runs on the
        host network. Idempotent within a process. Under ``TF_CONFIG`` it
        has no effect: the launcher decides the cluster's network
        (``python -m tf_async.launch --network``, private by default).

    Returns:
      A ``SimpleClusterResolver`` (rpc_layer ``grpc``) for
      ``ParameterServerStrategy`` / ``AsyncParameterServerStrategy``; under
      ``TF_CONFIG``, in the chief, a ``TFConfigClusterResolver``.

    Raises:
      ValueError: workers < 1, ps < 0, a port in use, wrong number of ports;
        under TF_CONFIG: counts or ports that differ from it, or a task type
        that cannot join a parameter-server cluster this way.
      TypeError: ``private_network`` not a bool.
    """
    import tensorflow as tf

    check_task_counts(workers, ps)
    if not isinstance(private_network, bool):
        raise TypeError(f"`private_network` must be a bool, got {private_network!r}.")
    for name, value in (("worker_inter_op_threads", worker_inter_op_threads),
                        ("intra_op_threads", intra_op_threads)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
    if os.environ.get("TF_CONFIG"):
        return _join_tf_config_cluster(
            workers, ps, worker_ports, ps_ports, worker_inter_op_threads, intra_op_threads
        )
    if worker_inter_op_threads is None:
        worker_inter_op_threads = workers + 1
    if intra_op_threads is None:
        intra_op_threads = max(1, (os.cpu_count() or 1) // (workers + ps))
    if private_network:
        isolate_this_process()
    worker_addresses = [
        f"{LOOPBACK}:{p}" for p in _ports(workers, worker_ports, "worker_ports")
    ]
    ps_addresses = [f"{LOOPBACK}:{p}" for p in _ports(ps, ps_ports, "ps_ports")]
    cluster_dict: Dict[str, List[str]] = {"worker": worker_addresses}
    if ps:
        cluster_dict["ps"] = ps_addresses
    cluster_spec = tf.train.ClusterSpec(cluster_dict)

    ps_config = tf.compat.v1.ConfigProto()
    ps_config.intra_op_parallelism_threads = intra_op_threads
    ps_config.experimental.disable_thread_spinning = True
    worker_config = tf.compat.v1.ConfigProto()
    worker_config.CopyFrom(ps_config)
    worker_config.inter_op_parallelism_threads = worker_inter_op_threads
    for index in range(workers):
        _LIVE_SERVERS.append(
            tf.distribute.Server(
                cluster_spec,
                job_name="worker",
                task_index=index,
                config=worker_config,
                protocol="grpc",
            )
        )
    for index in range(ps):
        _LIVE_SERVERS.append(
            tf.distribute.Server(
                cluster_spec,
                job_name="ps",
                task_index=index,
                config=ps_config,
                protocol="grpc",
            )
        )
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        cluster_spec, rpc_layer="grpc"
    )


_ISOLATED: List[str] = []  # the private namespace this process moved to, if any


def isolate_this_process() -> bool:
    """Moves this process (the calling thread and every thread it starts
    later) into a private, loopback-only network namespace, once; returns
    whether it is in one. Threads that already exist keep the host network
    (TensorFlow's gRPC threads start with the first server or connection)."""
    import warnings

    from tf_async import _netns

    if _ISOLATED:
        return _ISOLATED[0] == _netns.namespace_id("thread-self")
    try:
        if _thread_count() > 1:
            # unshare(CLONE_NEWUSER) needs one thread: only root can do this.
            if os.geteuid() != 0:
                raise _netns.IsolationError(1, "not root (a multi-threaded process can "
                                               "only get a user namespace when it starts)")
        _netns.isolate()
    except _netns.IsolationError as error:
        warnings.warn(
            f"local_cluster(private_network=True): no private network ({error.strerror}); "
            "the servers listen on all interfaces of this machine.",
            RuntimeWarning, stacklevel=3,
        )
        _ISOLATED.append("")
        return False
    _ISOLATED.append(_netns.namespace_id("thread-self"))
    return True


def _thread_count() -> int:
    """OS threads of this process."""
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1


# ---------------------------------------------------------------- TF_CONFIG

_TASK_TYPES = ("chief", "worker", "ps", "evaluator")


def make_tf_config(
    cluster: Mapping[str, Sequence[str]], task_type: str, task_index: int
) -> str:
    """JSON ``TF_CONFIG`` for one task of ``cluster`` (validated)."""
    config = {
        "cluster": {k: list(v) for k, v in cluster.items()},
        "task": {"type": task_type, "index": task_index},
    }
    text = json.dumps(config)
    parse_tf_config(text)
    return text


def parse_tf_config(text: Optional[str] = None) -> dict:
    """Parses and validates ``TF_CONFIG`` (default: the environment's).

    Raises ``ValueError`` naming what is wrong: not JSON, no ``cluster``,
    unknown task type, task index out of range, malformed address.
    """
    if text is None:
        text = os.environ.get("TF_CONFIG", "")
    if not text:
        raise ValueError("TF_CONFIG is not set or empty.")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError("TF_CONFIG must be a JSON object with 'cluster' and 'task'.")
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise ValueError("TF_CONFIG['cluster'] must be a non-empty object of job -> addresses.")
    for job, addresses in cluster.items():
        if job not in _TASK_TYPES:
            raise ValueError(
                f"TF_CONFIG['cluster'] has unknown job {job!r}; allowed: {_TASK_TYPES}."
            )
        if not isinstance(addresses, list) or not addresses:
            raise ValueError(f"TF_CONFIG['cluster'][{job!r}] must be a non-empty list.")
        for address in addresses:
            host, sep, port = str(address).rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(
                    f"TF_CONFIG['cluster'][{job!r}] has malformed address {address!r}; "
                    "expected 'host:port'."
                )
    if "chief" in cluster and len(cluster["chief"]) != 1:
        raise ValueError("TF_CONFIG['cluster']['chief'] must have exactly one address.")
    task = config.get("task")
    if not isinstance(task, dict):
        raise ValueError("TF_CONFIG['task'] must be an object with 'type' and 'index'.")
    task_type, index = task.get("type"), task.get("index", 0)
    if task_type not in cluster:
        raise ValueError(
            f"TF_CONFIG['task']['type']={task_type!r} is not a job of the cluster "
            f"({sorted(cluster)})."
        )
    if not isinstance(index, int) or not 0 <= index < len(cluster[task_type]):
        raise ValueError(
            f"TF_CONFIG['task']['index']={index!r} must be in "
            f"[0, {len(cluster[task_type]) - 1}] for job {task_type!r}."
        )
    return config


def serve_forever_if_server_task(protocol: str = "grpc") -> None:
    """In a ``worker``/``ps`` task of a parameter-server cluster: serve, never return.

    Reads ``TF_CONFIG``. Returns immediately without ``TF_CONFIG``, in the
    chief/evaluator, and in clusters without ``ps`` (MultiWorkerMirrored
    workers run the training script themselves). The server stops when the
    process receives SIGTERM/SIGINT (exit code 0), which is how
    ``python -m tf_async.launch`` ends its tasks.
    """
    if not os.environ.get("TF_CONFIG"):
        return
    config = parse_tf_config()
    if "ps" in config["cluster"] and config["task"]["type"] in ("worker", "ps"):
        _serve_forever(config, protocol)


def _serve_forever(
    config: dict,
    protocol: str = "grpc",
    inter_op_threads: Optional[int] = None,
    intra_op_threads: Optional[int] = None,
) -> None:
    """Starts the server of ``config``'s worker/ps task; waits for SIGTERM/SIGINT.

    Worker servers get ``workers + 1`` inter-op threads unless
    ``inter_op_threads`` says otherwise (as ``local_cluster``'s do).
    """
    import tensorflow as tf

    task_type = config["task"]["type"]
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    server_config = tf.compat.v1.ConfigProto()
    if task_type == "worker":
        server_config.inter_op_parallelism_threads = inter_op_threads or (
            len(config["cluster"]["worker"]) + 1
        )
    if intra_op_threads is not None:
        server_config.intra_op_parallelism_threads = intra_op_threads
    tf.distribute.Server(
        resolver.cluster_spec(),
        job_name=task_type,
        task_index=config["task"].get("index", 0),
        config=server_config,
        protocol=protocol,
        start=True,
    )

    def _stop(signum, frame):  # noqa: ARG001 - signal handler signature
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while True:  # Python-level wait so signal handlers run (Server.join blocks in C++).
        time.sleep(1)


# ------------------------------------------- local_cluster() under TF_CONFIG

_TWO_LINES = (
    "tf_async.cluster.serve_forever_if_server_task(); "
    "resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()"
)


def _join_tf_config_cluster(
    workers: int,
    ps: int,
    worker_ports: Optional[Sequence[int]],
    ps_ports: Optional[Sequence[int]],
    worker_inter_op_threads: Optional[int],
    intra_op_threads: Optional[int],
) -> "tf.distribute.cluster_resolver.TFConfigClusterResolver":
    """``local_cluster(...)`` when ``TF_CONFIG`` is set: join that cluster.

    Without this, every process of ``python -m tf_async.launch -- train.py``
    would start its own embedded cluster and train alone (and exit 0). A
    worker/ps task serves and never returns; the chief gets the resolver. The
    arguments must describe the configured cluster: a mismatch is a mistake in
    the script or the launch line, so it raises instead of guessing.
    """
    import tensorflow as tf

    config = parse_tf_config()
    cluster, task_type = config["cluster"], config["task"]["type"]
    where = f"local_cluster(workers={workers}, ps={ps}) runs under TF_CONFIG"
    configured = {"workers": len(cluster.get("worker", [])), "ps": len(cluster.get("ps", []))}
    if configured != {"workers": workers, "ps": ps}:
        raise ValueError(
            f"{where}, whose cluster has {configured['workers']} worker(s) and "
            f"{configured['ps']} ps: make them match (python -m tf_async.launch "
            f"--workers {workers} --ps {ps}), or write, for any launched cluster: "
            f"{_TWO_LINES}."
        )
    for argument, job, ports in (("worker_ports", "worker", worker_ports),
                                 ("ps_ports", "ps", ps_ports)):
        configured_ports = [int(a.rpartition(":")[2]) for a in cluster.get(job, [])]
        if ports is not None and list(ports) != configured_ports:
            raise ValueError(
                f"{where}: `{argument}`={list(ports)} differs from TF_CONFIG's "
                f"{job} ports {configured_ports}; leave `{argument}` unset (the "
                "launcher chooses the ports; `--base_port` sets them)."
            )
    if ps and "chief" not in cluster:
        raise ValueError(
            f"{where}, whose cluster has no chief: parameter-server training needs "
            "one (python -m tf_async.launch adds it when --ps > 0)."
        )
    if task_type in ("worker", "ps") and ps:
        _serve_forever(config, inter_op_threads=worker_inter_op_threads,
                       intra_op_threads=intra_op_threads)  # never returns
    if task_type == "evaluator":
        raise ValueError(
            f"{where} in an evaluator task, which is no part of a parameter-server "
            "cluster's training: build its own evaluation loop with "
            "TFConfigClusterResolver()."
        )
    return tf.distribute.cluster_resolver.TFConfigClusterResolver(
        rpc_layer=config.get("rpc_layer", "grpc")
    )
