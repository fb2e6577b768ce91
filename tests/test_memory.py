"""The daemon's whole memory stays within its budget whatever a local process sends (issue 11).

Memory is behaviour, not timing: each test floods a real daemon as the issue did (clients that
never read their replies, messages of many frames) and checks the daemon's peak RSS (``VmHWM``,
from its ``stats``) against ``limit_rss_bytes`` (``max_bytes`` plus the documented overhead),
that it counted what it dropped, and that it still answers exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import zmq
from flashtoken.client import Client

from flashtoken import get_encoding
from flashtoken.encodings import encoding_id
from flashtoken.wire import AutoRequest, GetRequest, make_chain_seed, namespace_tag
from tests.daemon_fixtures import DaemonProcess, wait_until

MiB = 1024 * 1024
pytestmark = pytest.mark.timeout(300)

enc = get_encoding("cl100k_base")
EID = encoding_id(enc)
TEXT = ("Flooding a daemon that never reads its replies. " * 22_000)[: 1 * MiB]


def _flooder(daemon: DaemonProcess) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)  # the attacker queues without limit on its side
    sock.setsockopt(zmq.RCVHWM, 1)  # and never reads: its replies back up into the daemon
    sock.connect(daemon.address)
    return sock


def _answers_exactly(daemon: DaemonProcess) -> None:
    with Client(daemon.address, timeout_ms=5000) as client:
        prefix = "after the flood " * 50
        assert client.encode_ordinary("!", prefix=prefix) == enc.encode_ordinary(prefix + "!")
        assert client.encode_ordinary(TEXT[:5000]) == enc.encode_ordinary(TEXT[:5000])


def _within_budget(daemon: DaemonProcess) -> dict:
    stats = daemon.stats()
    print(
        "daemon RSS peak",
        stats["rss_max_bytes"] // MiB,
        "MiB; budget",
        stats["limit_rss_bytes"] // MiB,
        "MiB",
    )
    assert stats["rss_max_bytes"] <= stats["limit_rss_bytes"], (
        stats["rss_max_bytes"] // MiB,
        stats["limit_rss_bytes"] // MiB,
    )
    return stats


def test_auto_and_get_floods_that_never_read_stay_within_the_budget(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    daemon = start_daemon("--max-bytes", "64MiB", encodings="cl100k_base")
    data = TEXT.encode()
    seed = make_chain_seed(b"", EID, (), 512)
    # Fill the chain and the prefix first, so that every reply carries ~1 MiB of tokens.
    with Client(daemon.address, timeout_ms=5000, auto_local_bytes=0, min_uses=1) as client:
        client.encode_ordinary(TEXT)
        client.encode_ordinary("x", prefix=TEXT)
        wait_until(
            lambda: (lambda s: s["blocks"] > 0 and s["fills"] > 0)(daemon.stats()),
            60,
            "fills never landed",
        )
    flooders = [_flooder(daemon) for _ in range(9)]
    try:
        auto = AutoRequest(1, seed, enc.name, EID, (), False, 512, 0, data).frames()
        get = GetRequest(2, namespace_tag(b""), enc.name, EID, (), False, data).frames()
        for _ in range(300):
            flooders[0].send_multipart(auto)  # one AUTO flooder, as in the issue ...
        for sock in flooders[1:]:  # ... and eight GET flooders
            for _ in range(40):
                sock.send_multipart(get)
        # Every request is read and answered or its reply dropped; none is left in the queues.
        wait_until(
            lambda: daemon.stats()["auto_lookups"] >= 300 and daemon.stats()["cmd_get"] >= 320,
            240,
            "the daemon did not get through the flood",
        )
        stats = _within_budget(daemon)
        assert stats["replies_dropped"] > 0  # counted, not queued
        _answers_exactly(daemon)
    finally:
        for sock in flooders:
            sock.close(linger=0)
    _within_budget(daemon)


def test_a_message_of_many_frames_is_refused_without_being_copied(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    daemon = start_daemon("--max-bytes", "64MiB", "--max-prefix-bytes", "1MiB")
    sock = _flooder(daemon)
    try:
        frame = b"x" * MiB
        before = daemon.stats()["protocol_errors"]
        for _ in range(3):
            sock.send_multipart(
                [GetRequest(1, b"k" * 16, enc.name, EID, (), False, b"").frames()[0]] + [frame] * 60
            )
        wait_until(lambda: daemon.stats()["protocol_errors"] == before + 3, 60, "never refused")
        assert sock.poll(10_000, zmq.POLLIN)
        assert b"1 or 2 frames" in sock.recv_multipart()[0]
        _within_budget(daemon)
    finally:
        sock.close(linger=0)
    _answers_exactly(daemon)
