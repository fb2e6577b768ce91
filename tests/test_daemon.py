"""The daemon as a process: its protocol on a real socket, its limits, its CLI, its life cycle."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

from flashtoken import get_encoding, split_prefix
from flashtoken.encodings import encoding_id
from flashtoken.wire import (
    GetHit,
    GetRequest,
    PingRequest,
    namespace_tag,
    parse_reply,
    tokens_from_frame,
)
from tests.daemon_fixtures import DaemonProcess, header, request, wait_until
from tests.test_protocol import HOSTILE_FRAMES

pytestmark = pytest.mark.timeout(60)

CLI = [sys.executable, "-m", "flashtoken.daemon"]


def get(
    daemon: DaemonProcess,
    prefix: str,
    enc: str = "cl100k_base",
    *,
    fill: bool = True,
    allowed: tuple[str, ...] = (),
    request_id: int = 1,
):
    encoding = get_encoding(enc)
    data = prefix.encode("utf-8")
    eid = encoding_id(encoding)
    frames = GetRequest(request_id, namespace_tag(b""), enc, eid, allowed, fill, data).frames()
    reply = parse_reply(request(daemon.address, frames))
    assert reply.id == request_id
    return reply


def get_until_hit(daemon: DaemonProcess, prefix: str, enc: str = "cl100k_base", **kw):
    def hit() -> GetHit | None:
        reply = get(daemon, prefix, enc, **kw)
        return reply if isinstance(reply, GetHit) else None

    return wait_until(hit, 20, f"the daemon never held the prefix {prefix[:40]!r}")


def test_miss_fill_hit(daemon: DaemonProcess) -> None:
    prefix = "You are a helpful assistant. " * 200
    first = get(daemon, prefix)
    assert first.ok and first.hit is False and first.filling is True
    hit = get_until_hit(daemon, prefix)
    expected = split_prefix("cl100k_base", prefix)
    assert (list(hit.tokens), hit.cut) == (expected.head, expected.cut)
    # fill=False on an unknown prefix: a miss, and nothing is filled.
    assert get(daemon, "other", fill=False).filling is False
    stats = daemon.stats()
    assert stats["get_hits"] + stats["get_misses"] == stats["cmd_get"] >= 3
    assert stats["fills"] == 1 and stats["curr_items"] == 1
    assert stats["tokens_served"] == len(expected.head)


def test_allowed_specials_and_o200k(daemon: DaemonProcess) -> None:
    prefix = "<|im_start|>system<|endoftext|> be brief<|endoftext|>"
    allowed = ("<|endoftext|>",)
    hit = get_until_hit(daemon, prefix, "o200k_base", allowed=allowed)
    expected = split_prefix("o200k_base", prefix, allowed_special=set(allowed))
    assert (list(hit.tokens), hit.cut) == (expected.head, expected.cut)
    # Another policy is another entry.
    assert get(daemon, prefix, "o200k_base", fill=False).hit is False


def test_invalid_gets_get_client_errors(daemon: DaemonProcess) -> None:
    data = b"prefix"
    eid = encoding_id(get_encoding("cl100k_base"))
    key = namespace_tag(b"")
    cases = {
        "unknown encoding": GetRequest(3, key, "no_such_encoding", eid, (), True, data).frames(),
        "encoding id mismatch": GetRequest(
            3, key, "cl100k_base", bytes(32), (), True, data
        ).frames(),
        "not a special token": GetRequest(
            3, key, "cl100k_base", eid, ("<|nope|>",), True, data
        ).frames(),
    }
    for name, frames in cases.items():
        reply = parse_reply(request(daemon.address, frames))
        assert (reply.id, reply.ok, reply.error) == (3, False, "CLIENT_ERROR"), name
    stats = daemon.stats()
    assert stats["protocol_errors"] == 3 and stats["cmd_get"] == 0


def test_hostile_frames_leave_the_daemon_serving(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    daemon = start_daemon("--max-prefix-bytes", "64KiB")
    ctx = zmq.Context.instance()
    hostile = ctx.socket(zmq.DEALER)
    hostile.setsockopt(zmq.LINGER, 0)
    hostile.connect(daemon.address)
    try:
        sent = 0
        for frames in HOSTILE_FRAMES.values():
            if frames:  # ZeroMQ cannot send a message of no frames; "empty header" covers it
                hostile.send_multipart(frames)
                sent += 1
        hostile.send_multipart([header(op="GET", id=1, ns=b"k" * 16), b"x" * (65 * 1024)])
        sent += 1
        replies = 0
        while hostile.poll(2000, zmq.POLLIN):
            reply = parse_reply(hostile.recv_multipart())
            assert not reply.ok and reply.error == "CLIENT_ERROR"
            replies += 1
            if replies == sent:
                break
        assert replies == sent
        # Beyond ZMQ_MAXMSGSIZE: libzmq drops the connection; the daemon never sees the frame.
        hostile.send_multipart([header(op="PING", id=1), b"x" * (1 << 20)])
    finally:
        hostile.close(linger=0)
    assert daemon.alive()
    assert parse_reply(request(daemon.address, PingRequest(9).frames())).pong is True
    assert get_until_hit(daemon, "still serving").hit is True
    assert daemon.stats()["protocol_errors"] == sent


def test_a_panicking_fill_is_an_error_not_a_crash(daemon: DaemonProcess) -> None:
    # o200k's regex overflows: tiktoken panics (encode_ordinary) or raises ValueError (encode)
    spaces = " " * 1_000_000
    assert get(daemon, spaces, "o200k_base").filling is True
    wait_until(lambda: daemon.stats()["fill_errors"] == 1, 20, "the fill never failed")
    reply = get(daemon, spaces, "o200k_base")
    assert (reply.ok, reply.error) == (False, "SERVER_ERROR")
    assert "Max stack size exceeded" in reply.message  # tiktoken's own words
    assert daemon.alive() and get_until_hit(daemon, "fine", "o200k_base").hit is True
    stats = daemon.stats()
    assert stats["fill_errors"] == 1 and stats["get_hits"] + stats["get_misses"] == stats["cmd_get"]


def test_byte_cap_and_lru_under_oversubscription(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    daemon = start_daemon("--max-bytes", "24KiB")
    limit = 24 * 1024
    prefixes = [f"prefix {i}: " + "lorem ipsum dolor sit amet " * 150 for i in range(40)]
    stored = 0
    for i, prefix in enumerate(prefixes):
        get(daemon, prefix)
        wait_until(lambda: daemon.stats()["fills"] == i + 1, 20, "fill did not land")
        stats = daemon.stats()
        assert stats["bytes"] <= stats["limit_maxbytes"] == limit
        stored += len(prefix.encode()) + 4 * len(split_prefix("cl100k_base", prefix).head)
    assert stored > 10 * limit
    stats = daemon.stats()
    assert stats["evictions"] > 0 and stats["evictions"] + stats["curr_items"] == 40
    kept = stats["curr_items"]
    # Least recently used went first: exactly the last `kept` prefixes remain.
    for prefix in prefixes[-kept:]:
        assert get(daemon, prefix, fill=False).hit is True
    for prefix in prefixes[:-kept]:
        assert get(daemon, prefix, fill=False).hit is False


def test_second_daemon_refuses(daemon: DaemonProcess) -> None:
    proc = subprocess.run(
        [*CLI, "--bind", daemon.address, "--encodings", ""],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert (
        f"another flashtoken-daemon (pid {daemon.pid}) is serving {daemon.address}" in proc.stderr
    )
    assert daemon.alive() and daemon.answers()


def test_stale_socket_is_replaced_and_sigterm_cleans_up(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    first = start_daemon()
    first.kill9()
    assert first.path.exists()  # left behind by the dead daemon
    second = start_daemon()
    assert get_until_hit(second, "after a crash").hit is True
    assert second.stop() == 0
    assert not second.path.exists()


def test_default_address_is_private(daemon_dir: Path) -> None:
    runtime = daemon_dir / "xdg"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    proc = subprocess.Popen([*CLI, "--encodings", "", "--log-level", "WARNING"], env=env)
    try:
        sock = runtime / "flashtoken" / "daemon.sock"
        wait_until(sock.exists, 20, "no socket at the default address")
        assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        out = subprocess.run(
            [*CLI, "stats", "--json"], env=env, capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert not sock.exists()


def test_refuses_a_directory_others_can_write(daemon_dir: Path) -> None:
    runtime = daemon_dir / "xdg"
    (runtime / "flashtoken").mkdir(parents=True)
    (runtime / "flashtoken").chmod(0o777)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    proc = subprocess.run(
        [*CLI, "--encodings", ""], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1 and "chmod 700" in proc.stderr


def test_stats_cli(daemon: DaemonProcess) -> None:
    get(daemon, "counted")
    text = subprocess.run(
        [*CLI, "stats", "--bind", daemon.address], capture_output=True, text=True, timeout=30
    )
    assert text.returncode == 0
    assert "STAT cmd_get 1" in text.stdout and "SETTING max_bytes 536870912" in text.stdout
    as_json = subprocess.run(
        [*CLI, "stats", "--bind", daemon.address, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    import json

    assert json.loads(as_json.stdout)["stats"]["pid"] == daemon.pid


def test_stats_cli_without_a_daemon(daemon_dir: Path) -> None:
    address = f"ipc://{daemon_dir}/nobody.sock"
    proc = subprocess.run(
        [*CLI, "stats", "--bind", address, "--timeout-ms", "300"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and address in proc.stderr


def test_help_is_true_to_the_code() -> None:
    top = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=30)
    assert top.returncode == 0 and "serve" in top.stdout and "stats" in top.stdout
    serve = subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True, timeout=30)
    for flag in (
        "--bind",
        "--max-bytes",
        "--encodings",
        "--fill-threads",
        "--log-level",
        "--max-prefix-bytes",
        "--exit-with-parent",
    ):
        assert flag in serve.stdout
    assert "--debug-key-bytes" not in serve.stdout


def test_sigint_is_a_clean_shutdown(start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon()
    daemon.signal(signal.SIGINT)
    assert daemon.proc is not None and daemon.proc.wait(10) == 0
    assert not daemon.path.exists()


def test_token_frame_is_little_endian(daemon: DaemonProcess) -> None:
    hit = get_until_hit(daemon, "hello world, hello world, hello world")
    raw = request(
        daemon.address,
        GetRequest(
            5,
            namespace_tag(b""),
            "cl100k_base",
            encoding_id(get_encoding("cl100k_base")),
            (),
            False,
            b"hello world, hello world, hello world",
        ).frames(),
    )
    assert list(tokens_from_frame(raw[1])) == list(hit.tokens)
    assert int.from_bytes(raw[1][:4], "little") == hit.tokens[0]
