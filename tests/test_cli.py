"""Settings and the command line: options checked where they enter, with messages that say the
fix; ``flashtoken-daemon``'s flags, environment variables, ``--help``, ``--version`` and
``stats`` formats, run as a user runs them (a real subprocess, a real daemon).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from flashtoken.client import AsyncClient, Client
from flashtoken.client.gunicorn import SidecarSettings, Supervisor, hooks
from flashtoken.client.supervisor import status
from flashtoken.daemon.settings import SETTINGS, Config

from tests.daemon_fixtures import DaemonProcess, wait_until


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FLASHTOKEN_* setting from the caller's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("FLASHTOKEN_") and name != "FLASHTOKEN_HYPOTHESIS_EXAMPLES":
            monkeypatch.delenv(name)


def cli(
    *args: str, env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLASHTOKEN_")}
    kwargs.setdefault("stdout", subprocess.PIPE)  # or a file descriptor: a closed pipe's end
    return subprocess.run(
        [sys.executable, "-m", "flashtoken.daemon", *args],
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        **kwargs,
    )


# -- the clients' options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error, message",
    [
        (
            {"timeout_ms": math.inf},
            ValueError,
            r"timeout_ms must be a finite number.*timeout_ms=20",
        ),
        ({"timeout_ms": 0}, ValueError, r"timeout_ms must be > 0 and <= 3600000, not 0"),
        ({"timeout_ms": -5}, ValueError, r"timeout_ms must be > 0"),
        ({"timeout_ms": "20"}, TypeError, r"timeout_ms must be a number of milliseconds"),
        ({"breaker_cooldown_ms": math.nan}, ValueError, r"breaker_cooldown_ms must be a finite"),
        ({"breaker_max_cooldown_ms": 1e308}, ValueError, r"breaker_max_cooldown_ms must be >= 0"),
        ({"breaker_cooldown_ms": 900, "breaker_max_cooldown_ms": 800}, ValueError, r"at least"),
        ({"breaker_failures": 0}, ValueError, r"breaker_failures must be >= 1"),
        ({"breaker_failures": 2.5}, TypeError, r"breaker_failures must be an int"),
        (
            {"l1_bytes": -1},
            ValueError,
            r"l1_bytes must be >= 0, not -1; e.g. l1_bytes=67108864 \(64MiB\)$",
        ),
        ({"l1_bytes": "64MiB"}, TypeError, r"l1_bytes must be an int.*parse_size"),
        ({"l1_bytes": True}, TypeError, r"l1_bytes must be an int"),
        ({"max_prefix_bytes": 8 * 2**20}, ValueError, r"max_prefix_bytes must be >= 0 and <= 4MiB"),
        ({"auto_block_bytes": 8}, ValueError, r"auto_block_bytes must be >= 16"),
        ({"follow": "yes"}, TypeError, r"follow must be True or False"),
        ({"namespace": 5}, TypeError, r"namespace must be a str or bytes"),
        # Explicit keywords (mypy or an IDE flags the call first); the error names the setting.
        ({"timeout": 20}, TypeError, r"'timeout' \(did you mean 'timeout_ms'\?\)"),
        ({"l1bytes": 1}, TypeError, r"'l1bytes' \(did you mean 'l1_bytes'\?\)"),
        ({"nothing_like_it": 1}, TypeError, r"unexpected keyword arguments: 'nothing_like_it';"),
        ({"address": "ipc://@flashtoken"}, ValueError, r"abstract unix socket"),
        ({"address": "ipc://relative.sock"}, ValueError, r"not an absolute path"),
        ({"address": "localhost:7000"}, ValueError, r"not an ipc:// or tcp:// address"),
        ({"address": "tcp://127.0.0.1"}, ValueError, r"tcp://HOST:PORT"),
        ({"address": "ipc:///" + "x" * 120}, ValueError, r"longer than 107 bytes"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
@pytest.mark.parametrize("cls", [Client, AsyncClient], ids=["Client", "AsyncClient"])
def test_bad_client_options_fail_at_construction(
    cls: type, options: dict[str, Any], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        cls(**options)


def test_namespace_may_be_str(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/none.sock"
    with Client(address, namespace="tenant-a") as a, Client(address, namespace=b"tenant-a") as b:
        assert a._core.namespace == b._core.namespace == b"tenant-a"
        assert a.encode_ordinary(" hi", prefix="Hello") == b.encode_ordinary(" hi", prefix="Hello")


def test_client_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    address = f"ipc://{tmp_path}/env.sock"
    monkeypatch.setenv("FLASHTOKEN_ADDRESS", address)
    monkeypatch.setenv("FLASHTOKEN_TIMEOUT_MS", "35")
    monkeypatch.setenv("FLASHTOKEN_L1_BYTES", "1MiB")
    monkeypatch.setenv("FLASHTOKEN_FOLLOW", "no")
    monkeypatch.setenv("FLASHTOKEN_ENCODING", "o200k_base")
    monkeypatch.setenv("FLASHTOKEN_NAMESPACE", "tenant-b")
    with Client() as client:
        assert client.address == address
        assert client.encoding.name == "o200k_base"
        assert client._core.timeout == pytest.approx(0.035)
        assert client._core.l1.limit == 2**20
        assert client._core.follow is False
        assert client._core.namespace == b"tenant-b"
    # An explicit argument wins over the variable.
    with Client(timeout_ms=50, encoding="cl100k_base") as client:
        assert client._core.timeout == pytest.approx(0.05)
        assert client.encoding.name == "cl100k_base"

    async def make() -> float:
        async with AsyncClient() as client:
            return client._core.timeout

    assert asyncio.run(make()) == pytest.approx(0.035)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("FLASHTOKEN_TIMEOUT_MS", "inf", "finite"),
        ("FLASHTOKEN_TIMEOUT_MS", "fast", "not a number of milliseconds"),
        ("FLASHTOKEN_L1_BYTES", "lots", "not a size"),
        ("FLASHTOKEN_FOLLOW", "maybe", "not a flag"),
        ("FLASHTOKEN_ADDRESS", "ipc://@x", "abstract"),
    ],
)
def test_a_bad_environment_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"environment variable {name}=.*({message})"):
        Client()


def test_gunicorn_hooks_check_options_when_the_config_is_read() -> None:
    with pytest.raises(ValueError, match="timeout_ms must be a finite"):
        hooks(client_options={"timeout_ms": math.inf})
    with pytest.raises(TypeError, match=r"did you mean 'timeout_ms'"):
        hooks(client_options={"timeout": 5})
    with pytest.raises(ValueError, match="not a size"):
        hooks(max_bytes="lots")
    with pytest.raises(ValueError, match="abstract"):
        hooks(address="ipc://@x")
    with pytest.raises(TypeError, match="SidecarSettings"):
        hooks(max_byte="1GiB")


# -- the daemon's settings -------------------------------------------------------------------


def test_daemon_config_is_checked() -> None:
    with pytest.raises(ValueError, match="abstract unix socket"):
        Config(bind="ipc://@flashtoken")
    with pytest.raises(ValueError, match="fill_threads must be >= 1"):
        Config(bind="ipc:///tmp/x.sock", fill_threads=0)
    with pytest.raises(TypeError, match="max_bytes must be an int"):
        Config(bind="ipc:///tmp/x.sock", max_bytes="512MiB")
    with pytest.raises(ValueError, match="log_level must be one of"):
        Config(bind="ipc:///tmp/x.sock", log_level="LOUD")
    assert Config(bind="ipc:///tmp/x.sock", encodings=["a", "b"]).encodings == ("a", "b")


def test_the_protocol_limit_is_the_settings_limit() -> None:
    from flashtoken.daemon.settings import MAX_PREFIX_BYTES

    from flashtoken.wire import MAX_PREFIX_BYTES as PROTOCOL_LIMIT

    assert MAX_PREFIX_BYTES == PROTOCOL_LIMIT


@pytest.mark.parametrize(
    "address, message",
    [
        ("ipc://@name", "abstract unix socket"),
        ("ipc://relative/d.sock", "not an absolute path"),
        ("unix:///tmp/x.sock", "not an ipc:// or tcp:// address"),
        ("tcp://localhost", "tcp://HOST:PORT"),
    ],
)
def test_bad_bind_is_a_usage_error_not_a_traceback(address: str, message: str) -> None:
    proc = cli("serve", "--bind", address)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_bad_environment_variable_is_a_usage_error() -> None:
    proc = cli("serve", env={"FLASHTOKEN_MAX_BYTES": "12x"})
    assert proc.returncode == 2
    assert "FLASHTOKEN_MAX_BYTES" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("serve", env={"FLASHTOKEN_ADDRESS": "ipc://@x"})
    assert proc.returncode == 2 and "abstract" in proc.stderr, proc.stderr


def test_version() -> None:
    import tiktoken

    import flashtoken

    proc = cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"flashtoken-daemon {flashtoken.__version__} ")
    assert f"tiktoken {tiktoken.__version__}" in proc.stdout


def test_serve_help_is_readable() -> None:
    proc = cli("serve", "--help")
    assert proc.returncode == 0
    text = proc.stdout
    for setting in SETTINGS:
        assert setting.flag in text and setting.env in text, setting.name
    assert "default: 512MiB" in text and "default: 4MiB" in text
    assert "default: cl100k_base,o200k_base" in text
    for raw in ("536870912", "4194304", "('", "{tempdir}", "None", "unit:"):
        assert raw not in text, raw


def test_help_at_the_top_names_the_commands() -> None:
    proc = cli("--help")
    assert proc.returncode == 0 and "serve" in proc.stdout and "stats" in proc.stdout


# -- a real daemon: the environment, stats formats -----------------------------------------------


def _env_daemon(directory: Path, **env: str) -> DaemonProcess:
    """A daemon configured only through environment variables (no --bind)."""
    daemon = DaemonProcess(directory, encodings="cl100k_base")
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLASHTOKEN_")}
    daemon.env = {**base, "FLASHTOKEN_ADDRESS": daemon.address, **env}
    daemon.command = lambda: [sys.executable, "-m", "flashtoken.daemon", *daemon.args]
    return daemon


def test_daemon_settings_from_the_environment(daemon_dir: Path) -> None:
    daemon = _env_daemon(daemon_dir, FLASHTOKEN_MAX_BYTES="3MiB", FLASHTOKEN_HWM="77")
    try:
        daemon.start()
        reply = cli("stats", "--format", "json", env={"FLASHTOKEN_ADDRESS": daemon.address})
        assert reply.returncode == 0, reply.stderr
        settings = json.loads(reply.stdout)["settings"]
        assert settings["bind"] == daemon.address
        assert settings["max_bytes"] == 3 * 2**20 and settings["hwm"] == 77
        # A flag wins over the variable.
        assert settings["encodings"] == ["cl100k_base"]
    finally:
        daemon.stop()


_SAMPLE = re.compile(r"^flashtoken_[a-z0-9_]+(\{[a-z_]+=\"[^\"]*\"(,[a-z_]+=\"[^\"]*\")*\})? -?\d")


def test_stats_formats(shared_daemon: DaemonProcess) -> None:
    with Client(shared_daemon.address, timeout_ms=2000, min_uses=1) as client:
        client.encode_ordinary(" x", prefix="A prefix for the stats test.")
    memcached = cli("stats", "--bind", shared_daemon.address)
    assert memcached.returncode == 0, memcached.stderr
    assert re.search(r"^STAT cmd_get \d+$", memcached.stdout, re.M)
    assert re.search(r"^SETTING max_bytes \d+$", memcached.stdout, re.M)

    as_json = json.loads(cli("stats", "--bind", shared_daemon.address, "--json").stdout)
    assert as_json["stats"]["cmd_get"] >= 1

    prom = cli("stats", "--bind", shared_daemon.address, "--format", "prometheus")
    assert prom.returncode == 0, prom.stderr
    lines = prom.stdout.splitlines()
    samples = [line for line in lines if not line.startswith("#")]
    assert samples and all(_SAMPLE.match(line) for line in samples), samples
    for name in ("get_hits", "get_misses", "fills", "evictions"):
        assert any(s.startswith(f"flashtoken_{name}_total ") for s in samples), name
    assert any(s.startswith("flashtoken_bytes ") for s in samples)
    assert "# TYPE flashtoken_get_hits_total counter" in lines
    assert "# TYPE flashtoken_curr_items gauge" in lines


def test_stats_into_a_closed_pipe_is_quiet(shared_daemon: DaemonProcess) -> None:
    """``stats --json | head -c1``: the reader is gone; no BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # every write now fails with EPIPE, as after `head` has exited
    try:
        proc = cli("stats", "--bind", shared_daemon.address, "--json", stdout=write)
    finally:
        os.close(write)
    assert proc.returncode == 0
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_settings_into_a_closed_pipe_is_quiet() -> None:
    """``settings | head -5``: the same, for the command that prints line by line."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = cli("settings", stdout=write)
    finally:
        os.close(write)
    assert proc.returncode == 0
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_stats_without_a_daemon(tmp_path: Path) -> None:
    proc = cli("stats", "--bind", f"ipc://{tmp_path}/nobody.sock", "--timeout-ms", "200")
    assert proc.returncode == 1
    assert "flashtoken-daemon stats:" in proc.stderr and "Traceback" not in proc.stderr


# -- the gunicorn supervisor's account of a dead daemon ------------------------------------------


def test_supervisor_reports_the_signal_that_killed_the_daemon() -> None:
    """gunicorn reaps every child with waitpid(-1); ``collect`` (run before it, on SIGCHLD)
    keeps the daemon's status, so the log can say what happened."""
    supervisor = Supervisor(SidecarSettings(), "ipc:///unused.sock")
    proc = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    supervisor.proc = proc
    try:
        os.kill(proc.pid, signal.SIGKILL)

        def collected() -> bool:
            supervisor.collect()
            return proc.pid in supervisor._reaped

        wait_until(collected, 30, "the killed child was never reaped")
        # What gunicorn's waitpid(-1) leaves behind: Popen sees ECHILD and says 0.
        assert proc.poll() == 0
        assert status(supervisor.exit_code(proc)) == "killed by SIGKILL"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status(3) == "status 3" and status(0) == "status 0"


