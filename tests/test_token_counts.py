"""Cached vs uncached token counts: the clients' ``cached_tokens`` / ``uncached_tokens``
(client/tally.py) and the daemon's ``tokens_served`` split into what its socket sent and what
workers read from the host's map (counted at their TOUCH).

Checked against what was returned: every token a call returned is counted once, as cached
(taken from the L1, the map or the daemon as it was) or uncached (encoded by the call), and the
cached part of a declared prefix is exactly its tokens before the stable cut.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("zmq")
pytest.importorskip("lmdb")

from flashtoken.client import AsyncClient, Client  # noqa: E402

from flashtoken import FixedPrefixTokenCache, get_encoding  # noqa: E402
from tests.daemon_fixtures import DaemonProcess  # noqa: E402
from tests.polling import wait_until  # noqa: E402

ENC = "cl100k_base"
TIMEOUT_MS = 5000
PREFIX = "You are a counted assistant. Réponds brièvement; 简洁地回答. " * 30


# A worker process: three requests for PREFIX, then its sources and counters as JSON; it exits
# at once, its map hit reported at close (or before, if its report fell due on a socket still
# connecting: kept for the next one, not dropped).
WORKER = textwrap.dedent(
    """
    import json
    from flashtoken import get_encoding
    from flashtoken.client import Client
    enc = get_encoding("cl100k_base")
    # preload_bytes=0: the first request reads the map (not the hot list taken at start).
    with Client(ADDRESS, "cl100k_base", timeout_ms=5000, preload_bytes=0) as client:
        sources = []
        for i in range(3):
            got = client.encode_ordinary(f" w{i}", prefix=PREFIX)
            assert got == enc.encode_ordinary(PREFIX + f" w{i}")
            sources.append(client.last_source)
        stats = client.stats()
    print(json.dumps([sources, stats["cached_tokens"], stats["map_hits"]]))
    """
)


def _counts(client: Client | AsyncClient) -> tuple[int, int]:
    stats = client.stats()
    return stats["cached_tokens"], stats["uncached_tokens"]


def _head(prefix: str, allowed: frozenset[str] = frozenset()) -> int:
    return FixedPrefixTokenCache(ENC, prefix).head_count(allowed)


def test_every_returned_token_is_counted_once_and_l1_hits_count_the_head(
    daemon: DaemonProcess,
) -> None:
    enc = get_encoding(ENC)
    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS, min_uses=1) as client:
        returned = 0
        first = client.encode_ordinary(" first", prefix=PREFIX)
        assert first == enc.encode_ordinary(PREFIX + " first")
        returned += len(first)
        assert sum(_counts(client)) == returned
        before = _counts(client)
        again = client.encode_ordinary(" again?", prefix=PREFIX)
        assert client.last_source == "l1"
        assert again == enc.encode_ordinary(PREFIX + " again?")
        returned += len(again)
        cached, uncached = _counts(client)
        assert cached - before[0] == _head(PREFIX)  # the prefix's tokens before its cut
        assert uncached - before[1] == len(again) - _head(PREFIX)
        # count, the array form, specials and a text with no prefix: counted like encode.
        returned += client.count_ordinary(" n", prefix=PREFIX)
        returned += len(client.encode_ordinary_array(" arr", prefix=PREFIX))
        special = client.encode("<|endoftext|> s", prefix=PREFIX, allowed_special="all")
        assert special == enc.encode(PREFIX + "<|endoftext|> s", allowed_special="all")
        returned += len(special)
        returned += len(client.encode("no prefix at all, " * 50))
        returned += sum(map(len, client.encode_ordinary_batch([" a", " b", " c"], prefix=PREFIX)))
        with pytest.raises(ValueError):  # nothing returned, nothing counted
            client.encode(" <|endoftext|>", prefix=PREFIX)
        assert sum(_counts(client)) == returned


def test_a_prefix_first_encoded_by_the_call_counts_as_uncached(daemon: DaemonProcess) -> None:
    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS) as client:
        tokens = client.encode_ordinary(" q", prefix="A prefix seen once. " * 40)
        assert client.last_source == "whole"
        assert _counts(client) == (0, len(tokens))


def test_a_fresh_workers_map_hit_counts_the_head_and_the_daemon_its_tokens(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """Worker processes reading the host's map: each counts the prefix's head as cached, and
    the daemon, told at their TOUCH, counts the same tokens as served by the map."""
    daemon = start_daemon()
    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS, min_uses=1) as filler:
        filler.encode_ordinary(" fill", prefix=PREFIX)
    wait_until(lambda: daemon.stats()["map_curr_items"] == 1, 30, "the fill never landed")
    start = daemon.stats()
    outs = []
    for _ in range(3):
        code = WORKER.replace("ADDRESS", repr(daemon.address)).replace("PREFIX", repr(PREFIX))
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        outs.append(done.stdout)
    head = _head(PREFIX)
    map_tokens = 0
    for out in outs:
        sources, cached, map_hits = json.loads(out)
        assert sources == ["map", "l1", "l1"] and map_hits == 1
        assert cached == 3 * head  # the map's head once, then the L1's twice
        map_tokens += head * map_hits
    # The workers' TOUCHes were sent at close; the daemon reads them on its loop.
    wait_until(
        lambda: daemon.stats()["map_tokens_served"] - start["map_tokens_served"] == map_tokens,
        30,
        "the workers' map hits were never counted",
    )
    stats = daemon.stats()
    assert stats["socket_tokens_served"] == start["socket_tokens_served"]
    assert stats["tokens_served"] == stats["socket_tokens_served"] + stats["map_tokens_served"]


def test_tokens_sent_by_the_socket_are_what_the_client_took_from_the_daemon(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """A client that cannot read the map (its view dropped) asks the daemon: the daemon's
    socket count grows by the head it sent, which the client counted as cached."""
    daemon = start_daemon()
    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS, min_uses=1) as filler:
        filler.encode_ordinary(" fill", prefix=PREFIX)
    wait_until(lambda: daemon.stats()["map_curr_items"] == 1, 30, "the fill never landed")
    start = daemon.stats()
    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS, min_uses=1) as asker:
        asker._core.hostmap = None  # as a worker with no map (lmdb missing, or over tcp://)
        before = _counts(asker)[0]
        asker.encode_ordinary(" ask", prefix=PREFIX)
        assert asker.last_source == "daemon"
        sent = _counts(asker)[0] - before
    assert sent == _head(PREFIX)
    stats = daemon.stats()
    assert stats["socket_tokens_served"] - start["socket_tokens_served"] == sent
    assert stats["map_tokens_served"] == start["map_tokens_served"]


def test_the_async_client_counts_alike(daemon: DaemonProcess) -> None:
    enc = get_encoding(ENC)

    async def main() -> tuple[int, int, int]:
        async with AsyncClient(daemon.address, ENC, timeout_ms=TIMEOUT_MS, min_uses=1) as client:
            returned = 0
            for i in range(3):
                tokens = await client.encode_ordinary(f" {i}", prefix=PREFIX)
                assert tokens == enc.encode_ordinary(PREFIX + f" {i}")
                returned += len(tokens)
            returned += len(await client.encode_ordinary("auto text " * 300))
            cached, uncached = _counts(client)
            return returned, cached, uncached

    returned, cached, uncached = asyncio.run(main())
    assert cached + uncached == returned
    assert cached >= 2 * _head(PREFIX)  # the two L1 hits at least


@settings(max_examples=30, deadline=None)
@given(
    prefix=st.text(st.characters(codec="utf-8"), max_size=200),
    suffixes=st.lists(st.text(st.characters(codec="utf-8"), max_size=40), min_size=1, max_size=4),
)
def test_counts_add_up_to_what_was_returned_without_a_daemon(
    prefix: str, suffixes: list[str]
) -> None:
    """Any prefix and suffixes, exact ids, and cached + uncached == every token returned;
    with no prefix (automatic reuse) too."""
    enc = get_encoding(ENC)
    with Client("ipc:///nonexistent/flashtoken-counts.sock", ENC, min_uses=1, follow=False) as c:
        returned = 0
        for suffix in suffixes:
            tokens = c.encode_ordinary(suffix, prefix=prefix)
            assert tokens == enc.encode_ordinary(prefix + suffix)
            returned += len(tokens)
            whole = c.encode_ordinary(prefix + suffix)
            assert whole == tokens
            returned += len(whole)
        cached, uncached = _counts(c)
        assert cached + uncached == returned and cached >= 0 and uncached >= 0


def test_the_counts_are_exported_with_their_help(daemon: DaemonProcess) -> None:
    pytest.importorskip("prometheus_client")
    from flashtoken.client import prometheus

    with Client(daemon.address, ENC, min_uses=1) as client:
        prometheus.track(client, interval_s=0)
        client.encode_ordinary(" a", prefix=PREFIX)
        client.encode_ordinary(" b", prefix=PREFIX)
        body, _ = prometheus.metrics_response()
        counters = {
            name
            for name, value in client.stats().items()
            if isinstance(value, int) and name not in prometheus.CLIENT_GAUGES
        }
    assert counters <= set(prometheus.CLIENT_HELP), counters - set(prometheus.CLIENT_HELP)
    text = body.decode()
    for name in ("cached_tokens", "uncached_tokens"):
        metric = f"flashtoken_client_{name}_total"
        assert f"\n{metric}{{" in text, name
        help_line = next(line for line in text.splitlines() if line.startswith(f"# HELP {metric}"))
        assert "tokens" in help_line and "stats() counter" not in help_line


def test_the_daemons_token_counters_are_typed_and_described(daemon: DaemonProcess) -> None:
    from flashtoken.daemon.metrics import prometheus_text

    from flashtoken.wire.admin import request_stats

    text = prometheus_text(request_stats(daemon.address, timeout_ms=5000))
    for name in ("tokens_served", "socket_tokens_served", "map_tokens_served"):
        assert f"# TYPE flashtoken_{name}_total counter" in text, name
        assert f"# HELP flashtoken_{name}_total flashtoken-daemon stat" not in text, name
