"""Trust: the daemon derives every key itself and compares the namespace it stores (issue 11).

A client never names the key its entry is stored under: a GET carries its namespace's tag and
the bytes, a TELL's digests are checked against its bytes (tests/test_follow.py), so no process
that knows a prompt can squat that prompt's entry, and tenants are kept apart by what is stored
and compared, not by the hash alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq
from flashtoken.client import Client

from flashtoken import get_encoding
from flashtoken.encodings import encoding_id
from flashtoken.errors import DaemonUnavailable
from flashtoken.wire import make_key, namespace_tag, parse_reply
from flashtoken.wire.admin import request_stats
from tests.daemon_fixtures import DaemonProcess, header, request, wait_until

enc = get_encoding("cl100k_base")
PROMPT = "You are the victim's system prompt. Answer in French. " * 30


def test_a_client_cannot_squat_another_prompts_entry(daemon: DaemonProcess) -> None:
    eid = encoding_id(enc)
    victim_key = make_key(b"", eid, (), PROMPT.encode())  # what a key used to be
    for i in range(20):  # GETs naming the victim's key, with other bytes
        fields = dict(op="GET", id=i + 1, enc=enc.name, eid=eid, allowed=[], fill=True)
        squat = [header(**fields, ns=namespace_tag(b""), key=victim_key), f"squat {i}".encode()]
        assert parse_reply(request(daemon.address, squat)).ok
    wait_until(lambda: daemon.stats()["fills"] == 20, 60, "squatting fills never ran")
    with Client(daemon.address, timeout_ms=5000, min_uses=1) as victim:
        victim.encode_ordinary("a", prefix=PROMPT)
        wait_until(lambda: daemon.stats()["fills"] == 21, 60, "the victim's fill never ran")
    with Client(daemon.address, timeout_ms=5000, min_uses=1) as other:
        assert other.encode_ordinary("b", prefix=PROMPT) == enc.encode_ordinary(PROMPT + "b")
        assert other.stats()["l2_hits"] == 1
    assert daemon.stats()["collisions_detected"] == 0


def test_namespaces_are_compared_not_only_hashed(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    # Keys cut to one byte: 256 of them, for every prefix of every namespace.
    daemon = start_daemon("--debug-key-bytes", "1", encodings="cl100k_base")
    with Client(daemon.address, namespace=b"tenant-a", timeout_ms=5000) as a:
        a.encode_ordinary("x", prefix=PROMPT)
        wait_until(lambda: daemon.stats()["curr_items"] == 1, 60, "no fill")
    with Client(daemon.address, namespace=b"tenant-a", timeout_ms=5000) as a2:
        assert a2.encode_ordinary("y", prefix=PROMPT) == enc.encode_ordinary(PROMPT + "y")
        assert a2.stats()["l2_hits"] == 1
    # Other namespaces, the same bytes, until one lands on tenant-a's key (1 in 256): found,
    # compared, and not handed out.
    for i in range(4000):
        with Client(daemon.address, namespace=b"b%d" % i, timeout_ms=5000, fill=False) as b:
            assert b.encode_ordinary("y", prefix=PROMPT) == enc.encode_ordinary(PROMPT + "y")
            assert b.stats()["l2_hits"] == 0
        if daemon.stats()["collisions_detected"]:
            break
    assert daemon.stats()["collisions_detected"] == 1


def _served(address: str) -> int:
    """How many requests a client at ``address`` sent to a ROUTER bound there (0: it refused)."""
    with Client(address, timeout_ms=50, breaker_failures=10**6) as client:
        for i in range(3):
            prefix = f"trust check {i} " * 20
            assert client.encode_ordinary("!", prefix=prefix) == enc.encode_ordinary(prefix + "!")
        return client.stats()["untrusted"]


def test_the_client_connects_only_to_a_private_socket_of_its_own_user(daemon_dir: Path) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    path = daemon_dir / "impostor.sock"
    address = f"ipc://{path}"
    try:
        router.bind(address)
        for mode, owner, directory_mode in (
            (0o666, os.geteuid(), 0o700),  # anyone could have connected or be listening
            (0o600, 65534, 0o700),  # another user's socket
            (0o600, os.geteuid(), 0o777),  # a directory where others could replace it
        ):
            os.chmod(path, mode)
            os.chown(path, owner, -1)
            os.chmod(daemon_dir, directory_mode)
            assert _served(address) == 3  # refused before connecting: counted, local answers
            assert not router.poll(100)  # nothing was sent to it
        os.chmod(daemon_dir, 0o700)
        os.chown(path, os.geteuid(), -1)
        os.chmod(path, 0o600)
        with pytest.raises(DaemonUnavailable, match="not a private socket"):
            os.chmod(path, 0o660)
            request_stats(address, timeout_ms=100)
    finally:
        os.chmod(daemon_dir, 0o700)
        router.close(linger=0)
        ctx.term()


def test_the_lock_file_is_never_followed_through_a_symlink(
    daemon_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    victim = daemon_dir / "victim.txt"
    victim.write_text("precious")
    (daemon_dir / "d.sock.lock").symlink_to(victim)
    with pytest.raises(AssertionError, match="symlink is refused"):
        start_daemon()
    assert victim.read_text() == "precious"