# -- one table of settings in the docs -------------------------------------------------------------


def test_the_docs_settings_tables_are_the_code() -> None:
    """docs/INTEGRATION.md's tables are `flashtoken-daemon settings --markdown`, verbatim."""
    from flashtoken.daemon.__main__ import settings_markdown

    text = (Path(__file__).resolve().parents[1] / "docs" / "INTEGRATION.md").read_text()
    match = re.search(
        r"<!-- BEGIN generated by `flashtoken-daemon settings --markdown` -->\n(.*?)"
        r"<!-- END generated -->",
        text,
        re.S,
    )
    assert match, "the generated settings section is missing from docs/INTEGRATION.md"
    assert match.group(1) == settings_markdown(), (
        "docs/INTEGRATION.md's settings tables are stale: paste the output of"
        " `flashtoken-daemon settings --markdown` between the markers"
    )


def test_settings_command_shows_the_environment() -> None:
    proc = cli("settings", env={"FLASHTOKEN_TIMEOUT_MS": "45", "FLASHTOKEN_MAX_BYTES": "1GiB"})
    assert proc.returncode == 0, proc.stderr
    assert "timeout_ms = 45  (from FLASHTOKEN_TIMEOUT_MS)" in proc.stdout
    assert "max_bytes = 1GiB  (from FLASHTOKEN_MAX_BYTES)" in proc.stdout
    assert "l1_bytes = 64MiB  (default)" in proc.stdout


