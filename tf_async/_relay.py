"""A throttling TCP relay on loopback: a slow link between the tasks of one machine.

Kernel traffic shaping (``tc netem``) is not available to an unprivileged user,
so ``python -m tf_async.launch --link_latency_ms 20 --link_mbit 100`` gives every
task a ``TF_CONFIG`` in which each peer's address is a port of this relay, one
port per ordered pair of tasks (``src -> dst``), so every cross-task connection
(gRPC: MultiWorkerMirrored's collectives, parameter-server reads/writes) passes
through it and pays the link.

The model, per direction of each task pair (``Link``): a token bucket of rate
``mbit`` serialises the bytes (``free_at = max(now, free_at) + n / rate``), and
each chunk is delivered ``latency_ms`` after its last byte left the bucket
(one-way propagation delay). Both directions of a pair are independent (full
duplex); all connections of one direction share its bucket, as on one wire.

The relay measures what it did: per link the bytes carried, the one-way delay
each chunk actually had (arrival at the relay -> written to the destination,
including the serialisation of the chunk itself), and the throughput during
saturated periods (chunks queued behind others), so runs can report the link
they had (``stats()``; the process mode prints one ``relay-stats {json}`` line
when it stops).

Bounded: it listens on 127.0.0.1 only, and stops when :meth:`Relay.close` is
called, after ``max_seconds``, or (process mode: ``python _relay.py serve
SPEC_JSON``) when its stdin closes, i.e. when the launcher that started it ends
for any reason. Threads only, standard library only (it is run as a file inside
the cluster's network namespace, like ``_netns.py``).
"""

from __future__ import annotations

import heapq
import json
import os
import socket
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

_CHUNK = 16 * 1024  # bucket granularity: 1.3 ms at 100 Mbit/s
_READ = 64 * 1024
DEFAULT_MAX_SECONDS = 6 * 3600.0


def check_link(latency_ms, mbit, flag_prefix: str = "") -> Tuple[float, Optional[float]]:
    """Validated ``(latency_ms, mbit)``; ``mbit=None`` means unlimited bandwidth."""
    def number(value):
        return not isinstance(value, bool) and isinstance(value, (int, float))

    if not number(latency_ms) or not 0.0 <= latency_ms <= 10_000.0 or latency_ms != latency_ms:
        raise ValueError(
            f"`{flag_prefix}link_latency_ms` must be a number in [0, 10000] (one-way "
            f"milliseconds), got {latency_ms!r}."
        )
    if mbit is not None and (not number(mbit) or not 0.0 < mbit <= 1e6):
        raise ValueError(
            f"`{flag_prefix}link_mbit` must be a number in (0, 1e6] (Mbit/s per "
            f"direction), got {mbit!r}."
        )
    return float(latency_ms), (None if mbit is None else float(mbit))


