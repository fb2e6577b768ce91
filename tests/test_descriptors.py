"""Descriptors: a connection storm beyond the daemon's descriptor limit never aborts it (issue 11).

libzmq aborts a process whose ``ipc://`` accept fails with EMFILE. The daemon raises its soft
limit to the hard one and shuts down peers beyond a cap below it. Here the daemon runs with a
hard limit of 256 (set in its process before exec), and 600 sockets connect at once, retrying
every 100 ms.
"""

from __future__ import annotations

import resource
from collections.abc import Callable

import pytest
import zmq
from flashtoken.client import Client

from flashtoken import get_encoding
from flashtoken.wire import StatsRequest, parse_reply
from tests.daemon_fixtures import DaemonProcess, wait_until

LIMIT = 256
pytestmark = pytest.mark.timeout(180)


def _low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT // 2, LIMIT))  # soft 128: raised to 256


def test_a_connection_storm_beyond_the_descriptor_limit(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    daemon = start_daemon(encodings="cl100k_base", preexec_fn=_low_limit)
    before = daemon.stats()
    assert before["limit_connections"] < LIMIT  # the soft limit was raised to the hard one
    assert before["limit_connections"] > LIMIT // 2 - 64
    ctx = zmq.Context()
    # Connected before the storm, so within the cap: the storm's peers are the ones refused.
    watcher = ctx.socket(zmq.DEALER)
    watcher.setsockopt(zmq.LINGER, 0)
    watcher.connect(daemon.address)
    ids = iter(range(100, 10**6))

    def stats() -> dict:
        rid = next(ids)
        watcher.send_multipart(StatsRequest(rid).frames())
        while watcher.poll(10_000, zmq.POLLIN):
            reply = parse_reply(watcher.recv_multipart())
            if reply.id == rid:
                return reply.stats
        raise AssertionError(
            "no STATS reply on the connection made before the storm; alive:"
            f" {daemon.alive()}; log:\n{daemon.log_text()[-2000:]}"
        )

    wait_until(lambda: stats()["curr_connections"] >= 1, 60, "the watcher never connected")
    storm = []
    try:
        for _ in range(600):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(daemon.address)
            storm.append(sock)
        # Stopped at the door (the socket file moved aside), or shut down beyond the cap.
        wait_until(
            lambda: (lambda s: s["connections_gated"] + s["connections_refused"] > 0)(stats()),
            60,
            "no connection was refused",
        )
        assert daemon.alive()
        during = stats()
        assert during["curr_connections"] <= during["limit_connections"]
    finally:
        for sock in storm:
            sock.close(linger=0)
        watcher.close(linger=0)
        ctx.term()
    # The storm is gone: the daemon serves again, exactly.
    wait_until(lambda: daemon.stats()["curr_connections"] < 16, 60, "peers never went away")
    enc = get_encoding("cl100k_base")
    with Client(daemon.address, timeout_ms=5000) as client:
        prefix = "after the storm " * 40
        for suffix in ("a", "b"):
            assert client.encode_ordinary(suffix, prefix=prefix) == enc.encode_ordinary(
                prefix + suffix
            )
    assert daemon.alive()
