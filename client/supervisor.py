"""The daemon as a supervised child of gunicorn's master: started, watched, restarted, stopped.

Used by the hooks in client/gunicorn.py (``on_starting`` spawns, ``when_ready`` starts the
watching thread, ``on_exit`` stops). Nothing here imports gunicorn or zmq: a zmq context made in
the master would be inherited by every worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flashtoken.wire import ipc_path

if TYPE_CHECKING:
    from .sidecar_settings import SidecarSettings

__all__ = ["Supervisor", "install_fork_guard", "status"]


class Supervisor:
    """The daemon as a child of this process, restarted whenever it exits, until ``stop()``.

    A thread polls the child (``Popen.poll`` every 0.2 s) rather than waiting on SIGCHLD:
    gunicorn's master owns SIGCHLD and reaps *every* child with ``waitpid(-1)``, ours included,
    throwing the status away (``poll`` then sees ECHILD and reports 0). So ``on_starting`` puts
    ``collect`` in front of the arbiter's ``reap_workers``: it reaps the daemon first and keeps
    its status, and the log says "killed by SIGKILL" rather than guessing.
    """

    POLL_S = 0.2
    HEALTHY_AFTER_S = 30.0  # a daemon that lived this long resets the back-off

    def __init__(self, settings: SidecarSettings, bind: str, log: Any = None) -> None:
        self.settings = settings
        self.bind = bind
        self.log = log
        self.owner = os.getpid()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._reaped: dict[int, int] = {}  # pid -> exit code, for children reaped by collect()

    # -- life cycle ---------------------------------------------------------------------------

    def spawn(self) -> subprocess.Popen[bytes]:
        cmd = self.settings.daemon_command(self.bind)
        log_file = self.settings.daemon_log
        out = open(log_file, "ab") if log_file else None  # noqa: SIM115 - handed to the child
        try:
            # Held against os.fork() in the master (see _SPAWN_LOCK), so that no worker forked at
            # this moment inherits Popen's internal pipe and stalls it until that worker exits.
            with _SPAWN_LOCK:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    close_fds=True,
                    # Its own session: a Ctrl-C meant for gunicorn reaches the master, which stops
                    # the daemon in on_exit; the terminal must not kill it behind the supervisor's
                    # back. A dead master is noticed by the daemon itself (--exit-with-parent).
                    start_new_session=True,
                )
        finally:
            if out is not None:
                out.close()
        self.proc, self.started_at = proc, time.monotonic()
        self._info("flashtoken-daemon started (pid %d) on %s", proc.pid, self.bind)
        return proc

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the daemon has bound its socket; False if it did not within ``timeout_s``.

        The socket file appears once the daemon has loaded its encodings, taken its lock and
        bound. A file older than this daemon is a stale one that the daemon is about to remove.
        No zmq here: a zmq context made in the master would be inherited by every worker.
        """
        path = ipc_path(self.bind)
        if path is None:
            return True  # tcp://: nothing to watch; the clients' breakers cover the start
        since = time.time() - 1.0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self.proc
            if proc is None or proc.poll() is not None:
                return False
            try:
                if os.stat(path).st_ctime >= since:
                    return True
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        return False

    def start_watching(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._watch, name="flashtoken-supervisor", daemon=True
            )
            self._thread.start()

    def stop(self) -> int | None:
        """Stop watching, then the daemon: SIGTERM, SIGKILL after ``stop_timeout_s``."""
        if os.getpid() != self.owner:
            return None  # a forked worker holds a copy of this object: never act from there
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.settings.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self._info("flashtoken-daemon (pid %d) ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait(self.settings.stop_timeout_s)
        self._info("flashtoken-daemon (pid %d) stopped", proc.pid)
        return proc.returncode

    def collect(self) -> None:
        """Reap the daemon if it has exited, keeping its exit code (see the class docstring).

        Runs in gunicorn's SIGCHLD handling, before gunicorn's own ``waitpid(-1)``. Kept apart
        from ``Popen.returncode``, which ``Popen.poll`` in the watching thread may set to 0 on
        ECHILD at the same moment."""
        proc = self.proc
        if proc is None or proc.returncode is not None or os.getpid() != self.owner:
            return
        try:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:
            return  # reaped already (by Popen.poll, which then has the status)
        if pid == proc.pid:
            self._reaped[pid] = os.waitstatus_to_exitcode(status)

    def exit_code(self, proc: subprocess.Popen[bytes]) -> int | None:
        """``proc``'s exit code, also when ``collect`` reaped it (``Popen`` then says 0)."""
        return self._reaped.pop(proc.pid, proc.returncode)

    def _watch(self) -> None:
        delay = self.settings.restart_delay_s
        while not self._stopping.wait(self.POLL_S):
            proc = self.proc
            if proc is None or proc.poll() is None:
                continue
            lived = time.monotonic() - self.started_at
            if lived > self.HEALTHY_AFTER_S:
                delay = self.settings.restart_delay_s
            self._warning(
                "flashtoken-daemon (pid %d) exited (%s) after %.1f s; restarting in"
                " %.1f s (workers encode locally meanwhile)",
                proc.pid,
                status(self.exit_code(proc)),
                lived,
                delay,
            )
            if self._stopping.wait(delay):
                return
            try:
                self.spawn()
                self.restarts += 1
            except OSError as exc:
                self._warning("cannot start flashtoken-daemon: %s", exc)
            delay = min(delay * 2, self.settings.max_restart_delay_s)

    def _info(self, msg: str, *args: Any) -> None:
        if self.log is not None:
            self.log.info(msg, *args)

    def _warning(self, msg: str, *args: Any) -> None:
        if self.log is not None:
            self.log.warning(msg, *args)


def status(code: int | None) -> str:
    """How the log describes an exit code (``Popen.returncode``)."""
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"status {code}"


# -- fork safety of the master's supervisor thread ----------------------------------------------
#
# gunicorn forks workers from the master's main thread while the supervisor thread may be inside
# subprocess.Popen. A worker forked then inherits Popen's error pipe (CLOEXEC only helps at exec,
# and workers never exec), and Popen in the master waits for that pipe's EOF, i.e. for the worker
# to exit. An RLock held around Popen and taken before every os.fork() (register_at_fork) keeps
# the two apart. Rejected: restarting from a gunicorn hook on the main thread (no hook runs
# periodically in the master), and forking the daemon from the main thread only (it dies at any
# time, not when a hook runs).

_SPAWN_LOCK = threading.RLock()
_fork_guard_installed = False


def install_fork_guard(after_in_child: Callable[[], None] | None = None) -> None:
    """Take ``_SPAWN_LOCK`` around every ``os.fork()`` of this process (once per process);
    in a child, fresh locks, and ``after_in_child`` (the hooks reset their own lock there)."""
    global _fork_guard_installed
    if _fork_guard_installed:
        return
    _fork_guard_installed = True

    def in_child() -> None:
        global _SPAWN_LOCK
        _SPAWN_LOCK = threading.RLock()
        if after_in_child is not None:
            after_in_child()

    os.register_at_fork(
        before=lambda: _SPAWN_LOCK.acquire(),
        after_in_parent=lambda: _SPAWN_LOCK.release(),
        after_in_child=in_child,
    )