class Link:
    """One direction of one task pair: token bucket + propagation delay + stats."""

    def __init__(self, name: str, latency_ms: float, mbit: Optional[float]) -> None:
        self.name = name
        self.latency = latency_ms / 1000.0
        self.bytes_per_second = None if mbit is None else mbit * 1e6 / 8.0
        self._lock = threading.Lock()
        self._free_at = 0.0
        self._busy_id = 0
        # stats
        self.bytes = 0
        self.chunks = 0
        self._delay_sum = 0.0
        self._delay_min = float("inf")
        self._delay_max = 0.0
        self._busy: Dict[int, List[float]] = {}  # id -> [first arrival, last delivery, bytes, n]
        self._saturated_bytes = 0.0
        self._saturated_seconds = 0.0

    def schedule(self, nbytes: int, now: float) -> Tuple[float, int]:
        """When a chunk of ``nbytes`` arriving ``now`` is due at the destination."""
        with self._lock:
            if now >= self._free_at:  # idle link: a new busy period
                self._close_busy_periods(keep=None)
                self._busy_id += 1
            start = max(now, self._free_at)
            if self.bytes_per_second is not None:
                self._free_at = start + nbytes / self.bytes_per_second
            else:
                self._free_at = start
            self._busy.setdefault(self._busy_id, [now, now, 0.0, 0])
            return self._free_at + self.latency, self._busy_id

    def delivered(self, nbytes: int, arrived: float, done: float, busy_id: int) -> None:
        with self._lock:
            delay = done - arrived
            self.bytes += nbytes
            self.chunks += 1
            self._delay_sum += delay
            self._delay_min = min(self._delay_min, delay)
            self._delay_max = max(self._delay_max, delay)
            period = self._busy.get(busy_id)
            if period is not None:
                period[1] = max(period[1], done)
                period[2] += nbytes
                period[3] += 1

    def _close_busy_periods(self, keep) -> None:
        # A busy period of several chunks measures the bandwidth: bytes over
        # (last delivery - first arrival - latency). ``keep``: the current one.
        for key in [k for k in self._busy if k != keep]:
            nbytes, seconds = self._measured(self._busy.pop(key))
            self._saturated_bytes += nbytes
            self._saturated_seconds += seconds

    def _measured(self, period) -> Tuple[float, float]:
        first, last, nbytes, n = period
        seconds = last - first - self.latency
        return (nbytes, seconds) if n >= 4 and seconds > 0.05 else (0.0, 0.0)

    def stats(self) -> dict:
        with self._lock:
            self._close_busy_periods(keep=self._busy_id)
            nbytes, seconds = self._measured(self._busy.get(self._busy_id, [0, 0, 0, 0]))
            nbytes += self._saturated_bytes
            seconds += self._saturated_seconds
            mbit = 8.0 * nbytes / seconds / 1e6 if seconds > 0 else None
            return {
                "link": self.name,
                "bytes": self.bytes,
                "chunks": self.chunks,
                "one_way_ms_min": round(1000 * self._delay_min, 3) if self.chunks else None,
                "one_way_ms_mean": (
                    round(1000 * self._delay_sum / self.chunks, 3) if self.chunks else None
                ),
                "one_way_ms_max": round(1000 * self._delay_max, 3) if self.chunks else None,
                "saturated_mbit": None if mbit is None else round(mbit, 3),
                "saturated_seconds": round(seconds, 3),
            }


