"""tcp:// with CURVE keys, and the platform without ipc:// or fcntl, forced on Linux.

``FLASHTOKEN_PRETEND_NO_IPC`` / ``FLASHTOKEN_PRETEND_NO_FCNTL`` make this machine behave as
Windows does for the daemon: the default address is ``tcp://127.0.0.1``, the key file lives in
the runtime directory (a temp ``XDG_RUNTIME_DIR`` here), and the single-instance lock is the
port. A real daemon process on a free port; real clients; ids checked against tiktoken.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq

from flashtoken import get_encoding
from flashtoken.encodings import encoding_id
from flashtoken.errors import DaemonUnavailable
from flashtoken.wire import GetRequest, default_address, make_key, parse_reply
from flashtoken.wire.addresses import DEFAULT_TCP_ADDRESS
from flashtoken.wire.auth import (
    KEY_FILE_ENV,
    ZapHandler,
    make_keys,
    read_keys,
    secure_server,
)
from tests.daemon_fixtures import DaemonProcess, request, short_tempdir, wait_until

ENC = "cl100k_base"
PRETEND = {"FLASHTOKEN_PRETEND_NO_IPC": "1", "FLASHTOKEN_PRETEND_NO_FCNTL": "1"}
DEADLINE = 30.0
PREFIX = "You are a careful assistant. Answer briefly, cite sources, 東京 naïve 🙂. " * 40


def free_ports() -> int:
    """A port p with p + 1 free too (the daemon publishes chain blocks on the next port)."""
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two adjacent free ports")


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private runtime directory, and this process pretending too (the clients read it)."""
    directory = short_tempdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(directory))
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    for name, value in PRETEND.items():
        monkeypatch.setenv(name, value)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class TcpDaemon(DaemonProcess):
    """A daemon on ``address``; its own checks (PING, STATS) use its own key file, whatever
    file the test's clients are given."""

    def __init__(self, directory: Path, address: str) -> None:
        super().__init__(directory, env=dict(os.environ))
        self.address = address
        self.key_path = directory / "flashtoken" / "tcp.key"

    @contextmanager
    def _own_keys(self) -> Iterator[None]:
        saved = os.environ.get(KEY_FILE_ENV)
        os.environ[KEY_FILE_ENV] = str(self.key_path)
        try:
            yield
        finally:
            if saved is None:
                del os.environ[KEY_FILE_ENV]
            else:
                os.environ[KEY_FILE_ENV] = saved

    def answers(self) -> bool:
        with self._own_keys():
            try:
                return super().answers()
            except DaemonUnavailable:  # no key file yet: the daemon is still starting
                return False

    def stats(self) -> dict[str, Any]:
        with self._own_keys():
            return super().stats()


@pytest.fixture
def tcp_daemon(runtime: Path) -> Iterator[TcpDaemon]:
    daemon = TcpDaemon(runtime, f"tcp://127.0.0.1:{free_ports()}")
    try:
        yield daemon.start()
    finally:
        daemon.stop()


def test_the_platform_without_ipc_defaults_to_tcp(runtime: Path) -> None:
    assert default_address() == DEFAULT_TCP_ADDRESS


def test_right_keys_are_served_exactly(tcp_daemon: TcpDaemon, runtime: Path) -> None:
    from flashtoken.client import Client

    key_path = runtime / "flashtoken" / "tcp.key"
    assert key_path.stat().st_mode & 0o777 == 0o600
    enc = get_encoding(ENC)
    # No L1: a miss is encoded locally and kept in the L1, which would answer from then on.
    with Client(tcp_daemon.address, ENC, min_uses=1, l1_bytes=0) as client:

        def hit() -> bool:
            assert client.encode_ordinary(" Q?", prefix=PREFIX) == enc.encode_ordinary(
                PREFIX + " Q?"
            )
            return client.stats()["l2_hits"] > 0

        wait_until(hit, DEADLINE, "never a hit through tcp://")
    assert tcp_daemon.stats()["auth_refused"] == 0


def _get(address: str) -> Any:
    data = PREFIX.encode()
    eid = encoding_id(get_encoding(ENC))
    frames = GetRequest(1, make_key(b"", eid, (), data), ENC, eid, (), True, data).frames()
    return parse_reply(request(address, frames, timeout_ms=3000))