def test_the_master_loads_every_configured_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    from flashtoken.client.warmup import encoding_names as _warm_names

    assert _warm_names(SidecarSettings()) == ["cl100k_base", "o200k_base"]
    chosen = SidecarSettings(encoding="o200k_harmony", encodings=["cl100k_base", "o200k_harmony"])
    assert _warm_names(chosen) == ["o200k_harmony", "cl100k_base"]
    monkeypatch.setenv("FLASHTOKEN_ENCODINGS", "o200k_base")
    assert _warm_names(SidecarSettings()) == ["cl100k_base", "o200k_base"]
    monkeypatch.setenv("FLASHTOKEN_ENCODINGS", "p50k_base,cl100k_base")
    assert _warm_names(SidecarSettings()) == ["cl100k_base", "p50k_base"]
    monkeypatch.setenv("FLASHTOKEN_ENCODING", "o200k_base")  # as Client() reads it
    assert _warm_names(SidecarSettings())[0] == "o200k_base"
    assert SidecarSettings(encoding="cl100k_base").encoding_name() == "cl100k_base"


def test_metrics_endpoint(daemon_dir: Path) -> None:
    """``serve --metrics-port``: Prometheus text at 127.0.0.1:PORT/metrics, from the daemon."""
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as probe:  # a free port (released before the daemon binds it)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = DaemonProcess(daemon_dir, "--metrics-port", str(port), encodings="cl100k_base")
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        daemon.start()
        with Client(daemon.address, timeout_ms=2000, min_uses=1) as client:
            client.encode_ordinary(" x", prefix="A prefix for the metrics test.")

        def scraped() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    scraped.text = response.read().decode()  # type: ignore[attr-defined]
                    scraped.type = response.headers["Content-Type"]  # type: ignore[attr-defined]
                    return True
            except OSError:
                return False

        wait_until(scraped, 30, f"no answer at {url}:\n{daemon.log_text()}")
        text: str = scraped.text  # type: ignore[attr-defined]
        assert scraped.type.startswith("text/plain; version=0.0.4")  # type: ignore[attr-defined]
        assert re.search(r"^flashtoken_cmd_get_total [1-9]\d*$", text, re.M), text
        for name in ("get_hits_total", "get_misses_total", "fills_total", "evictions_total"):
            assert re.search(rf"^flashtoken_{name} \d+$", text, re.M), name
        assert re.search(r"^flashtoken_bytes \d+$", text, re.M)
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
        assert missing.value.code == 404
        missing.value.close()
    finally:
        daemon.stop()


