"""A worker starting takes the host's hot prefixes into its L1 (the daemon's hot list).

The list's format and the reader's budget against their definitions; what a starting worker
takes checked as strictly as a hit (only entries of its namespace, encoding and policies,
intact, valid UTF-8); then whole, with a real daemon and fresh worker processes, running and
SIGSTOPped: a fresh worker's first request for a hot prefix is an L1 hit with tiktoken's ids.
"""

from __future__ import annotations

import os
import signal
import textwrap
from array import array
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("zmq")
lmdb = pytest.importorskip("lmdb")

from flashtoken.client import Client  # noqa: E402

from client.hostmap import HostMapView  # noqa: E402
from client.settings import CLIENT_DEFAULTS  # noqa: E402
from flashtoken import get_encoding, sharedmap, split_prefix  # noqa: E402
from flashtoken.encodings import encoding_id  # noqa: E402
from flashtoken.mapentry import (  # noqa: E402
    HOT_KEYS,
    SEEN_MARKER,
    entry_identity,
    hot_keys,
    pack_entry,
    pack_hot,
)
from flashtoken.mapreader import MapReader  # noqa: E402
from flashtoken.sharedmap import MapWriter  # noqa: E402
from tests.daemon_fixtures import DaemonProcess  # noqa: E402
from tests.polling import wait_until  # noqa: E402
from tests.test_first_request import HELD_PREFIX, SUFFIXES, holding_daemon, run_worker  # noqa: E402

ENC = "cl100k_base"
TIMEOUT_MS = 5000
PRELOAD = CLIENT_DEFAULTS["preload_bytes"]  # the suite turns it off (tests/conftest.py)
keys16 = st.lists(st.binary(min_size=16, max_size=16), max_size=2 * HOT_KEYS)


