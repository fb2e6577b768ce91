"""A real gunicorn in a subprocess for the end-to-end tests, always stopped, every wait bounded.

``GunicornProcess`` runs ``python -m gunicorn -c CONF`` on 127.0.0.1 and a free port in its own
session, so that teardown can signal the whole group (master, workers, and the sidecar the
master started) however the test ends: SIGTERM to the master, then SIGKILL to the group, then
SIGKILL to any daemon pid the test saw.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from tests.polling import poll, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
START_TIMEOUT = 45.0
STOP_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _gunicorn_version() -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in metadata.version("gunicorn").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return (0,)


class GunicornProcess:
    def __init__(
        self, conf: Path, directory: Path, *args: str, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.directory = directory
        self.log = directory / "gunicorn.log"
        extra = []
        if _gunicorn_version() >= (25, 1):
            extra.append("--no-control-socket")  # else it binds one under $HOME
        self.cmd = [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(conf),
            "-b",
            f"127.0.0.1:{self.port}",
            *extra,
            *args,
        ]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("FLASHTOKEN_ADDRESS", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.daemon_pids: set[int] = set()

    def start(self, ready: Callable[[], bool] | None = None) -> GunicornProcess:
        """Start; wait until ``ready()`` (default: GET /stats shows the daemon)."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.directory,
                start_new_session=True,
            )
        try:
            wait_until(
                lambda: self._alive() and (ready or self._ready)(),
                START_TIMEOUT,
                "gunicorn never answered",
                interval=0.1,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{self.log_text()}") from None
        return self

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log_text()}")
        return True

    def _ready(self) -> bool:
        try:
            status, body = self.request("GET", "/stats", timeout=2.0)
        except OSError:
            return False
        sidecar = body.get("strategy") == "sidecar"
        return status == 200 and (not sidecar or body.get("daemon") is not None)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def request(
        self, method: str, path: str, payload: Any = None, timeout: float = 10.0
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            body = (
                None
                if payload is None
                else (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
            )
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            try:
                return response.status, json.loads(data)
            except ValueError:
                return response.status, data
        finally:
            conn.close()

    def tokenize(self, **fields: Any) -> tuple[int, Any]:
        return self.request("POST", "/tokenize", fields)

    def stats(self) -> dict[str, Any]:
        status, body = self.request("GET", "/stats")
        assert status == 200, body
        daemon = body.get("daemon")
        if daemon:
            self.daemon_pids.add(daemon["stats"]["pid"])
        return body

    def daemon_stats(self) -> dict[str, Any] | None:
        daemon = self.stats().get("daemon")
        return daemon["stats"] if daemon else None

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers left behind, if any
        except (ProcessLookupError, PermissionError):
            pass
        if proc.poll() is None:
            proc.wait(STOP_TIMEOUT)
        deadline = time.monotonic() + 3.0
        for pid in self.daemon_pids:  # in a session of its own: not in the group above
            # A daemon whose master is gone exits by itself within ~1 s.
            poll(lambda: not alive(pid), max(0.0, deadline - time.monotonic()), 0.05)  # noqa: B023
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return proc.returncode