def test_metrics_port_in_use_is_reported(daemon_dir: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli("serve", "--bind", f"ipc://{daemon_dir}/d.sock", "--metrics-port", str(port))
    assert proc.returncode == 1
    assert "cannot serve metrics on 127.0.0.1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (daemon_dir / "d.sock").exists()


def test_json_logs(daemon_dir: Path) -> None:
    daemon = DaemonProcess(daemon_dir, "--log-format", "json", encodings="cl100k_base")
    try:
        daemon.start()
    finally:
        daemon.stop()
    records = [json.loads(line) for line in daemon.log_text().splitlines() if line.strip()]
    assert records, "no log records"
    assert {"time", "level", "logger", "pid", "message"} <= set(records[0])
    assert any("serving ipc://" in r["message"] for r in records)
    assert all(r["time"].endswith("Z") for r in records)


def test_warm_prefixes_are_in_every_new_workers_cache(tmp_path: Path) -> None:
    """The master encodes ``warm_prefixes`` once; ``post_fork`` seeds each worker's client, so
    its first request with one is an L1 hit, with tiktoken's exact tokens."""
    import flashtoken.client.gunicorn as g

    from flashtoken import get_encoding

    system = "You are Atlas, a careful assistant. Règles: précis. 规则 " * 30

    class Log:
        def __init__(self) -> None:
            self.warnings: list[Any] = []

        def warning(self, *args: Any) -> None:
            self.warnings.append(args)

        info = warning

    class Server:
        log = Log()

    saved = (g._state.settings, g._state.configured, g._state.address, list(g._state.warm))
    try:
        g.hooks(spawn=False, address=f"ipc://{tmp_path}/none.sock", warm_prefixes=[system])
        g._state.address = None
        g._warm(Server())
        g.post_fork(Server(), object())
        client = g.get_client()
        assert client._core.counters["l1_hits"] == 0
        tokens = client.encode_ordinary(" Hi 👋", prefix=system)
        assert tokens == get_encoding("cl100k_base").encode_ordinary(system + " Hi 👋")
        assert client._core.counters["l1_hits"] == 1 and client._core.counters["fallbacks"] == 0
        assert Server.log.warnings == []
    finally:
        g.close_clients()
        g._state.clients.clear()
        g._state.settings, g._state.configured, g._state.address, g._state.warm = saved
    with pytest.raises(TypeError, match="warm_prefixes must be a list of str"):
        hooks(warm_prefixes=system)
