"""tiktoken's API on the clients (batches, numpy, decode) and ``last_source`` on every path,
against a real daemon, its host map and tiktoken as the oracle."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("zmq")
np = pytest.importorskip("numpy")

from flashtoken.client import AsyncClient, Client  # noqa: E402

from flashtoken import get_encoding  # noqa: E402
from tests.daemon_fixtures import DaemonProcess  # noqa: E402
from tests.polling import wait_until  # noqa: E402
from tests.strategies import texts  # noqa: E402

pytestmark = pytest.mark.timeout(120)

TIMEOUT_MS = 5000  # a real daemon answers in ms; only a hang waits this out
ENC = "cl100k_base"
SPECIAL = "<|endoftext|>"


def _prefix(tag: str) -> str:
    return f"{tag} {random.random()}: You are exact; écrivez clairement. 注意 <|fim" * 30


def _filled(daemon: DaemonProcess, items: int) -> None:
    wait_until(lambda: daemon.stats()["map_curr_items"] >= items, 30, "the fill never landed")


# -- the batch, numpy and decode API --------------------------------------------------------


@given(
    suffixes=st.lists(texts, max_size=6),
    prefix=st.one_of(st.none(), texts),
    threads=st.integers(1, 4),
)
@settings(max_examples=40)
def test_batches_are_tiktokens(
    shared_daemon: DaemonProcess, suffixes: list[str], prefix: str | None, threads: int
) -> None:
    enc = get_encoding(ENC)
    joined = [(prefix or "") + s for s in suffixes]
    with Client(shared_daemon.address, ENC, timeout_ms=TIMEOUT_MS, min_uses=1) as client:
        got = client.encode_ordinary_batch(suffixes, prefix=prefix, num_threads=threads)
        assert got == enc.encode_ordinary_batch(joined, num_threads=threads)
        try:
            want = enc.encode_batch(joined, allowed_special="all")
        except ValueError:
            pass
        else:
            assert client.encode_batch(suffixes, prefix=prefix, allowed_special="all") == want

    async def run() -> list[list[int]]:
        async with AsyncClient(shared_daemon.address, ENC, timeout_ms=TIMEOUT_MS) as aclient:
            return await aclient.encode_ordinary_batch(suffixes, prefix=prefix, num_threads=threads)

    assert asyncio.run(run()) == enc.encode_ordinary_batch(joined)


def test_batches_raise_tiktokens_error(shared_daemon: DaemonProcess) -> None:
    enc = get_encoding(ENC)
    batch = ["fine", f"not {SPECIAL} allowed"]
    with pytest.raises(ValueError) as want:
        enc.encode_batch(["P" + t for t in batch])
    with Client(shared_daemon.address, ENC, timeout_ms=TIMEOUT_MS) as client:
        for prefix in ("P", None):
            with pytest.raises(ValueError) as got:
                client.encode_batch(batch if prefix else ["P" + t for t in batch], prefix=prefix)
            assert type(got.value) is type(want.value)
        ok = client.encode_batch(batch, prefix="P", disallowed_special=())
        assert ok == enc.encode_batch(["P" + t for t in batch], disallowed_special=())

    async def run() -> None:
        async with AsyncClient(shared_daemon.address, ENC, timeout_ms=TIMEOUT_MS) as aclient:
            with pytest.raises(ValueError):
                await aclient.encode_batch(batch, prefix="P")
            with pytest.raises(ValueError):
                await aclient.encode_batch(["P" + t for t in batch])

    asyncio.run(run())


@pytest.mark.parametrize("prefix", [None, "You are a helpful assistant."])
def test_numpy_and_decode_are_tiktokens(shared_daemon: DaemonProcess, prefix: str | None) -> None:
    enc = get_encoding(ENC)
    suffix = f" Answer {SPECIAL} briefly, 注意."
    text = (prefix or "") + suffix
    want = enc.encode_to_numpy(text, allowed_special="all")
    with Client(shared_daemon.address, ENC, timeout_ms=TIMEOUT_MS) as client:
        got = client.encode_to_numpy(suffix, prefix=prefix, allowed_special="all")
        assert got.dtype == want.dtype == np.uint32 and got.tolist() == want.tolist()
        tokens = got.tolist()
        assert client.decode(tokens) == enc.decode(tokens) == text
        assert client.decode_bytes(tokens) == enc.decode_bytes(tokens)
        broken = enc.encode("注")[:1] + tokens  # a character cut in half
        assert client.decode(broken) == enc.decode(broken)
        assert client.decode(broken, errors="ignore") == enc.decode(broken, errors="ignore")
        with pytest.raises(ValueError):
            client.encode_to_numpy(suffix, prefix=prefix)  # disallowed, as tiktoken's

    async def run() -> list[int]:
        async with AsyncClient(shared_daemon.address, ENC, timeout_ms=TIMEOUT_MS) as aclient:
            arr = await aclient.encode_to_numpy(suffix, prefix=prefix, allowed_special="all")
            assert arr.dtype == np.uint32 and aclient.decode(arr.tolist()) == text
            return arr.tolist()

    assert asyncio.run(run()) == want.tolist()


# -- last_source ------------------------------------------------------------------------------


def test_last_source_on_each_declared_prefix_path(
    start_daemon: Callable[..., DaemonProcess], daemon_dir: Path
) -> None:
    daemon = start_daemon()
    enc = get_encoding(ENC)
    prefix, other = _prefix("sources"), _prefix("other")

    def exact(client: Client, p: str) -> str | None:
        assert client.encode_ordinary(" Q?", prefix=p) == enc.encode_ordinary(p + " Q?")
        return client.last_source

    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS) as first:
        assert first.last_source is None
        assert exact(first, prefix) == "whole"  # the host's first sight: tiktoken on it all
        # Until the sighting reaches the daemon, a call is another first sight; then it asks
        # the daemon, which misses and fills; the GET waits for that fill (single flight): a
        # hit if it landed within the wait, else the prefix is encoded here once.
        wait_until(
            lambda: exact(first, prefix) in ("local", "daemon"), 30, "never asked the daemon"
        )
        assert exact(first, prefix) == "l1"
    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS, min_uses=1) as filler:
        # min_uses=1: asked at once, a miss, a fill (waited for, or encoded here meanwhile)
        assert exact(filler, other) in ("local", "daemon")
    _filled(daemon, 2)
    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS) as reader:
        assert exact(reader, prefix) == "map"  # read from the host's map, no round trip
        assert exact(reader, prefix) == "l1"
    # A worker without the map (a tcp-less test can drop it) asks the daemon instead.
    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS) as asker:
        asker._core.hostmap = None
        assert exact(asker, other) == "daemon"
        assert asker.stats()["l2_hits"] == 1 and asker.stats()["map_hits"] == 0
    alone_prefix = _prefix("alone")  # in no map: the absent socket's directory is the daemon's
    with Client(f"ipc://{daemon_dir}/absent.sock", ENC, timeout_ms=50, min_uses=1) as alone:
        assert exact(alone, alone_prefix) == "local"
        assert alone.encode_batch(["a", "b"], prefix=alone_prefix) == [
            enc.encode(alone_prefix + "a"),
            enc.encode(alone_prefix + "b"),
        ]
        assert alone.last_source == "l1"


def test_last_source_with_no_prefix(
    start_daemon: Callable[..., DaemonProcess], daemon_dir: Path
) -> None:
    daemon = start_daemon()
    enc = get_encoding(ENC)
    text = _prefix("auto") * 8  # over auto_local_bytes: the daemon is asked for its chain

    def exact(client: Client, t: str) -> str | None:
        assert client.encode_ordinary(t) == enc.encode_ordinary(t)
        return client.last_source

    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS, follow=False) as first:
        assert exact(first, "short") == "local"  # under one block: nothing cached, or to ask
        assert exact(first, text) == "local"  # the daemon's chain is empty: encoded here
        assert exact(first, text + " more") == "l1"
        assert first.encode(SPECIAL, allowed_special="all") == enc.encode(
            SPECIAL, allowed_special="all"
        )
        with pytest.raises(ValueError):
            first.encode(SPECIAL)  # tiktoken's own error and answer: nothing of ours used
        assert first.last_source == "local"

    def fresh_source() -> bool:
        with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS, follow=False) as second:
            return exact(second, text + " again") == "daemon"

    # The daemon fills the chain after its miss, in the background: a fresh worker finds it.
    wait_until(fresh_source, 30, "the daemon never served the chain")

    async def run() -> list[str | None]:
        async with AsyncClient(daemon.address, ENC, timeout_ms=TIMEOUT_MS, follow=False) as a:
            got = []
            for t in (text + " async", text + " async!"):
                assert await a.encode_ordinary(t) == enc.encode_ordinary(t)
                got.append(a.last_source)
            return got

    assert asyncio.run(run()) == ["daemon", "l1"]
    with Client(f"ipc://{daemon_dir}/absent.sock", ENC, timeout_ms=50) as alone:
        assert exact(alone, text) == "local" and exact(alone, text + "!") == "l1"
        assert alone.encode_ordinary_batch([text, "x"]) == enc.encode_ordinary_batch([text, "x"])
        assert alone.last_source == "mixed"


@pytest.mark.parametrize("in_loop", [True, False], ids=["in-the-loop", "after-it"])
def test_async_close_reports_the_map_hits_not_yet_sent(
    start_daemon: Callable[..., DaemonProcess], in_loop: bool
) -> None:
    daemon = start_daemon()
    enc = get_encoding(ENC)
    prefixes = [_prefix(f"touch {i}") for i in range(2)]
    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS, min_uses=1) as filler:
        for p in prefixes:
            filler.encode_ordinary("", prefix=p)
    _filled(daemon, 2)
    before = daemon.stats()["get_hits"]
    client = AsyncClient(daemon.address, ENC, timeout_ms=TIMEOUT_MS)

    async def run() -> int:
        # Map hits alone never connect the socket: the report at close goes on a socket still
        # connecting, which close waits for (briefly) rather than drop the report.
        for p in prefixes:
            assert await client.encode_ordinary("!", prefix=p) == enc.encode_ordinary(p + "!")
            assert client.last_source == "map"
        assert client._core.hostmap is not None
        unsent = len(client._core.hostmap._touched)  # reported at most once a second
        if in_loop:
            client.close()
        return unsent

    unsent = asyncio.run(run())
    if not in_loop:
        client.close()  # no loop runs: the closing flow needs none
    assert unsent >= 1  # the second hit came within a second of the first report
    wait_until(
        lambda: daemon.stats()["get_hits"] == before + 2, 30, "the close never reported them"
    )
