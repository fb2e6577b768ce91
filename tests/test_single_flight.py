"""Single flight (daemon/flights.py): many workers miss one prefix at once, one encode serves all.

The flights on their own first, with the real fill pool and fills that end when the test says so
(so each case is deterministic); then real worker processes against the real daemon and its host
map, released at once on a new prefix, with and without admission on the second sight.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("zmq")
pytest.importorskip("lmdb")

from flashtoken.client import Client  # noqa: E402

from flashtoken import get_encoding  # noqa: E402
from flashtoken.wire import GetHit, GetMiss, parse_reply  # noqa: E402
from tests.daemon_fixtures import DaemonProcess  # noqa: E402
from tests.polling import wait_until  # noqa: E402

ENC = "cl100k_base"
WORKERS = 4


# -- the flights, with the real pool -----------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _flights(clock: _Clock) -> tuple[Any, list[tuple[bytes, Any]], dict[str, int]]:
    from flashtoken.daemon.fills import FillPool
    from flashtoken.daemon.flights import Flights

    sent: list[tuple[bytes, Any]] = []
    counters = {"fills_refused": 0, "fills_abandoned": 0, "waited_hits": 0, "waited_misses": 0}
    flights = Flights(
        FillPool(1, lambda: None),
        lambda identity, frames: sent.append((identity, parse_reply(frames))),
        counters,
        max_pending=8,
        clock=clock,
    )
    return flights, sent, counters


def _land(flights: Any) -> None:
    wait_until(lambda: flights.land() > 0, 30, "the fill never came back")


def test_one_fill_answers_every_waiter_with_its_hit() -> None:
    clock = _Clock()
    flights, sent, counters = _flights(clock)
    release, runs = threading.Event(), []

    def fill() -> str:
        runs.append(1)
        release.wait(30)
        return "tokens"

    def landed(result: str) -> Any:
        return lambda request_id: GetHit(request_id, 3, b"\x01\x00\x00\x00").frames()

    assert flights.start("k", 10, landed, fill)
    for i in range(WORKERS):
        assert not flights.start("k", 10, landed, fill)  # in flight: no second fill
        assert flights.wait("k", b"w%d" % i, i + 1, 5.0)
    assert flights.pending_bytes == 10 and len(flights) == 1
    release.set()
    _land(flights)
    assert len(runs) == 1 and len(flights) == 0 and flights.pending_bytes == 0
    assert [(identity, type(reply), reply.id) for identity, reply in sent] == [
        (b"w%d" % i, GetHit, i + 1) for i in range(WORKERS)
    ]
    assert counters["waited_hits"] == WORKERS and counters["waited_misses"] == 0
    assert not flights.wait("k", b"late", 9, 5.0)  # landed: nothing to wait for


def test_a_waiter_whose_budget_runs_out_gets_a_miss_and_the_flight_goes_on() -> None:
    clock = _Clock()
    flights, sent, counters = _flights(clock)
    release = threading.Event()
    assert flights.start("k", 1, lambda r: lambda i: GetHit(i, 0, b"").frames(), release.wait, 30)
    assert flights.wait("k", b"short", 1, 0.010) and flights.wait("k", b"long", 2, 10.0)
    assert flights.next_deadline() == pytest.approx(100.010)
    clock.now += 0.011
    flights.expire()
    assert [(i, type(r), r.filling) for i, r in sent] == [(b"short", GetMiss, True)]
    release.set()
    _land(flights)
    assert [(i, type(r)) for i, r in sent[1:]] == [(b"long", GetHit)]
    assert (counters["waited_misses"], counters["waited_hits"]) == (1, 1)


def test_a_failed_fill_answers_misses_and_is_not_tried_again() -> None:
    flights, sent, counters = _flights(_Clock())

    def landed(result: Any) -> None:
        flights.fail("k", "PanicException: too many spaces")
        return None

    assert flights.start("k", 1, landed, lambda: "error")
    assert flights.wait("k", b"w", 1, 5.0)
    _land(flights)
    assert [(i, type(r), r.filling) for i, r in sent] == [(b"w", GetMiss, False)]
    assert flights.failed("k") == "PanicException: too many spaces"
    assert not flights.start("k", 1, landed, lambda: "error")
    assert counters["waited_misses"] == 1


# -- real workers against the real daemon --------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import json, sys
    from flashtoken import get_encoding
    from flashtoken.client import Client

    address, min_uses, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    prefix = open(path, encoding="utf-8").read()
    enc = get_encoding("cl100k_base")
    expected = enc.encode_ordinary(prefix + " Q?")
    with Client(address, "cl100k_base", timeout_ms=10_000, min_uses=min_uses) as client:
        client.encode_ordinary("warm up: connect, load")  # no prefix: fills no declared one
        print("ready", flush=True)
        sys.stdin.readline()  # released with the others
        exact = client.encode_ordinary(" Q?", prefix=prefix) == expected
        stats = client.stats()
    print(json.dumps({"exact": exact, **{k: stats[k] for k in ("l2_hits", "map_hits", "misses")}}))
    """
)


