"""End to end: a real gunicorn (4 workers) from the example configs, with the sidecar the master
runs (flashtoken.client.gunicorn), answering POST /tokenize with tiktoken's exact tokens.

Every server is started in a temp dir, on 127.0.0.1 and a free port, and stopped however the
test ends (tests/http_helpers.py). Request loops are bounded in count and time.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flashtoken import get_encoding
from tests.corpus import CORPUS
from tests.daemon_fixtures import short_tempdir
from tests.http_helpers import EXAMPLES, GunicornProcess, alive, fd_count, wait_until
from tests.strategies import ATOMS

pytest.importorskip("gunicorn")
pytestmark = pytest.mark.timeout(120)

WSGI_CONF = EXAMPLES / "gunicorn" / "gunicorn.conf.py"
ASGI_CONF = EXAMPLES / "asgi" / "gunicorn.conf.py"
SYSTEM = (
    "You are Atlas, a careful assistant. Answer in full sentences; cite sources. "
    "Règles: soyez précis. 规则：准确。 Rules 1-12 apply.\n"
) * 24  # ~2.6 KiB


@pytest.fixture
def tmpdir_short() -> Iterator[Path]:
    path = short_tempdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _serve(conf: Path, directory: Path, *args: str, **kwargs: Any) -> GunicornProcess:
    # A short graceful timeout: a worker still booting when SIGTERM comes misses it (gunicorn
    # installs its handlers after the boot), and shutdown would wait the full default.
    return GunicornProcess(conf, directory, "-w", "4", "--graceful-timeout", "3", *args, **kwargs)


@pytest.fixture(scope="module")
def server() -> Iterator[GunicornProcess]:
    """The WSGI example from its own config: 4 sync workers, the daemon in a private dir."""
    directory = short_tempdir()
    proc = _serve(WSGI_CONF, directory)
    try:
        yield proc.start()
    finally:
        proc.stop()
        shutil.rmtree(directory, ignore_errors=True)


def expected(encoding: str, prefix: str, suffix: str, allowed: Any) -> tuple[int, Any]:
    enc = get_encoding(encoding)
    try:
        return 200, enc.encode(
            prefix + suffix, allowed_special=allowed if allowed == "all" else set(allowed)
        )
    except ValueError as exc:
        return 400, str(exc)


def check(
    server: GunicornProcess, encoding: str, prefix: str, suffix: str, allowed: Any = None
) -> str:
    fields: dict[str, Any] = {"encoding": encoding, "prefix": prefix, "suffix": suffix}
    if allowed is not None:
        fields["allowed_special"] = allowed
    status, body = server.tokenize(**fields)
    want_status, want = expected(encoding, prefix, suffix, allowed or [])
    assert status == want_status, (fields, body)
    if status == 200:
        assert body["tokens"] == want, fields
        assert body["source"] in ("l1", "daemon", "local")
        return body["source"]
    assert body["error"] == want
    return "error"


def requests_for(seed: int, n_random: int) -> list[tuple[str, str, str, Any]]:
    """Adversarial splits (the boundary corpus behind a shared system prompt) and random text."""
    rng = random.Random(seed)
    out = []
    for text in CORPUS:
        i = rng.randint(0, len(text))
        encoding = rng.choice(["cl100k_base", "o200k_base"])
        allowed = rng.choice([None, "all", ["<|endoftext|>"]])
        out.append((encoding, SYSTEM + text[:i], text[i:], allowed))
    for _ in range(n_random):
        text = "".join(rng.choice(ATOMS) for _ in range(rng.randint(0, 30)))
        i = rng.randint(0, len(text))
        head = rng.choice([SYSTEM, SYSTEM[:1000], ""])
        if rng.random() < 0.5:  # the usual case: the shared prompt is the whole prefix
            i = 0
        out.append(
            (
                rng.choice(["cl100k_base", "o200k_base"]),
                head + text[:i],
                text[i:],
                rng.choice([None, None, "all"]),
            )
        )
    return out


def run_concurrently(fn, items: list, threads: int = 4) -> list:
    results: list = [None] * len(items)
    errors: list = []
    lock = threading.Lock()
    index = iter(range(len(items)))

    def worker() -> None:
        while True:
            with lock:
                i = next(index, None)
            if i is None:
                return
            try:
                results[i] = fn(*items[i])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append((items[i], exc))

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert not errors, errors[:3]
    return results


# -- the WSGI example --------------------------------------------------------------------------


def test_exact_tokens_for_random_and_adversarial_requests(server: GunicornProcess) -> None:
    items = requests_for(seed=5, n_random=150)
    sources = Counter(run_concurrently(lambda *a: check(server, *a), items))
    assert sources["error"] > 0  # some requests hold a disallowed special token: tiktoken's 400
    # Repeated prefixes come from a worker's L1 or from the daemon; new ones are encoded locally.
    assert sources["l1"] + sources["daemon"] > 0 and sources["local"] > 0, sources


def test_bad_requests_get_a_400_with_a_message(server: GunicornProcess) -> None:
    cases = [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        ({"prefix": "a"}, "'suffix' must be a string"),
        ({"prefix": 1, "suffix": "b"}, "'prefix' must be a string"),
        ({"prefix": "a", "suffix": "b", "encoding": "gpt2"}, "unknown encoding 'gpt2'"),
        ({"prefix": "a", "suffix": "b", "encoding": 5}, "'encoding' must be a string"),
        ({"prefix": "a", "suffix": "b", "allowed_special": "some"}, "'allowed_special' must be"),
        ({"prefix": "a", "suffix": "b", "allowed_special": [1]}, "'allowed_special' must be"),
        ({"prefix": "a", "suffix": "b", "extra": 1}, "unknown fields: extra"),
        ({"prefix": "say <|endof", "suffix": "text|> now"}, "disallowed special token"),
    ]
    for payload, message in cases:
        status, body = server.request("POST", "/tokenize", payload)
        assert status == 400 and message in body["error"], (payload, body)
    assert server.request("GET", "/tokenize")[0] == 405
    assert server.request("GET", "/nowhere")[0] == 404
    status, body = server.request(
        "POST", "/tokenize?return=count", {"prefix": SYSTEM, "suffix": " How many?"}
    )
    assert status == 200
    assert body["count"] == len(get_encoding("cl100k_base").encode(SYSTEM + " How many?"))


def test_stats_show_the_workers_client_and_the_daemon(server: GunicornProcess) -> None:
    body = server.stats()
    assert body["strategy"] == "sidecar"
    assert {"l1_hits", "l2_hits", "fallbacks", "breaker"} <= set(body["client"])
    daemon = body["daemon"]
    assert daemon["settings"]["exit_with_parent"] is True
    address = daemon["settings"]["bind"]
    assert address == body["client"]["address"] and address.startswith("ipc://")
    directory = os.path.dirname(address[len("ipc://") :])
    assert os.stat(directory).st_mode & 0o777 == 0o700


def test_daemon_killed_during_load(server: GunicornProcess) -> None:
    """SIGKILL the daemon mid-load: no 5xx, still exact; the master restarts it, hits resume."""
    enc = get_encoding("cl100k_base")
    prefixes = [f"Tenant {i}: " + SYSTEM for i in range(6)]
    suffixes = [f" Question {j}: what is {j} + {j}?" for j in range(8)]
    want = {(p, s): enc.encode_ordinary(p + s) for p in prefixes for s in suffixes}
    statuses: Counter = Counter()
    failures: list = []
    stop = threading.Event()

    def load(seed: int) -> None:
        rng = random.Random(seed)
        deadline = time.monotonic() + 40
        while not stop.is_set() and time.monotonic() < deadline:
            p, s = rng.choice(prefixes), rng.choice(suffixes)
            try:
                status, body = server.tokenize(prefix=p, suffix=s)
            except OSError as exc:
                failures.append(repr(exc))
                continue
            statuses[status] += 1
            if status != 200 or body["tokens"] != want[(p, s)]:
                failures.append((status, str(body)[:200]))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()

    def served_more(than: int) -> Callable[[], bool]:
        return lambda: sum(statuses.values()) + len(failures) >= than + 20

    try:
        wait_until(served_more(0), 60, "the load never ran")  # a condition, not a fixed sleep
        old = server.daemon_stats()
        assert old is not None
        os.kill(old["pid"], signal.SIGKILL)
        new = wait_until(
            lambda: (lambda d: d if d and d["pid"] != old["pid"] else None)(server.daemon_stats()),
            20,
            f"the daemon was not restarted:\n{server.log_text()}",
            interval=0.2,
        )
        # Load against the restarted daemon too.
        wait_until(served_more(sum(statuses.values()) + len(failures)), 60, "no load after")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
    assert statuses[200] > 50 and set(statuses) == {200}, statuses
    assert "restarting" in server.log_text()
    # gunicorn reaps every child itself; the supervisor still knows what killed the daemon.
    assert "exited (killed by SIGKILL)" in server.log_text()

    # Hits resume: prefixes no worker has seen; after the first fill, the other workers' L1
    # misses are answered by the new daemon (the clients' breakers close again on their own).
    def hits() -> bool:
        fresh = [(f"Fresh {time.monotonic_ns()} {k}: " + SYSTEM, " hi") for k in range(4)]
        run_concurrently(lambda p, s: check(server, "cl100k_base", p, s), fresh * 4)
        return server.daemon_stats()["get_hits"] > 0

    wait_until(hits, 30, "no daemon hits after the restart", interval=0.5)
    assert server.daemon_stats()["pid"] == new["pid"]


# -- worker recycling, --preload, shutdown, a dead master ------------------------------------


def test_max_requests_recycling_leaks_nothing(tmpdir_short: Path) -> None:
    # With the hot prefixes taken at a worker's start (the suite turns it off: tests/conftest.py).
    preload = {"FLASHTOKEN_PRELOAD_BYTES": str(2 * 1024 * 1024)}
    proc = _serve(
        WSGI_CONF, tmpdir_short, "--max-requests", "4", "--max-requests-jitter", "0", env=preload
    )
    try:
        proc.start()
        enc = get_encoding("cl100k_base")
        prefixes = [f"Recycled {i}: " + SYSTEM for i in range(3)]
        want = {p: enc.encode_ordinary(p + " ok") for p in prefixes}
        pids: set[int] = set()

        def one(p: str) -> None:
            status, body = proc.tokenize(prefix=p, suffix=" ok")
            assert status == 200 and body["tokens"] == want[p]

        run_concurrently(one, [(p,) for p in prefixes] * 4)
        daemon = proc.daemon_stats()
        assert daemon is not None
        before = fd_count(proc.pid), fd_count(daemon["pid"])
        # Of the replacement workers: the host's store served them, read from its map on a
        # request or taken from its hot list when the worker started.
        host_hits = 0
        for _ in range(3):
            run_concurrently(one, [(p,) for p in prefixes] * 4)
            for _ in range(4):
                stats = proc.stats()
                pids.add(stats["pid"])
                host_hits += stats["client"]["l2_hits"] + stats["client"]["preloaded"]
        after = fd_count(proc.pid), fd_count(daemon["pid"])
        assert len(pids) > 4, "no worker was recycled"
        assert after[0] <= before[0] + 2, (before, after)  # the master
        assert after[1] <= before[1] + 6, (before, after)  # the daemon: one fd per live worker
        assert proc.daemon_stats()["pid"] == daemon["pid"]  # never restarted
        assert host_hits > 0
    finally:
        proc.stop()


PRELOAD_APP = """
from flashtoken.client.gunicorn import get_client