def test_wrong_keys_are_refused_counted_and_fall_back_exactly(
    tcp_daemon: TcpDaemon, runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flashtoken.client import Client

    right = read_keys(str(runtime / "flashtoken" / "tcp.key"))
    enc = get_encoding(ENC)
    # Another daemon's key file (every key wrong), then one with this daemon's public key and
    # an unknown client key pair (the ZAP handler's no).
    other = make_keys(str(runtime / "other.key"))
    lines = [b"server-public " + right.server_public]
    lines += [b"client-public " + other.client_public, b"client-secret " + other.client_secret]
    lines += [b"server-secret " + bytes(40)]
    stolen = runtime / "half.key"
    stolen.write_bytes(b"\n".join(lines) + b"\n")
    stolen.chmod(0o600)
    for path in (runtime / "other.key", stolen):
        monkeypatch.setenv(KEY_FILE_ENV, str(path))
        refused = tcp_daemon.stats()["auth_refused"]
        with Client(tcp_daemon.address, ENC, min_uses=1, timeout_ms=100) as client:
            for i in range(3):
                text = f" question {i}?"
                assert client.encode_ordinary(text, prefix=PREFIX) == enc.encode_ordinary(
                    PREFIX + text
                )
            stats = client.stats()
            assert stats["l2_hits"] == 0 and stats["fallbacks"] >= 1
        with pytest.raises(TimeoutError):
            _get(tcp_daemon.address)  # a raw request with these keys: never answered
        wait_until(
            lambda: tcp_daemon.stats()["auth_refused"] > refused,  # noqa: B023
            DEADLINE,
            "the refusal was not counted",
        )
    assert "refused a connection" in tcp_daemon.log_text()


def test_no_key_file_is_a_clear_error_and_a_local_encode(
    tcp_daemon: TcpDaemon, runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flashtoken.client import Client

    from flashtoken.wire.admin import ping

    missing = runtime / "no-such.key"
    monkeypatch.setenv(KEY_FILE_ENV, str(missing))
    with pytest.raises(DaemonUnavailable, match="cannot read the tcp:// key file"):
        ping(tcp_daemon.address)
    enc = get_encoding(ENC)
    with Client(tcp_daemon.address, ENC, min_uses=1) as client:
        assert client.encode_ordinary(" Q", prefix=PREFIX) == enc.encode_ordinary(PREFIX + " Q")
        assert client.stats()["l2_hits"] == 0
    # A key file others can read is not used either.
    loose = runtime / "loose.key"
    shutil.copy(runtime / "flashtoken" / "tcp.key", loose)
    loose.chmod(0o644)
    monkeypatch.setenv(KEY_FILE_ENV, str(loose))
    with pytest.raises(DaemonUnavailable, match="not private"):
        ping(tcp_daemon.address)


def test_the_port_is_the_lock_and_ipc_is_refused_without_ipc(
    tcp_daemon: TcpDaemon, runtime: Path
) -> None:
    base = [sys.executable, "-m", "flashtoken.daemon", "serve", "--encodings", ""]
    second = subprocess.run(
        [*base, "--bind", tcp_daemon.address], capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 1
    assert "another flashtoken-daemon may be serving it" in second.stderr
    assert tcp_daemon.alive()
    ipc = subprocess.run(
        [*base, "--bind", f"ipc://{runtime}/d.sock"], capture_output=True, text=True, timeout=60
    )
    assert ipc.returncode == 1 and "ipc:// is not available" in ipc.stderr


def test_zap_handler_answers_only_the_key_files_client() -> None:
    """The handler in-process: the right client key in, another out, garbage refused."""
    directory = short_tempdir()
    ctx = zmq.Context()
    try:
        keys = make_keys(str(directory / "k"))
        zap = ZapHandler(ctx, keys)
        server = ctx.socket(zmq.ROUTER)
        secure_server(server, "tcp://127.0.0.1:0", keys)
        server.bind("tcp://127.0.0.1:0")
        address = server.getsockopt(zmq.LAST_ENDPOINT).decode()

        def connects(public: bytes, secret: bytes) -> bool:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            sock.connect(address)
            try:
                return bool(sock.poll(1000, zmq.POLLOUT))
            finally:
                sock.close(linger=0)

        assert connects(keys.client_public, keys.client_secret)
        assert not connects(*zmq.curve_keypair())
        wait_until(lambda: zap.refused == 1, DEADLINE, "the ZAP handler never said no")
        assert zap._answer([b"junk"])[2] == b"500"
        server.close(linger=0)
        zap.stop()
    finally:
        ctx.term()
        shutil.rmtree(directory, ignore_errors=True)
