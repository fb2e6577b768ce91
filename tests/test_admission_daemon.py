"""Admission on the second sight with the real daemon, its host map and worker processes.

A declared prefix is cached from its second request on the host: the first is encoded whole
(exact, nothing kept, a 16-byte sighting sent), the daemon marks the key in the map, and the
next worker to ask finds the mark and has the daemon encode it once for the host. A prefix that
changes every request is never split, kept or filled.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("zmq")
pytest.importorskip("lmdb")

from flashtoken.client import Client  # noqa: E402

from flashtoken import get_encoding  # noqa: E402
from tests.daemon_fixtures import DaemonProcess  # noqa: E402
from tests.polling import wait_until  # noqa: E402

TIMEOUT_MS = 5000
ENC = "cl100k_base"


def _prefix(tag: str) -> str:
    return f"{tag}: You are a careful assistant; cite sources, écrivez clairement. 注意 " * 40


def test_a_prefix_is_cached_from_its_second_sight_on_the_host(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    daemon = start_daemon()
    enc = get_encoding(ENC)
    prefix = _prefix("second sight")
    expected = enc.encode_ordinary(prefix + " Q?")
    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS) as worker:
        assert worker.encode_ordinary(" Q?", prefix=prefix) == expected
        first = worker.stats()
        assert (first["first_sights"], first["l1_items"], first["misses"]) == (1, 0, 0)
        assert daemon.stats()["fills"] == 0  # nothing encoded for a prefix seen once

        # The same worker's second request is a second sight, even before its sighting
        # reached the daemon (they go in batches): it asks, and the daemon fills. The GET that
        # starts the fill may be answered by it (single flight) or, its wait over, miss.
        assert worker.encode_ordinary(" Q?", prefix=prefix) == expected
        second = worker.stats()
        assert second["first_sights"] == 1
        assert (second["misses"], second["l2_hits"], second["map_hits"]) in ((1, 0, 0), (0, 1, 0))
        assert worker.stats()["l1_items"] == 1  # cached now
    wait_until(lambda: daemon.stats()["map_curr_items"] == 1, 30, "the fill never landed")
    assert daemon.stats()["fills"] == 1
    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS) as fresh:  # another worker
        assert fresh.encode_ordinary(" Q?", prefix=prefix) == expected
        assert fresh.stats()["map_hits"] == 1


CHANGING = textwrap.dedent(
    """
    import sys
    from flashtoken import get_encoding
    from flashtoken.client import Client
    enc = get_encoding("cl100k_base")
    history = "[worker {w}] System: be brief.\\n"
    with Client({address!r}, "cl100k_base", timeout_ms=5000) as client:
        for turn in range(40):
            history += f"User: question {{turn}} about {w}. Assistant: answer {{turn}}.\\n"
            got = client.encode_ordinary(" User:", prefix=history)
            if got != enc.encode_ordinary(history + " User:"):
                sys.exit("wrong ids at turn %d" % turn)
        stats = client.stats()
    # The first turns are too short to share (SHARE_MIN_BYTES): encoded whole, never looked up.
    seen = stats["first_sights"] + stats["short_prefixes"]
    assert stats["l1_items"] == 0 and seen == 40 and stats["short_prefixes"] < 40, stats
    """
)


def test_prefixes_that_change_every_request_are_never_split_kept_or_filled(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """Worker processes passing a growing chat history as the prefix: every id exact, no L1
    entry, no fill, no map entry; only the (bounded) sighting marks."""
    daemon = start_daemon()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", CHANGING.format(address=daemon.address, w=w)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(3)
    ]
    for proc in workers:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    stats = daemon.stats()
    assert (stats["fills"], stats["map_curr_items"]) == (0, 0)
    assert 0 < stats["map_seen"] <= 120


def test_without_a_map_a_worker_caches_what_it_saw_twice(daemon_dir: Path) -> None:
    """No daemon, so no map to keep the host's sightings: the worker keeps its own."""
    enc = get_encoding(ENC)
    prefix = _prefix("no map")
    with Client(f"ipc://{daemon_dir}/absent.sock", ENC, timeout_ms=50) as worker:
        for n in range(3):
            assert worker.encode_ordinary(" Q?", prefix=prefix) == enc.encode_ordinary(
                prefix + " Q?"
            )
            stats = worker.stats()
            assert (stats["first_sights"], stats["l1_items"]) == (1, 0 if n == 0 else 1)
        special = "<|endoftext|> and more"
        assert worker.encode(special, prefix="unseen", allowed_special="all") == enc.encode(
            "unseen" + special, allowed_special="all"
        )
        with pytest.raises(ValueError):  # tiktoken's own error for a disallowed special token
            worker.encode(special, prefix="unseen either")


def test_min_uses_1_caches_from_the_first_request(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    daemon = start_daemon()
    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS, min_uses=1) as worker:
        worker.encode_ordinary(" Q?", prefix=_prefix("first"))
        stats = worker.stats()
        # Asked the daemon at once: answered by the fill it started (single flight) or a miss.
        assert (stats["first_sights"], stats["l1_items"]) == (0, 1)
        assert (stats["misses"], stats["l2_hits"]) in ((1, 0), (0, 1))
    with pytest.raises(ValueError, match="min_uses"):
        Client(daemon.address, ENC, min_uses=3)
