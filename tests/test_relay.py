"""tf_async._relay: the slow link's latency and bandwidth, as configured and as measured."""

import socket
import threading
import time

import pytest

from tf_async import _relay


def _sink_server():
    """A TCP server on loopback that echoes what it gets; returns (port, closer)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(10)

    def serve():
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server.getsockname()[1], server


def _relay_to(port, latency_ms, mbit):
    forward = _relay.Link("a->b", latency_ms, mbit)
    backward = _relay.Link("b->a", latency_ms, mbit)
    return _relay.Relay([(0, port, forward, backward)], max_seconds=60)


def test_one_way_latency_is_at_least_and_near_the_configured_one():
    port, server = _sink_server()
    latency_ms = 25.0
    with _relay_to(port, latency_ms, None) as relay, server:
        client = socket.create_connection(("127.0.0.1", relay.ports[0]), timeout=10)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        round_trips = []
        with client:
            for _ in range(8):
                start = time.monotonic()
                client.sendall(b"ping")
                assert client.recv(16) == b"ping"
                round_trips.append(time.monotonic() - start)
        stats = {s["link"]: s for s in relay.stats()}
    # Every round trip crosses the link twice: never faster than 2 × latency.
    assert min(round_trips) >= 2 * latency_ms / 1000.0
    for name in ("a->b", "b->a"):
        assert stats[name]["chunks"] == 8 and stats[name]["bytes"] == 32
        assert stats[name]["one_way_ms_min"] >= latency_ms
        # The relay's own measurement: within 10 % of what was asked.
        assert stats[name]["one_way_ms_min"] <= 1.1 * latency_ms, stats[name]


def test_bandwidth_is_the_configured_one():
    port, server = _sink_server()
    # 1.2 s at 10 Mbit/s: long against scheduling hiccups of a loaded machine
    mbit, size = 10.0, 1_500_000
    with _relay_to(port, 5.0, mbit) as relay, server:
        client = socket.create_connection(("127.0.0.1", relay.ports[0]), timeout=30)
        payload = bytes(range(256)) * (size // 256)
        received = bytearray()
        start = time.monotonic()
        with client:
            sender = threading.Thread(target=client.sendall, args=(payload,))
            sender.start()
            while len(received) < len(payload):
                data = client.recv(1 << 20)
                assert data, "connection closed early"
                received += data
            elapsed = time.monotonic() - start
            sender.join()
        stats = {s["link"]: s for s in relay.stats()}
    assert bytes(received) == payload  # in order, nothing lost
    seconds = 8 * len(payload) / (mbit * 1e6)
    assert elapsed >= seconds  # each direction is limited to `mbit`
    assert elapsed < 20 * seconds  # generous: a loaded machine
    for name in ("a->b", "b->a"):
        assert stats[name]["bytes"] == len(payload)
        measured = stats[name]["saturated_mbit"]
        assert measured is not None and 0.9 * mbit <= measured <= 1.1 * mbit, stats[name]


def test_closing_the_relay_stops_its_connections_and_lifetime_is_bounded():
    port, server = _sink_server()
    with server:
        relay = _relay.Relay(
            [(0, port, _relay.Link("a->b", 0, None), _relay.Link("b->a", 0, None))],
            max_seconds=0.2,
        )
        assert relay.stop.wait(10), "relay outlived max_seconds"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", relay.ports[0]), timeout=2).recv(1)


def test_pair_routes_cover_every_ordered_pair_with_shared_links():
    routes = _relay.pair_routes(["w0", "w1", "w2"], [10, 11, 12], list(range(100, 106)), 1, 2)
    assert [(r[0], r[1], r[2].name, r[3].name) for r in routes] == [
        (100, 11, "w0->w1", "w1->w0"), (101, 12, "w0->w2", "w2->w0"),
        (102, 10, "w1->w0", "w0->w1"), (103, 12, "w1->w2", "w2->w1"),
        (104, 10, "w2->w0", "w0->w2"), (105, 11, "w2->w1", "w1->w2"),
    ]
    assert routes[0][2] is routes[2][3]  # one bucket per direction of a pair


@pytest.mark.parametrize("latency, mbit, message", [
    (-1, None, "`link_latency_ms` must be a number in [0, 10000]"),
    (True, None, "`link_latency_ms` must be a number"),
    (20, 0, "`link_mbit` must be a number in (0, 1e6]"),
    (20, "100", "`link_mbit` must be a number"),
])
def test_bad_link_values_are_named(latency, mbit, message):
    with pytest.raises(ValueError) as error:
        _relay.check_link(latency, mbit)
    assert message in str(error.value)