@settings(max_examples=200, deadline=None)
@given(keys16, st.binary(max_size=80))
def test_the_hot_list_reads_back_its_keys_and_nothing_from_garbage(
    keys: list[bytes], garbage: bytes
) -> None:
    assert hot_keys(pack_hot(keys)) == keys[:HOT_KEYS]
    got = hot_keys(garbage)
    assert got == [] or (garbage.startswith(b"FTH1") and b"".join(got) == garbage[4:])


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=8),
    st.lists(st.sampled_from(["<|endoftext|>", "<|fim_prefix|>"]), unique=True),
    st.binary(max_size=200),
    st.binary(max_size=60),
)
def test_an_entrys_identity_is_what_it_was_packed_with(
    namespace: bytes, allowed: list[str], prefix: bytes, tokens4: bytes
) -> None:
    policy = tuple(sorted(allowed))
    tokens = tokens4[: len(tokens4) // 4 * 4]
    value = pack_entry(namespace, bytes(32), policy, prefix, len(prefix), tokens)
    assert entry_identity(value) == (namespace, bytes(32), policy, prefix)
    assert entry_identity(SEEN_MARKER) is None  # a sighting has no tokens to take
    for cut in range(0, len(value), 7):  # a value cut short is never read past its end
        short = entry_identity(value[:cut])
        assert short is None or len(short[3]) <= cut


@pytest.fixture
def map_dir(tmp_path) -> Iterator[str]:
    directory = tmp_path / "daemon"
    directory.mkdir(mode=0o700)
    yield str(directory)
    sharedmap.forget_environment(sharedmap.map_path(str(directory)))


def _store(writer: MapWriter, prefix: str, ns: bytes = b"", allowed: tuple[str, ...] = ()):
    """Store ``prefix`` as the daemon would (its split under that policy), return its key."""
    enc = get_encoding(ENC)
    split = split_prefix(enc, prefix, allowed_special=frozenset(allowed))
    data = prefix.encode("utf-8")
    eid = encoding_id(enc)
    assert writer.store(ns, eid, allowed, data, split.cut, array("I", split.head).tobytes())
    return writer.key(ns, eid, allowed, data)


def test_the_reader_takes_the_listed_entries_newest_first_within_its_budget(map_dir) -> None:
    writer = MapWriter(sharedmap.map_path(map_dir), 1 << 24)
    keys = [_store(writer, f"prompt {i}: " + "be brief. " * 200) for i in range(5)]
    writer.touch([keys[1]])  # the most recently used
    writer.publish_hot()
    reader = MapReader(sharedmap.map_path(map_dir))
    taken = reader.hot(1 << 20)
    assert [k for k, _ in taken] == [keys[1], keys[4], keys[3], keys[2], keys[0]]
    one = len(taken[0][1])
    assert [k for k, _ in reader.hot(2 * one)] == [keys[1], keys[4]]
    assert reader.hot(one - 1) == []
    writer.delete(keys[4])  # evicted after the list was written: skipped, not an error
    assert [k for k, _ in reader.hot(1 << 20)][:2] == [keys[1], keys[3]]
    writer.close()


def test_a_starting_worker_takes_only_intact_entries_of_its_own(map_dir) -> None:
    """Other namespaces, other encodings' ids, damaged values and policies naming tokens the
    encoding lacks are left in the map; every entry taken gives tiktoken's ids."""
    enc = get_encoding(ENC)
    eid = encoding_id(enc)
    writer = MapWriter(sharedmap.map_path(map_dir), 1 << 24)
    ours = "System: answer in French. écrivez 中文 's\n\n " * 100
    special = "Tools: <|endoftext|> then more " * 80
    _store(writer, ours)
    _store(writer, special, allowed=("<|endoftext|>",))
    _store(writer, "Another tenant's prompt. " * 100, ns=b"tenant-b")
    data = ("Another encoding's prompt. " * 100).encode()
    writer.store(b"", bytes(32), (), data, 10, array("I", [1, 2, 3]).tobytes())
    data = ("A policy the encoding lacks. " * 100).encode()
    writer.store(b"", eid, ("<|im_start|>",), data, 10, array("I", [1, 2]).tobytes())
    damaged = ("A damaged entry. " * 100).encode()
    value = bytearray(pack_entry(b"", eid, (), damaged, 10, array("I", [5, 6]).tobytes()))
    value[-1] ^= 1
    writer.put(writer.key(b"", eid, (), damaged), bytes(value))
    invalid = b"\xff\xfe not UTF-8 " * 50
    writer.store(b"", eid, (), invalid, 4, array("I", [7]).tobytes())
    writer.publish_hot()
    view = HostMapView(f"ipc://{map_dir}/daemon.sock", enc)
    taken = view.hot(enc, b"", eid, 1 << 20)
    assert sorted((p, a) for p, a, _ in taken) == sorted(
        [(ours, frozenset()), (special, frozenset({"<|endoftext|>"}))]
    )
    for prefix, allowed, cache in taken:
        for suffix in ("", " Q?", "s", "<|endoftext|>", " 中文"):
            want = enc.encode(prefix + suffix, allowed_special=allowed, disallowed_special=())
            got = cache.encode(suffix, allowed_special=allowed, disallowed_special=())
            assert got == want
    assert view.pending() is None  # taken at start is not used: no hit reported
    writer.close()


FRESH_WORKER = textwrap.dedent(
    """
    import json, sys
    from flashtoken import get_encoding
    from flashtoken.client import Client
    address, prefix, suffixes, options = json.loads(sys.stdin.read())
    enc = get_encoding("cl100k_base")
    client = Client(address, "cl100k_base", timeout_ms=5000, **options)
    out = {"preloaded": client.stats()["preloaded"], "exact": [], "sources": []}
    for suffix in suffixes:
        tokens = client.encode_ordinary(suffix, prefix=prefix)
        out["sources"].append(client.last_source)
        out["exact"].append(tokens == enc.encode_ordinary(prefix + suffix))
    out["stats"] = client.stats()
    print(json.dumps(out))
    client.close()
    """
)


def _fresh_worker(address: str, prefix: str, suffixes: list[str], **options: object) -> dict:
    # With the client's own default for preload_bytes (the suite turns it off).
    env = {k: v for k, v in os.environ.items() if k != "FLASHTOKEN_PRELOAD_BYTES"}
    return run_worker(FRESH_WORKER, [address, prefix, suffixes, options], env)


def test_a_fresh_worker_serves_a_hot_prefix_from_its_l1_also_with_the_daemon_frozen(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    daemon = holding_daemon(start_daemon)
    prefix, suffixes = HELD_PREFIX, SUFFIXES

    def preloaded() -> bool:
        with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS, preload_bytes=PRELOAD) as probe:
            return probe.stats()["preloaded"] == 1

    wait_until(preloaded, 30, "the daemon never listed the filled prefix as hot")
    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS, preload_bytes=PRELOAD) as probe:
        assert len(probe._core.l1) == 1
        probe._core.distrust()  # what the daemon gave, preloaded too, is dropped with the rest
        assert len(probe._core.l1) == 0
    got = _fresh_worker(daemon.address, prefix, suffixes)
    assert got["preloaded"] == 1 and all(got["exact"]), got
    assert set(got["sources"]) == {"l1"} and got["stats"]["map_hits"] == 0, got
    # Without preloading, the first request reads the map instead.
    got = _fresh_worker(daemon.address, prefix, suffixes[:2], preload_bytes=0)
    assert got["preloaded"] == 0 and all(got["exact"]) and got["sources"] == ["map", "l1"], got
    # Another tenant takes nothing of this one's.
    got = _fresh_worker(daemon.address, prefix, [" Q?"], namespace="tenant-b")
    assert got["preloaded"] == 0 and all(got["exact"]) and got["sources"] != ["l1"], got
    daemon.signal(signal.SIGSTOP)
    try:
        got = _fresh_worker(daemon.address, prefix, suffixes[:3])
        assert got["preloaded"] == 1 and all(got["exact"]), got
        assert set(got["sources"]) == {"l1"}, got
        assert got["stats"]["timeouts"] == 0 and got["stats"]["fallbacks"] == 0, got
    finally:
        daemon.signal(signal.SIGCONT)
