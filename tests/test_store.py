"""daemon/store.py: the byte budget is never exceeded, LRU order, confirmed hits, honest stats.

A declared prefix is a root node of the one chain store (flashtoken/chains.py), confirmed by
its bytes: its tail after the cut is compared, its head by decoding its tokens (real tiktoken).
"""

from __future__ import annotations

import random
from array import array

import pytest
from flashtoken.daemon.settings import parse_size
from flashtoken.daemon.store import ENTRY_OVERHEAD, PrefixScope, Store

from flashtoken import get_encoding, split_prefix
from flashtoken.wire import tokens_from_frame, tokens_to_frame

ENC = get_encoding("cl100k_base")
SCOPE = PrefixScope("cl100k_base", (), b"n" * 16)


def _decoders(name: str):  # type: ignore[no-untyped-def]
    enc = get_encoding(name)
    return lambda frame: enc.decode_bytes(tokens_from_frame(frame))


def _store(max_bytes: int) -> Store:
    return Store(max_bytes, _decoders)


def _put(store: Store, key: bytes, prefix: bytes, scope: PrefixScope = SCOPE) -> bool:
    text = prefix.decode()
    split = split_prefix(ENC, text)
    cut_byte = len(text[: split.cut].encode())
    frame = tokens_to_frame(array("I", split.head))
    return store.put(store.prefix_node(key, prefix, scope, split.cut, cut_byte, frame))


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_hit_is_confirmed_by_prefix_encoding_and_policy() -> None:
    store = _store(1 << 20)
    prefix = b"You are a helpful assistant. Answer briefly and well."
    assert _put(store, _key(1), prefix)
    node = store.get(_key(1), prefix, SCOPE)
    assert (
        node is not None
        and ENC.decode_bytes(tokens_from_frame(node.tokens)) == prefix[: node.cut_byte]
    )
    assert store.get(_key(1), prefix.replace(b"You", b"you"), SCOPE) is None  # the head differs
    assert store.get(_key(1), prefix[:-1] + b"!", SCOPE) is None  # the tail differs
    assert store.get(_key(1), prefix + b" ", SCOPE) is None  # longer
    assert store.get(_key(1), prefix, PrefixScope("o200k_base", (), SCOPE.ns)) is None
    assert (
        store.get(_key(1), prefix, PrefixScope("cl100k_base", ("<|endoftext|>",), SCOPE.ns)) is None
    )
    assert store.get(_key(1), prefix, PrefixScope("cl100k_base", (), b"m" * 16)) is None
    assert store.stats()["collisions_detected"] == 6
    assert (store.cmd_get, store.get_hits, store.get_misses) == (7, 1, 6)


def test_collision_keeps_the_entry_already_there() -> None:
    store = _store(1 << 20)
    assert _put(store, _key(1), b"first prefix of all")
    assert not _put(store, _key(1), b"second prefix here")
    assert store.get(_key(1), b"first prefix of all", SCOPE) is not None
    assert _put(store, _key(1), b"first prefix of all")  # the same: held already
    assert len(store) == 1


def test_entry_larger_than_the_budget_is_refused() -> None:
    prefix = b"x" * 90
    store = _store(ENTRY_OVERHEAD + 10)
    assert not _put(store, _key(1), prefix)
    assert store.stats()["items_too_large"] == 1 and store.used_bytes == 0
    fits = _store(1 << 20)
    assert _put(fits, _key(1), prefix)
    exact = _store(fits.used_bytes)
    assert _put(exact, _key(2), prefix)  # exactly the budget
    assert exact.used_bytes == exact.max_bytes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_budget_never_exceeded_under_10x_oversubscription(seed: int) -> None:
    rng = random.Random(seed)
    store = _store(64 * 1024)
    words = ["alpha", "beta", " gamma", "\n", "  ", "délta", "中文", "'s", "123"]
    order: list[bytes] = []  # the model LRU: least recent first
    prefixes: dict[bytes, bytes] = {}
    written = 0
    for i in range(600):
        if order and rng.random() < 0.3:
            key = rng.choice(order)
            assert store.get(key, prefixes[key], SCOPE) is not None
            order.remove(key)
            order.append(key)
            continue
        prefix = "".join(rng.choice(words) for _ in range(rng.randrange(1, 600))).encode()
        assert _put(store, _key(i), prefix)
        written += store.chains.size(store.peek(_key(i)))
        prefixes[_key(i)] = prefix
        order.append(_key(i))
        assert store.used_bytes <= store.max_bytes
        assert store.used_bytes == sum(store.chains.size(store.peek(k)) for k in store.keys())
        # What survives is exactly the most recently used suffix of the model order.
        order = order[len(order) - len(store) :]
        assert store.keys() == order
    assert written > 10 * store.max_bytes
    stats = store.stats()
    assert stats["evictions"] + stats["curr_items"] == stats["total_items"]
    assert stats["get_hits"] + stats["get_misses"] == stats["cmd_get"]
    assert stats["bytes"] <= stats["limit_maxbytes"] == 64 * 1024


def test_parse_size() -> None:
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1GiB") == 2**30
    assert parse_size("64k") == 65536
    assert parse_size("123") == 123
    for bad in ("", "1.5GiB", "-1", "12 parsecs"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_a_walk_steps_through_at_most_max_walk_blocks_new_blocks() -> None:
    import xxhash
    from flashtoken.daemon.store import MAX_WALK_BLOCKS, ChainScope

    block, seed = 64, b"s" * 16
    scope = ChainScope("e", (), seed)
    data = bytes(random.Random(5).randrange(256) for _ in range(block * (MAX_WALK_BLOCKS + 100)))
    store = Store(1 << 30, lambda name: lambda frame: frame)  # "tokens" are the bytes themselves
    state, nodes = xxhash.xxh3_128(), []
    for i in range(len(data) // block):
        state.update(data[i * block : (i + 1) * block])
        chunk = data[i * block : (i + 1) * block]
        # A block cut at its end whose "tokens" are its bytes (decode: the identity).
        nodes.append(
            store.chains.node(
                store.key(seed, state.digest()),
                nodes[-1] if nodes else None,
                scope,
                data,
                i * block,
                (i + 1) * block,
                -1,
                (i + 1) * block,
                chunk,
            )
        )
    assert len(store.put_chain(None, nodes)) == len(nodes)
    path, _ = store.walk(seed, data, block, scope)
    assert len(path) == MAX_WALK_BLOCKS  # the rest is a miss this time
    path, _ = store.walk(seed, data, block, scope)
    assert len(path) == len(nodes)  # the next walk starts from the first one's end (a memo)
    assert store.stats()["blocks"] == len(nodes)