class _Pipe:
    """One direction of one relayed connection: a reader and a timed writer."""

    def __init__(self, src: socket.socket, dst: socket.socket, link: Link, stop) -> None:
        self.src, self.dst, self.link, self.stop = src, dst, link, stop
        self._queue: List[tuple] = []  # heap of (due, seq, arrived, busy_id, data)
        self._seq = 0
        self._cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.writer = threading.Thread(target=self._write, daemon=True)

    def start(self) -> None:
        self.reader.start()
        self.writer.start()

    def _push(self, due, arrived, busy_id, data) -> None:
        with self._cond:
            heapq.heappush(self._queue, (due, self._seq, arrived, busy_id, data))
            self._seq += 1
            self._cond.notify()

    def _read(self) -> None:
        try:
            while not self.stop.is_set():
                data = self.src.recv(_READ)
                now = time.monotonic()
                if not data:
                    break
                for i in range(0, len(data), _CHUNK):
                    piece = data[i : i + _CHUNK]
                    due, busy_id = self.link.schedule(len(piece), now)
                    self._push(due, now, busy_id, piece)
        except OSError:
            pass
        due = time.monotonic() + self.link.latency
        self._push(due, due, 0, None)  # end of stream after the data in flight

    def _write(self) -> None:
        try:
            while not self.stop.is_set():
                with self._cond:
                    while not self._queue and not self.stop.is_set():
                        self._cond.wait(0.5)
                    if not self._queue:
                        continue
                    due = self._queue[0][0]
                    wait = due - time.monotonic()
                    if wait > 0:
                        self._cond.wait(min(wait, 0.5))
                        continue
                    ready = []
                    now = time.monotonic()
                    while self._queue and self._queue[0][0] <= now:
                        ready.append(heapq.heappop(self._queue))
                for _, _, arrived, busy_id, data in ready:
                    if data is None:
                        try:
                            self.dst.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        return
                    # Recorded before the write, so the bytes are counted by
                    # the time the destination sees them.
                    self.link.delivered(len(data), arrived, time.monotonic(), busy_id)
                    self.dst.sendall(data)
        except OSError:
            try:
                self.src.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Relay:
    """Listens on ``127.0.0.1:listen_port`` for each route and forwards to its target.

    ``routes``: ``[(listen_port, target_port, forward_link, backward_link)]``;
    ``forward_link`` carries client -> target bytes, ``backward_link`` the
    answers. Port 0 picks a free port (see :attr:`ports`).
    """

    def __init__(self, routes: Sequence[tuple], max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
        self.stop = threading.Event()
        self._listeners: List[socket.socket] = []
        self._threads: List[threading.Thread] = []
        self._sockets: List[socket.socket] = []
        self._lock = threading.Lock()
        self.links: Dict[str, Link] = {}
        self.ports: List[int] = []
        self._deadline = time.monotonic() + max_seconds
        for listen_port, target_port, forward, backward in routes:
            self.links.setdefault(forward.name, forward)
            self.links.setdefault(backward.name, backward)
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", listen_port))
            listener.listen(64)
            listener.settimeout(0.5)
            self._listeners.append(listener)
            self.ports.append(listener.getsockname()[1])
            thread = threading.Thread(
                target=self._accept, args=(listener, target_port, forward, backward), daemon=True
            )
            self._threads.append(thread)
        for thread in self._threads:
            thread.start()
        self._watchdog = threading.Thread(target=self._expire, daemon=True)
        self._watchdog.start()

    def _expire(self) -> None:
        while not self.stop.wait(0.5):
            if time.monotonic() > self._deadline:
                self.close()

    def _accept(self, listener, target_port, forward, backward) -> None:
        while not self.stop.is_set():
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                target = socket.create_connection(("127.0.0.1", target_port), timeout=10)
            except OSError:
                client.close()  # the target is not up (yet): the client retries
                continue
            target.settimeout(None)
            client.settimeout(None)
            for s in (client, target):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, target]
            _Pipe(client, target, forward, self.stop).start()
            _Pipe(target, client, backward, self.stop).start()

    def stats(self) -> List[dict]:
        return [link.stats() for link in self.links.values()]

    def close(self) -> None:
        self.stop.set()
        for s in self._listeners:
            try:
                s.close()
            except OSError:
                pass
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pair_routes(
    names: Sequence[str], target_ports: Sequence[int], listen_ports: Sequence[int],
    latency_ms: float, mbit: Optional[float],
) -> List[tuple]:
    """Routes for every ordered pair ``i -> j`` (``i != j``) of tasks: listen port
    ``listen_ports[k]`` (k running over the pairs in order) forwards to
    ``target_ports[j]``; links named ``"a->b"`` are shared by all connections
    in that direction."""
    links: Dict[str, Link] = {}

    def link(a, b):
        name = f"{a}->{b}"
        if name not in links:
            links[name] = Link(name, latency_ms, mbit)
        return links[name]

    routes, k = [], 0
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                continue
            routes.append((listen_ports[k], target_ports[j], link(a, b), link(b, a)))
            k += 1
    return routes


def command(python: str, spec: dict) -> List[str]:
    """``python this_file serve SPEC``: the relay as a process (stdlib only)."""
    return [python, os.path.abspath(__file__), "serve", json.dumps(spec)]


def _serve(spec: dict) -> int:
    latency_ms, mbit = check_link(spec["latency_ms"], spec.get("mbit"))
    routes = pair_routes(
        spec["names"], spec["target_ports"], spec["listen_ports"], latency_ms, mbit
    )
    relay = Relay(routes, max_seconds=float(spec.get("max_seconds", DEFAULT_MAX_SECONDS)))
    print("ready " + json.dumps(relay.ports), flush=True)
    closer = threading.Thread(target=lambda: (sys.stdin.read(), relay.stop.set()), daemon=True)
    closer.start()
    relay.stop.wait()
    relay.close()
    print("relay-stats " + json.dumps(relay.stats()), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"] and len(sys.argv) == 3:
        sys.exit(_serve(json.loads(sys.argv[2])))
    print("usage: _relay.py serve SPEC_JSON", file=sys.stderr)
    sys.exit(2)
