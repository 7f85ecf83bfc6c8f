"""Run a training script as a multi-process cluster on localhost.

    python -m tf_async.launch --workers 2 --ps 1 -- train.py --epochs 3
    python -m tf_async.launch --workers 2 --ps 0 -- -m my_package.train

One OS process per task (chief, workers, parameter servers), each with its own
``TF_CONFIG`` and ``TF_ASYNC_TASK=<type>:<index>``. All run the same script:
a parameter-server script calls
``tf_async.cluster.serve_forever_if_server_task()`` first, so its worker/ps
tasks become servers and only the chief trains; MultiWorkerMirrored scripts
train in every worker. Output is streamed with a ``[type index]`` prefix.

The launcher returns the chief's exit code (the chief is the ``chief`` task,
or worker 0 when there is none; a chief is added automatically when ``--ps``
> 0 because parameter-server training needs a coordinator). It terminates
every task it started when the chief ends, on Ctrl-C/SIGTERM, and when any
task fails, unless ``--keep_going`` (fault-tolerance runs: a lost worker is
expected and the chief carries on).

Private network (default, ``--network=private``): every process of the
cluster runs in one Linux network namespace whose only interface is loopback
(:mod:`tf_async._netns`), so TensorFlow's unauthenticated gRPC servers, which
listen on all interfaces, are reachable from nowhere but the cluster itself.
It needs root or unprivileged user namespaces; where neither is available the
launcher says so in one warning line and uses the host network.
``--network=host`` opts out (a cluster that must talk to other machines).
Every process started for the cluster goes through
:func:`start_in_cluster_network`.

Slow link (``--link_latency_ms MS``, ``--link_mbit MBIT``): a throttling TCP
relay (:mod:`tf_async._relay`) runs in the cluster's network with one port per
ordered pair of tasks; each task's ``TF_CONFIG`` lists its own address and its
peers at the relay's ports for it, so every cross-task connection pays the
one-way latency and per-direction bandwidth a WAN would. The relay stops with
the launch and prints the link it measured (``[launch] relay-stats [...]``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, TextIO

from tf_async.cluster import (
    check_port_free,
    check_task_counts,
    make_tf_config,
    pick_unused_ports,
)

__all__ = [
    "ClusterNetwork", "NETWORKS", "Task", "build_cluster", "launch", "main",
    "open_cluster_network", "start_in_cluster_network",
]

_TERMINATE_GRACE_SECONDS = 10.0
NETWORKS = ("private", "host")


@dataclass
class Task:
    """One process of the launched cluster."""

    task_type: str
    index: int
    address: str
    process: Optional[subprocess.Popen] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.task_type} {self.index}"


def build_cluster(
    workers: int, ps: int, chief: bool = False, base_port: Optional[int] = None
) -> Dict[str, List[str]]:
    """Cluster dict {job: ["localhost:port", ...]} with validated counts/ports."""
    check_task_counts(workers, ps, flag_prefix="--")
    chief = chief or ps > 0
    count = workers + ps + int(chief)
    if base_port is None:
        ports = pick_unused_ports(count)
    else:
        if base_port + count - 1 > 65535:
            raise ValueError(
                f"`--base_port`={base_port} leaves no room for {count} ports."
            )
        ports = list(range(base_port, base_port + count))
        for port in ports:
            check_port_free(port, "--base_port")
    addresses = [f"localhost:{p}" for p in ports]
    cluster: Dict[str, List[str]] = {}
    if chief:
        cluster["chief"] = [addresses.pop(0)]
    cluster["worker"] = [addresses.pop(0) for _ in range(workers)]
    if ps:
        cluster["ps"] = [addresses.pop(0) for _ in range(ps)]
    return cluster


# ----------------------------------------------------- the cluster's network


@dataclass
class ClusterNetwork:
    """The network the cluster's processes run in: a private namespace held by
    ``holder`` (a ``tf_async/_netns.py hold`` process), or the host's
    (``holder is None``)."""

    holder: Optional[subprocess.Popen] = None
    namespace: str = ""  # e.g. "net:[4026532178]"; "" for the host network

    @property
    def private(self) -> bool:
        return self.holder is not None

    def close(self) -> None:
        if self.holder is not None and self.holder.poll() is None:
            self.holder.stdin.close()  # the holder exits when stdin closes
            try:
                self.holder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait()


def check_network(network) -> str:
    if network not in NETWORKS:
        raise ValueError(f"`--network` must be one of {NETWORKS}, got {network!r}.")
    return network


def open_cluster_network(network: str, python: str = sys.executable) -> tuple:
    """``(ClusterNetwork, warning)``: ``--network=private`` makes the private
    namespace (``warning`` says why not, if it cannot); ``host`` uses the host."""
    if check_network(network) == "host":
        return ClusterNetwork(), None
    from tf_async import _netns

    holder = subprocess.Popen(
        _netns.command(python, "hold"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    answer = (holder.stdout.readline() or "unavailable the namespace holder died").split()
    if answer[:1] != ["ready"]:
        holder.wait()
        reason = " ".join(answer[1:])
        return ClusterNetwork(), (
            f"[launch] warning: no private network for the cluster ({reason}): its "
            "tasks listen on all interfaces of this machine (see SECURITY in "
            "docs/clusters.md; --network=host skips this attempt)"
        )
    return ClusterNetwork(holder, os.readlink(f"/proc/{answer[1]}/ns/net")), None


def start_in_cluster_network(
    network: ClusterNetwork, argv: Sequence[str], **popen_kwargs
) -> subprocess.Popen:
    """Starts ``argv`` inside the cluster's network (``subprocess.Popen``
    arguments pass through). Every process the launcher starts for the
    cluster — its tasks and any helper serving them — starts here."""
    argv = list(argv)
    if network.private:
        from tf_async import _netns

        argv = _netns.command(sys.executable, "exec", str(network.holder.pid), "--") + argv
    return subprocess.Popen(argv, **popen_kwargs)


# ------------------------------------------------------------------ tasks


def _stream(task: Task, pipe, out: TextIO, lock: threading.Lock) -> None:
    prefix = f"[{task.name}] "
    for line in iter(pipe.readline, ""):
        with lock:
            out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            out.flush()
    pipe.close()


def _terminate(tasks: Sequence[Task]) -> None:
    alive = [t for t in tasks if t.process and t.process.poll() is None]
    for task in alive:
        try:
            os.killpg(task.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + _TERMINATE_GRACE_SECONDS
    for task in alive:
        try:
            task.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(task.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            task.process.wait()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def launch(
    command: Sequence[str],
    workers: int,
    ps: int = 0,
    chief: bool = False,
    keep_going: bool = False,
    base_port: Optional[int] = None,
    out: TextIO = sys.stdout,
    python: str = sys.executable,
    network: str = "private",
    link_latency_ms: Optional[float] = None,
    link_mbit: Optional[float] = None,
) -> int:
    """Starts the cluster, streams logs, returns the chief's exit code.

    ``link_latency_ms`` / ``link_mbit`` (either given): every cross-task
    connection goes through a throttling relay (:mod:`tf_async._relay`) with
    that one-way latency and per-direction bandwidth; its measured link is
    printed when the cluster stops (``[launch] relay-stats [...]``).
    """
    check_network(network)
    slow_link = link_latency_ms is not None or link_mbit is not None
    if slow_link:
        from tf_async import _relay

        link_latency_ms, link_mbit = _relay.check_link(
            0.0 if link_latency_ms is None else link_latency_ms, link_mbit, flag_prefix="--"
        )
    cluster = build_cluster(workers, ps, chief, base_port)
    if not command:
        raise ValueError("No script given: use `-- script.py [ARGS]` or `-- -m module`.")
    if command[0] != "-m" and not os.path.exists(command[0]):
        raise ValueError(f"Script {command[0]!r} does not exist.")
    tasks = [
        Task(job, index, address)
        for job in ("chief", "worker", "ps")
        for index, address in enumerate(cluster.get(job, []))
    ]
    chief_task = tasks[0]  # "chief" if present, else worker 0
    lock = threading.Lock()
    streams: List[threading.Thread] = []
    interrupted: List[int] = []

    def _on_signal(signum, frame):  # noqa: ARG001
        interrupted.append(signum)

    previous = {
        s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)
    }
    cluster_network = ClusterNetwork()
    relay: Optional[subprocess.Popen] = None
    try:
        cluster_network, warning = open_cluster_network(network, python)
        _report_network(cluster_network, warning, out, lock)
        views = {(t.task_type, t.index): cluster for t in tasks}
        if slow_link:
            relay, views = _start_relay(
                cluster_network, cluster, tasks, link_latency_ms, link_mbit, python, out, lock
            )
        for task in tasks:
            env = dict(os.environ)
            env["TF_CONFIG"] = make_tf_config(
                views[(task.task_type, task.index)], task.task_type, task.index
            )
            env["TF_ASYNC_TASK"] = f"{task.task_type}:{task.index}"
            env["PYTHONUNBUFFERED"] = "1"
            task.process = start_in_cluster_network(
                cluster_network,
                [python, *command],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,  # own process group: killpg reaches its children
            )
            with lock:
                out.write(
                    f"[launch] started {task.name} pid={task.process.pid} "
                    f"at {task.address}\n"
                )
                out.flush()
            thread = threading.Thread(
                target=_stream, args=(task, task.process.stdout, out, lock), daemon=True
            )
            thread.start()
            streams.append(thread)

        result: Optional[int] = None
        reported = set()
        while result is None:
            if interrupted:
                with lock:
                    out.write("[launch] interrupted: stopping all tasks\n")
                result = 128 + interrupted[0]
                break
            code = chief_task.process.poll()
            if code is not None:
                result = _exit_code(code)
                break
            for task in tasks[1:]:
                code = task.process.poll()
                if code is None or task.name in reported:
                    continue
                reported.add(task.name)
                with lock:
                    out.write(f"[launch] {task.name} exited with code {code}\n")
                if code != 0 and not keep_going:
                    with lock:
                        out.write(
                            f"[launch] {task.name} failed: stopping all tasks "
                            "(pass --keep_going to continue without it)\n"
                        )
                    result = _exit_code(code) or 1
                    break
            time.sleep(0.05)
        return result
    finally:
        _terminate(tasks)
        if relay is not None:
            _stop_relay(relay, out, lock)
        cluster_network.close()
        for thread in streams:
            thread.join(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        with lock:
            codes = ", ".join(
                f"{t.name}={t.process.returncode}" for t in tasks if t.process
            )
            out.write(f"[launch] all tasks stopped ({codes})\n")
            out.flush()


def _start_relay(network, cluster, tasks, latency_ms, mbit, python, out, lock):
    """Starts the relay inside the cluster's network; returns it and each
    task's view of the cluster (its peers at the relay's ports for it)."""
    from tf_async import _relay

    names = [f"{t.task_type}{t.index}" for t in tasks]
    target_ports = [int(t.address.rsplit(":", 1)[1]) for t in tasks]
    listen_ports = pick_unused_ports(len(tasks) * (len(tasks) - 1))
    spec = {"names": names, "target_ports": target_ports, "listen_ports": listen_ports,
            "latency_ms": latency_ms, "mbit": mbit}
    relay = start_in_cluster_network(
        network, _relay.command(python, spec),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    answer = relay.stdout.readline()
    if not answer.startswith("ready"):
        relay.kill()
        relay.wait()
        raise RuntimeError(f"the link relay did not start: {answer.strip()!r}")
    views, k = {}, 0
    for i, task in enumerate(tasks):
        view = {job: list(addresses) for job, addresses in cluster.items()}
        for j, peer in enumerate(tasks):
            if i == j:
                continue
            view[peer.task_type][peer.index] = f"127.0.0.1:{listen_ports[k]}"
            k += 1
        views[(task.task_type, task.index)] = view
    with lock:
        out.write(
            f"[launch] slow link: every cross-task connection through a relay (pid "
            f"{relay.pid}), one-way latency {latency_ms:g} ms, "
            f"{'unlimited' if mbit is None else f'{mbit:g} Mbit/s'} per direction\n"
        )
        out.flush()
    return relay, views


def _stop_relay(relay: subprocess.Popen, out: TextIO, lock) -> None:
    relay.stdin.close()  # the relay stops when its stdin closes
    try:
        relay.wait(timeout=10)
    except subprocess.TimeoutExpired:
        relay.kill()
        relay.wait()
    text = relay.stdout.read()
    relay.stdout.close()
    for line in (text or "").splitlines():
        if not line.startswith("relay-stats "):
            continue
        import json

        stats = json.loads(line[len("relay-stats "):])
        with lock:
            for link in stats:
                if not link["bytes"]:
                    continue
                saturated = link["saturated_mbit"]
                out.write(
                    f"[launch] link {link['link']}: {link['bytes']} bytes, one-way delay "
                    f"min {link['one_way_ms_min']} mean {link['one_way_ms_mean']} ms, "
                    f"saturated {'-' if saturated is None else saturated} Mbit/s\n"
                )
            out.write("[launch] " + line + "\n")
            out.flush()


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _report_network(network: ClusterNetwork, warning, out: TextIO, lock) -> None:
    with lock:
        if warning:
            out.write(warning + "\n")
        elif network.private:
            out.write(f"[launch] private cluster network {network.namespace} (only lo)\n")
        out.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tf_async.launch",
        description="Run a script as a local multi-process TF cluster.",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker tasks (>= 1)")
    parser.add_argument("--ps", type=int, default=0, help="parameter-server tasks (>= 0)")
    parser.add_argument(
        "--chief", action="store_true",
        help="add a chief task (implied when --ps > 0)",
    )
    parser.add_argument(
        "--keep_going", action="store_true",
        help="do not stop the cluster when a non-chief task fails",
    )
    parser.add_argument(
        "--base_port", type=int, default=None,
        help="use consecutive ports from here (default: free ports)",
    )
    parser.add_argument(
        "--network", default="private", choices=NETWORKS,
        help="private (default): all tasks share one network namespace with only "
        "loopback; host: the host's network (tasks listen on all interfaces)",
    )
    parser.add_argument(
        "--link_latency_ms", type=_number, default=None,
        help="slow link: one-way latency (ms, [0, 10000]) of every cross-task "
        "connection, through a throttling relay",
    )
    parser.add_argument(
        "--link_mbit", type=_number, default=None,
        help="slow link: bandwidth (Mbit/s per direction of each task pair, > 0)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- script.py ARGS")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        return launch(
            command,
            workers=args.workers,
            ps=args.ps,
            chief=args.chief,
            keep_going=args.keep_going,
            base_port=args.base_port,
            network=args.network,
            link_latency_ms=args.link_latency_ms,
            link_mbit=args.link_mbit,
        )
    except (ValueError, TypeError) as error:
        parser.error(str(error))
        return 2  # unreachable: parser.error exits


if __name__ == "__main__":
    sys.exit(main())