def _prefix(tag: str) -> str:
    # ~256 KiB: a worker may wait ~33 ms for the daemon's fill, about what encoding it costs.
    return f"{tag}: You are a careful assistant; écrivez clairement, 注意细节. " * 4000


def _all_at_once(daemon: DaemonProcess, directory: Path, prefix: str, min_uses: int) -> list[dict]:
    path = directory / "prefix.txt"
    path.write_text(prefix, encoding="utf-8")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, daemon.address, str(min_uses), str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(WORKERS)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        for worker in workers:  # all at once: each is blocked on its stdin until now
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        out = [json.loads(worker.communicate(timeout=120)[0]) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert [worker.returncode for worker in workers] == [0] * WORKERS
    return out


def _check_one_encode(daemon: DaemonProcess, results: list[dict], fills_before: int) -> None:
    stats = daemon.stats()
    assert all(r["exact"] for r in results)
    assert stats["fills"] - fills_before == 1  # one encode in the daemon for N workers
    for r in results:  # each served once: a waited hit, a read of the map, or its own encode
        assert r["l2_hits"] + r["misses"] == 1
    asked = sum(r["l2_hits"] - r["map_hits"] + r["misses"] for r in results)
    # Every worker that asked the daemon while the fill was in flight waited for it, the one
    # that started it included (a worker that asked after it landed was served at once); a
    # worker encoded the prefix itself only when its wait ran out.
    assert 1 <= stats["waited_hits"] + stats["waited_misses"] <= asked
    assert sum(r["misses"] for r in results) == stats["waited_misses"]


def test_workers_missing_one_prefix_at_once_cause_one_fill(
    start_daemon: Callable[..., DaemonProcess], daemon_dir: Path
) -> None:
    daemon = start_daemon()
    results = _all_at_once(daemon, daemon_dir, _prefix("one flight"), min_uses=1)
    _check_one_encode(daemon, results, fills_before=0)


def test_the_second_sight_that_fills_is_a_flight_the_others_wait_for(
    start_daemon: Callable[..., DaemonProcess], daemon_dir: Path
) -> None:
    daemon = start_daemon()
    prefix = _prefix("second sight")
    enc = get_encoding(ENC)
    with Client(daemon.address, ENC, timeout_ms=10_000) as first:  # the host's first sight
        # A text long enough to be asked for (automatic reuse): the socket the sighting is
        # sent on at close.
        first.encode_ordinary("connect " * 1000)
        assert first.encode_ordinary(" Q?", prefix=prefix) == enc.encode_ordinary(prefix + " Q?")
        assert first.stats()["first_sights"] == 1
    wait_until(lambda: daemon.stats()["map_sightings"] >= 1, 30, "the sighting never arrived")
    assert daemon.stats()["fills"] == 0
    results = _all_at_once(daemon, daemon_dir, prefix, min_uses=2)
    _check_one_encode(daemon, results, fills_before=0)
