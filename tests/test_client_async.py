"""flashtoken.client.AsyncClient: the same answers as tiktoken, from coroutines."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from flashtoken.client import AsyncClient

from flashtoken import get_encoding
from flashtoken.errors import DaemonUnavailable
from tests.corpus import CORPUS, splits
from tests.daemon_fixtures import DaemonProcess, wait_until

pytestmark = pytest.mark.timeout(60)

# ms: a real daemon's answer is awaited this long; it comes in ms, only a hang waits it out.
# Not less: on a loaded machine a reply can take longer than 250 ms, and a test counting
# hits then failed for want of a few ms (a timing assertion in disguise).
TIMEOUT_MS = 5000


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_exact_on_corpus_splits(shared_daemon: DaemonProcess, name: str) -> None:
    enc = get_encoding(name)
    pairs = [pair for text in CORPUS for pair in splits(text)]

    async def run() -> dict:
        async with AsyncClient(shared_daemon.address, name, timeout_ms=TIMEOUT_MS) as cold:
            for prefix, suffix in pairs:
                assert await cold.encode_ordinary(suffix, prefix=prefix) == enc.encode_ordinary(
                    prefix + suffix
                )
        wait_until(lambda: shared_daemon.stats()["fills_pending"] == 0, 30, "fills pending")
        async with AsyncClient(shared_daemon.address, name, timeout_ms=TIMEOUT_MS) as warm:
            for prefix, suffix in pairs:
                expected = enc.encode_ordinary(prefix + suffix)
                assert await warm.encode_ordinary(suffix, prefix=prefix) == expected
                assert await warm.count_ordinary(suffix, prefix=prefix) == len(expected)
                assert (
                    await warm.encode_ordinary_array(suffix, prefix=prefix)
                ).tolist() == expected
                try:
                    want = enc.encode(prefix + suffix, allowed_special="all")
                except ValueError:
                    continue
                assert await warm.encode(suffix, prefix=prefix, allowed_special="all") == want
                assert await warm.count(suffix, prefix=prefix, allowed_special="all") == len(want)
            return warm.stats()

    stats = asyncio.run(run())
    assert stats["l2_hits"] > 0 and stats["errors"] == stats["timeouts"] == 0


def test_disallowed_special_raises_like_tiktoken(shared_daemon: DaemonProcess) -> None:
    enc = get_encoding("cl100k_base")

    async def run() -> None:
        async with AsyncClient(shared_daemon.address, timeout_ms=TIMEOUT_MS) as client:
            with pytest.raises(ValueError) as raised:
                await client.encode("text|> more", prefix="system <|endof")
            with pytest.raises(ValueError) as expected:
                enc.encode("system <|endoftext|> more")
            assert str(raised.value) == str(expected.value)

    asyncio.run(run())


def test_concurrent_tasks(shared_daemon: DaemonProcess) -> None:
    enc = get_encoding("cl100k_base")
    prefixes = [f"async prompt {i} {random.random()} " * 40 for i in range(20)]

    async def one(client: AsyncClient, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(30):
            prefix, suffix = rng.choice(prefixes), rng.choice(["", " a", "'s", "\n"])
            assert await client.encode_ordinary(suffix, prefix=prefix) == enc.encode_ordinary(
                prefix + suffix
            )

    async def run() -> None:
        async with AsyncClient(shared_daemon.address, timeout_ms=TIMEOUT_MS, l1_bytes=0) as client:
            await asyncio.gather(*(one(client, i) for i in range(8)))

    asyncio.run(run())


def test_no_daemon(daemon_dir: Path) -> None:
    enc = get_encoding("o200k_base")

    async def run() -> dict:
        async with AsyncClient(f"ipc://{daemon_dir}/absent.sock", "o200k_base", timeout_ms=5) as c:
            for i in range(10):
                prefix = f"nobody home {i} " * 30
                assert await c.encode_ordinary("?", prefix=prefix) == enc.encode_ordinary(
                    prefix + "?"
                )
            with pytest.raises(DaemonUnavailable):  # no socket file: not even a connect
                await c.daemon_stats(timeout_ms=50)
            return c.stats()

    stats = asyncio.run(run())
    assert stats["errors"] == 3 and stats["timeouts"] == 0 and stats["breaker"] == "open"


def test_usable_across_event_loops(start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon()
    enc = get_encoding("cl100k_base")
    client = AsyncClient(daemon.address, timeout_ms=TIMEOUT_MS, l1_bytes=0, min_uses=1)
    try:
        for i in range(3):  # asyncio.run makes a new loop each time; each asks the daemon
            prefix = f"loop {i} a"
            assert asyncio.run(client.encode_ordinary("b", prefix=prefix)) == enc.encode_ordinary(
                prefix + "b"
            )
            wait_until(lambda: daemon.stats()["curr_items"] == i + 1, 20, "no fill")
        # The host map serves them now, in yet another loop, with no round trip.
        assert asyncio.run(client.encode_ordinary("b", prefix="loop 0 a")) == enc.encode_ordinary(
            "loop 0 ab"
        )
        assert client.stats()["errors"] == 0 and client.stats()["map_hits"] == 1
        assert asyncio.run(client.daemon_stats())["stats"]["get_misses"] == 3  # hits: TOUCHes
    finally:
        client.close()
