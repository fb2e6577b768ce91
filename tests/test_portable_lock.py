"""The platform without fcntl or a uid (Windows), forced on Linux: the daemon's single-instance
lock on an ipc:// path is then a loopback port (daemon/binding.py), and ``runtime_dir()`` names
its directory after the user. Real daemon processes, SIGKILL and restart, real clients.

``FLASHTOKEN_PRETEND_NO_FCNTL`` / ``FLASHTOKEN_PRETEND_NO_GETUID`` (flashtoken/wire/addresses.py)
make this machine behave that way, in the daemon and in this process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("zmq")

from flashtoken.client import Client  # noqa: E402
from flashtoken.daemon.binding import lock_port  # noqa: E402

from flashtoken import get_encoding  # noqa: E402
from flashtoken.wire.addresses import (  # noqa: E402
    PRETEND_NO_FCNTL_ENV,
    PRETEND_NO_GETUID_ENV,
    check_daemon_socket,
    runtime_dir,
    user_id,
)
from tests.daemon_fixtures import DaemonProcess  # noqa: E402
from tests.polling import wait_until  # noqa: E402

ENC = "cl100k_base"
PREFIX = "You are a portable assistant; answer in one line. Ünïcode 東京. " * 30
NO_FCNTL = {PRETEND_NO_FCNTL_ENV: "1"}
WINDOWS_LIKE = {PRETEND_NO_FCNTL_ENV: "1", PRETEND_NO_GETUID_ENV: "1"}


def _daemon(directory: Path, pretend: dict[str, str]) -> DaemonProcess:
    return DaemonProcess(directory, env={**os.environ, **pretend})


def _serve_again(daemon: DaemonProcess) -> subprocess.CompletedProcess[str]:
    """A second daemon on the same path, run to its end (a refusal ends it at once)."""
    assert daemon.env is not None
    return subprocess.run(
        [*daemon.command(), "--encodings", ""],
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon.env,
    )


@pytest.mark.parametrize("pretend", [NO_FCNTL, WINDOWS_LIKE], ids=["no-fcntl", "no-fcntl-no-uid"])
def test_without_fcntl_the_port_locks_the_path_and_a_kill_never_blocks_a_restart(
    daemon_dir: Path, pretend: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in pretend.items():
        monkeypatch.setenv(name, value)  # the clients of this process pretend too
    first = _daemon(daemon_dir, pretend).start()
    try:
        path = str(first.path)
        port = lock_port(path)
        # The port is held: nothing else can bind it while the daemon lives.
        with socket.socket() as probe, pytest.raises(OSError):
            probe.bind(("127.0.0.1", port))
        refused = _serve_again(first)
        assert refused.returncode == 1, refused.stderr
        assert f"another flashtoken-daemon (pid {first.pid})" in refused.stderr
        assert f"port {port}" in refused.stderr
        assert first.answers()
        enc = get_encoding(ENC)
        with Client(first.address, ENC, min_uses=1, timeout_ms=5000) as client:
            assert client.encode_ordinary(" Q?", prefix=PREFIX) == enc.encode_ordinary(
                PREFIX + " Q?"
            )
        wait_until(lambda: first.stats()["map_curr_items"] == 1, 30, "the fill never landed")

        first.kill9()
        # What it left: its socket file and its lock file, holding its pid. Neither is a lock.
        assert first.path.exists()
        assert (daemon_dir / "d.sock.lock").read_text().strip() == str(first.pid)
        second = _daemon(daemon_dir, pretend).start()
        try:
            assert (daemon_dir / "d.sock.lock").read_text().strip() == str(second.pid)
            # preload_bytes=0: the request itself reads the map (not the hot list at start).
            with Client(second.address, ENC, timeout_ms=5000, preload_bytes=0) as fresh:
                got = fresh.encode_ordinary(" again", prefix=PREFIX)
                assert got == enc.encode_ordinary(PREFIX + " again")
                assert fresh.last_source == "map"  # the killed daemon's map, reopened hot
        finally:
            second.stop()
    finally:
        first.stop()


def test_a_port_held_by_another_program_refuses_the_daemon_and_says_which(
    daemon_dir: Path,
) -> None:
    daemon = _daemon(daemon_dir, NO_FCNTL)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", lock_port(str(daemon.path))))
        squatter.listen(1)
        refused = _serve_again(daemon)
    assert refused.returncode == 1
    assert f"(its lock: port {lock_port(str(daemon.path))} on 127.0.0.1)" in refused.stderr


def test_lock_ports_are_the_same_for_every_daemon_and_below_the_ephemeral_ranges(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "d.sock")
    code = f"from flashtoken.daemon.binding import lock_port; print(lock_port({path!r}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert int(other.stdout) == lock_port(path)
    ports = {lock_port(str(tmp_path / f"d{i}.sock")) for i in range(200)}
    assert all(20000 <= p < 30000 for p in ports) and len(ports) > 150


def test_without_a_uid_the_runtime_dir_is_named_after_the_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("USER", "ada lovelace")  # getpass reads it first; a space is replaced
    monkeypatch.setenv("LOGNAME", "ada lovelace")
    monkeypatch.setenv(PRETEND_NO_GETUID_ENV, "1")
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    assert user_id() is None
    path = runtime_dir()
    assert path == str(tmp_path / "flashtoken-ada_lovelace")
    assert os.path.isdir(path)
    os.chmod(path, 0o755)  # no mode to check without a uid (the directory's ACL decides)
    assert runtime_dir() == path
    with pytest.raises(Exception, match="no flashtoken-daemon socket"):
        check_daemon_socket(f"ipc://{path}/absent.sock")
