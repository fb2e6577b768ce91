"""Fixtures that run the real ``flashtoken-daemon`` in a private temp directory, and always stop it.

Loaded from tests/conftest.py (``pytest_plugins``). Every wait here has a deadline, and every
daemon started is stopped (SIGTERM, then SIGKILL) however the test ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from flashtoken.wire import (
    ALGORITHM,
    MAGIC,
    VERSION,
    PingRequest,
    StatsReply,
    StatsRequest,
    parse_reply,
)
from flashtoken.wire.auth import secure_client
from tests.polling import wait_until

START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


class DaemonProcess:
    """One daemon subprocess on ``ipc://{directory}/d.sock``."""

    def __init__(
        self,
        directory: Path,
        *args: str,
        encodings: str = "cl100k_base",
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.directory = directory
        self.path = directory / "d.sock"
        self.address = f"ipc://{self.path}"
        self.args = ["--encodings", encodings, *args]
        self.env = env
        self.preexec_fn = preexec_fn  # e.g. a lowered descriptor limit (tests/test_descriptors.py)
        self.log = directory / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "flashtoken.daemon",
            "serve",
            "--bind",
            self.address,
            *self.args,
        ]

    def start(self) -> DaemonProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=self.preexec_fn,
            )
        wait_until(self.answers, START_TIMEOUT, f"daemon never answered; log:\n{self.log_text()}")
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def answers(self) -> bool:
        if not self.alive():
            assert self.proc is not None
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
        try:
            request(self.address, PingRequest(7).frames(), timeout_ms=200)
            return True
        except TimeoutError:
            return False

    def stats(self) -> dict[str, Any]:
        frames = request(self.address, StatsRequest(8).frames(), timeout_ms=2000)
        reply = parse_reply(frames)
        assert isinstance(reply, StatsReply), reply
        return reply.stats

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(STOP_TIMEOUT)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGCONT)  # a stopped process ignores SIGTERM until resumed
                proc.terminate()
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        return proc.returncode


def request(address: str, frames: list[bytes], *, timeout_ms: int = 2000) -> list[bytes]:
    """Send raw ``frames`` on a fresh DEALER; return the reply's frames or raise TimeoutError."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        secure_client(sock, address)  # tcp://: CURVE with the key file's keys
        sock.connect(address)
        sock.send_multipart(frames)
        if not sock.poll(timeout_ms, zmq.POLLIN):
            raise TimeoutError(f"no reply within {timeout_ms} ms")
        return sock.recv_multipart()
    finally:
        sock.close(linger=0)


def header(**fields: Any) -> bytes:
    return msgpack.packb({"m": MAGIC, "v": VERSION, "a": ALGORITHM, **fields}, use_bin_type=True)


def short_tempdir() -> Path:
    # pytest's tmp_path can be longer than the 107 bytes a unix socket path may have.
    path = Path(tempfile.mkdtemp(prefix="ft-", dir="/tmp" if os.path.isdir("/tmp") else None))
    path.chmod(0o700)
    return path


@pytest.fixture
def daemon_dir() -> Iterator[Path]:
    path = short_tempdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_daemon(daemon_dir: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """``start_daemon(*args, encodings=...)`` starts a daemon; all are stopped at teardown."""
    started: list[DaemonProcess] = []

    def start(*args: str, **kwargs: Any) -> DaemonProcess:
        daemon = DaemonProcess(daemon_dir, *args, **kwargs)
        started.append(daemon)
        return daemon.start()

    try:
        yield start
    finally:
        for daemon in started:
            daemon.stop()


@pytest.fixture
def daemon(start_daemon: Callable[..., DaemonProcess]) -> DaemonProcess:
    """A fresh daemon serving cl100k_base and o200k_base."""
    return start_daemon(encodings="cl100k_base,o200k_base")


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[DaemonProcess]:
    """One daemon for a module's tests that only read and fill (cheaper than one per test)."""
    path = short_tempdir()
    daemon = DaemonProcess(path, encodings="cl100k_base,o200k_base")
    try:
        yield daemon.start()
    finally:
        daemon.stop()
        shutil.rmtree(path, ignore_errors=True)
