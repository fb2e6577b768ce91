"""Everything the benchmark needs from the daemon and its client, in one place.

The benchmark starts its own ``flashtoken-daemon`` on an ``ipc://`` socket in a private temporary
directory and always stops it. If the daemon or client package is missing (or cannot start), the
daemon strategies are skipped and the reason lands in results.json and summary.md; the rest of the
benchmark still runs.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

DEFAULT_MAX_BYTES = "512MiB"


def unavailable_reason() -> str | None:
    """Why the daemon strategies cannot run here, or None if they can."""
    try:
        import flashtoken.client as client_pkg
        import flashtoken.daemon  # noqa: F401
    except ImportError as exc:
        return (
            f"flashtoken.daemon / flashtoken.client not importable ({exc}); "
            "install the 'daemon' extra"
        )
    if not hasattr(client_pkg, "Client"):
        return "flashtoken.client has no Client yet (the client package is not finished)"
    try:
        import importlib.util

        if importlib.util.find_spec("flashtoken.daemon.__main__") is None:
            return "flashtoken.daemon has no __main__ (the daemon package is not finished)"
    except ImportError as exc:
        return f"flashtoken.daemon is not runnable ({exc})"
    return None


def make_client(
    address: str,
    encoding: str,
    *,
    l1_bytes: int | None = None,
    timeout_ms: int | None = None,
    backend: str | None = None,
) -> Any:
    """A ``flashtoken.client.Client`` with the client's own defaults unless told otherwise.

    The option names are checked against what the installed client accepts, so a renamed option
    fails here with a clear message rather than deep inside a worker.
    """
    from flashtoken.client import Client

    accepted = {
        n for n, p in inspect.signature(Client).parameters.items() if p.kind is not p.VAR_KEYWORD
    }
    try:
        from flashtoken.client.core import CLIENT_DEFAULTS

        accepted |= set(CLIENT_DEFAULTS)
    except ImportError:
        pass
    kwargs: dict[str, Any] = {}
    for name, value in (("l1_bytes", l1_bytes), ("timeout_ms", timeout_ms), ("backend", backend)):
        if value is not None:
            if name not in accepted:
                raise RuntimeError(f"the installed Client takes no {name!r} option")
            kwargs[name] = value
    return Client(address, encoding=encoding, **kwargs)


def client_stats(client: Any) -> dict[str, Any]:
    try:
        return dict(client.stats())
    except Exception as exc:  # noqa: BLE001 - stats are informative only
        return {"error": repr(exc)}


def warm(client: Any, prefix: str, timeout_s: float = 10.0) -> bool:
    """Call the client until a request on ``prefix`` is a cache hit (L1 or L2), or it shows the
    prefix is too short for the client to share (never asked for); False on timeout.

    The first request is a miss: the client encodes locally and asks the daemon to fill.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        before = client_stats(client)
        client.encode_ordinary("warm-up", prefix=prefix)
        after = client_stats(client)
        if any(after.get(k, 0) > before.get(k, 0) for k in ("l1_hits", "l2_hits")):
            return True
        if after.get("short_prefixes", 0) > before.get("short_prefixes", 0):
            return True  # too short to share (SHARE_MIN_BYTES): the client never asks for it
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def rss_kib(pid: int | str = "self") -> int | None:
    """Resident set size of a process in KiB (VmRSS in /proc/PID/status), None if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pss_kib(pid: int | str = "self") -> int | None:
    """Proportional set size of a process in KiB (Pss in /proc/PID/smaps_rollup), None if
    unknown: each page counts 1/n in each of the n processes that map it, so the PSS of all the
    processes sharing a mapping sums to that mapping once (RSS would count it n times)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Daemon:
    """A daemon of our own on a temporary ``ipc://`` socket; use as a context manager."""

    def __init__(
        self,
        encodings: tuple[str, ...] = ("cl100k_base",),
        max_bytes: str = DEFAULT_MAX_BYTES,
        fill_threads: int = 2,
        backend: str = "tiktoken",
    ) -> None:
        self._dir = tempfile.mkdtemp(prefix="flashtoken-bench-")
        os.chmod(self._dir, 0o700)
        self.address = f"ipc://{self._dir}/daemon.sock"
        self._log = open(os.path.join(self._dir, "daemon.log"), "w+b")
        self._args = [
            sys.executable,
            "-m",
            "flashtoken.daemon",
            "serve",
            "--bind",
            self.address,
            "--max-bytes",
            max_bytes,
            "--encodings",
            ",".join(encodings),
            "--fill-threads",
            str(fill_threads),
            "--backend",
            backend,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Daemon:
        self.proc = subprocess.Popen(
            self._args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the daemon exited with {self.proc.returncode}: {self.log_tail()}"
                )
            if os.path.exists(self.address[len("ipc://") :]):
                try:
                    client = make_client(self.address, "cl100k_base")
                    try:
                        client.daemon_stats()
                        return
                    finally:
                        client.close()
                except Exception as exc:  # noqa: BLE001 - not ready yet
                    last = exc
            time.sleep(0.05)
        raise RuntimeError(
            f"the daemon did not answer within {timeout_s} s ({last!r}): {self.log_tail()}"
        )

    def log_tail(self, n: int = 2000) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-n:]

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def stats(self) -> dict[str, Any]:
        client = make_client(self.address, "cl100k_base")
        try:
            return dict(client.daemon_stats())
        finally:
            client.close()

    def rss_kib(self) -> int | None:
        return None if self.pid is None else rss_kib(self.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.stop()