# Made in the master (--preload), used once there, then inherited by every worker: fork-safe.
CLIENT = get_client()
CLIENT.encode_ordinary(" warm", prefix="Preloaded prompt.")


def app(environ, start_response):
    import json
    data = json.loads(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
    body = json.dumps({"tokens": CLIENT.encode_ordinary(data["suffix"], prefix=data["prefix"]),
                       "stats": CLIENT.stats()}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
"""


def test_preload_then_shutdown_stops_the_daemon(tmpdir_short: Path) -> None:
    (tmpdir_short / "preloaded.py").write_text(PRELOAD_APP)
    proc = GunicornProcess(
        WSGI_CONF,
        tmpdir_short,
        "-w",
        "4",
        "--preload",
        "--graceful-timeout",
        "3",
        "--chdir",
        str(tmpdir_short),
        "preloaded:app",
        env={"FLASHTOKEN_MIN_USES": "1"},  # the master's one warm-up call caches the prompt
    )
    try:
        proc.start(ready=lambda: _answers(proc))  # this app has no /stats
        enc = get_encoding("cl100k_base")
        for i in range(40):
            prefix = "Preloaded prompt." if i % 2 else f"Prompt {i % 5}. " + SYSTEM
            status, body = proc.tokenize(prefix=prefix, suffix=f" turn {i}")
            assert status == 200 and body["tokens"] == enc.encode_ordinary(prefix + f" turn {i}")
            if i % 2:  # in the L1 the master built before the fork: a hit in every worker
                assert body["stats"]["l1_hits"] > 0
        daemon_dir = _daemon_dir(proc.log_text())
        assert daemon_dir is not None and os.path.isdir(daemon_dir)
        daemon_pid = int(Path(daemon_dir, "daemon.sock.lock").read_text())
        assert alive(daemon_pid)
        proc.daemon_pids.add(daemon_pid)
        assert proc.stop() == 0
        assert not alive(daemon_pid)
        assert not os.path.exists(daemon_dir)  # the private directory is removed
        assert f"flashtoken-daemon (pid {daemon_pid}) stopped" in proc.log_text()
    finally:
        proc.stop()


def _answers(proc: GunicornProcess) -> bool:
    try:
        return proc.tokenize(prefix="a", suffix="b")[0] == 200
    except OSError:
        return False


def _daemon_dir(log: str) -> str | None:
    for line in log.splitlines():
        if "flashtoken-daemon started" in line and "ipc://" in line:
            return os.path.dirname(line.split("ipc://", 1)[1].strip())
    return None


def test_daemon_exits_when_the_master_is_killed(tmpdir_short: Path) -> None:
    proc = GunicornProcess(WSGI_CONF, tmpdir_short, "-w", "1")
    try:
        proc.start()
        daemon_pid = proc.daemon_stats()["pid"]
        os.kill(proc.pid, signal.SIGKILL)
        wait_until(lambda: not alive(daemon_pid), 10, "the daemon outlived its master")
    finally:
        proc.stop()
        # No on_exit ran: the master's private directory (now holding only the lock file) stays.
        daemon_dir = _daemon_dir(proc.log_text())
        if daemon_dir is not None:
            shutil.rmtree(daemon_dir, ignore_errors=True)


# -- the ASGI example on uvicorn workers --------------------------------------------------------


def test_asgi_example_on_uvicorn_workers(tmpdir_short: Path) -> None:
    pytest.importorskip("uvicorn")
    proc = _serve(ASGI_CONF, tmpdir_short)
    try:
        proc.start()
        items = requests_for(seed=11, n_random=40)
        sources = Counter(run_concurrently(lambda *a: check(proc, *a), items))
        assert sources["error"] > 0 and sources["l1"] + sources["daemon"] > 0, sources
        status, body = proc.request("POST", "/tokenize", {"prefix": "a", "suffix": 3})
        assert status == 400 and "'suffix' must be a string" in body["error"]
        body = proc.stats()
        assert body["daemon"]["stats"]["cmd_get"] > 0
        assert body["client"]["address"] == body["daemon"]["settings"]["bind"]
    finally:
        proc.stop()


# -- Prometheus: every worker's counters, summed --------------------------------------------


def _metric_sums(text: bytes) -> dict[str, float]:
    """{metric name: value summed over its labels} of a Prometheus text page."""
    sums: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            name = name_labels.split("{", 1)[0]
            sums[name] = sums.get(name, 0.0) + float(value)
    return sums


def test_metrics_sum_every_workers_counters(tmpdir_short: Path) -> None:
    """The example config turns on ``hooks(prometheus=True)``: GET /metrics, whichever worker
    answers, counts every request of every worker, those recycled by ``max_requests`` included;
    the directory the master made for them is gone after shutdown."""
    pytest.importorskip("prometheus_client")  # the [dev] extra installs it
    proc = _serve(WSGI_CONF, tmpdir_short, "--max-requests", "7", "--max-requests-jitter", "0")
    try:
        proc.start()
        enc = get_encoding("cl100k_base")
        prefixes = [f"Metered {i}: " + SYSTEM for i in range(3)]
        want = {p: enc.encode_ordinary(p + " ok") for p in prefixes}

        def one(p: str) -> None:
            status, body = proc.tokenize(prefix=p, suffix=" ok")
            assert status == 200 and body["tokens"] == want[p]

        n = 60
        run_concurrently(one, [(prefixes[i % 3],) for i in range(n)])
        # Every declared-prefix call ends in exactly one of these five (first_sights: a prefix
        # the host had not seen, encoded whole; admission on the second sight).
        outcomes = ("l1_hits", "l2_hits", "misses", "fallbacks", "first_sights")

        def counted() -> float:
            status, body = proc.request("GET", "/metrics")
            assert status == 200, body
            sums = _metric_sums(body)
            return sum(sums.get(f"flashtoken_client_{o}_total", 0.0) for o in outcomes)

        # Workers copy their counters every second; the one answering copies its own first.
        wait_until(lambda: counted() >= n, 30, "the workers' counters never reached /metrics")
        assert counted() == n
        status, body = proc.request("GET", "/metrics")
        assert b'flashtoken_client_l1_hits_total{encoding="cl100k_base"}' in body
        line = next(x for x in proc.log_text().splitlines() if "for Prometheus in" in x)
        directory = Path(line.rsplit(" in ", 1)[1].strip())
        files = list(directory.glob("counter_*.db"))
        assert len(files) > 4, files  # the recycled workers' files are summed too
    finally:
        proc.stop()
    assert not directory.exists()


def test_private_dir_fits_the_socket_path_limit_of_macos(
    tmpdir_short: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forced on Linux: with macOS's 104-byte sun_path, a runtime directory that would fit
    Linux's 108 is passed over for a shorter one, and the socket path fits."""
    import flashtoken.client.gunicorn as g

    # base + "/flashtoken-gunicorn-xxxxxxxx/daemon.sock" (41 bytes) = 105: over 103, within 107.
    long_dir = tmpdir_short / ("r" * (105 - 41 - len(str(tmpdir_short)) - 1))
    long_dir.mkdir()
    linux_fit = len(os.path.join(long_dir, "flashtoken-gunicorn-xxxxxxxx", "daemon.sock").encode())
    assert 103 < linux_fit <= 107, linux_fit
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(long_dir))
    assert Path(g._private_dir()).parent == long_dir  # Linux's limit: it fits
    monkeypatch.setattr(g, "MAX_IPC_PATH_BYTES", 103)
    made = Path(g._private_dir())
    try:
        assert made.parent != long_dir
        assert len(str(made / "daemon.sock").encode()) <= 103
        assert made.stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(made, ignore_errors=True)
