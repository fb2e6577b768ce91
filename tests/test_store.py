"""daemon/store.py: the byte budget is never exceeded, LRU order, confirmed hits, honest stats."""

from __future__ import annotations

import random

import pytest
from flashtoken.daemon.settings import parse_size
from flashtoken.daemon.store import ENTRY_OVERHEAD, Entry, Store


def _entry(prefix: bytes, n_tokens: int = 4, enc: str = "cl100k_base") -> Entry:
    return Entry(prefix, enc, (), b"\x01\x00\x00\x00" * n_tokens, len(prefix))


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_hit_is_confirmed_by_prefix_encoding_and_policy() -> None:
    store = Store(1 << 20)
    assert store.put(_key(1), _entry(b"abc"))
    assert store.get(_key(1), b"abc", "cl100k_base", ()) is not None
    assert store.get(_key(1), b"abd", "cl100k_base", ()) is None
    assert store.get(_key(1), b"abc", "o200k_base", ()) is None
    assert store.get(_key(1), b"abc", "cl100k_base", ("<|endoftext|>",)) is None
    assert store.collisions_detected == 3
    assert (store.cmd_get, store.get_hits, store.get_misses) == (4, 1, 3)


def test_collision_keeps_the_entry_already_there() -> None:
    store = Store(1 << 20)
    store.put(_key(1), _entry(b"first"))
    assert not store.put(_key(1), _entry(b"second"))
    assert store.peek(_key(1)).prefix == b"first"
    assert store.put(_key(1), _entry(b"first", 8))  # same prefix: replaced (a refill)
    assert len(store) == 1 and store.bytes == _entry(b"first", 8).size


def test_entry_larger_than_the_budget_is_refused() -> None:
    store = Store(ENTRY_OVERHEAD + 100)
    assert not store.put(_key(1), _entry(b"x" * 90, 4))
    assert store.items_too_large == 1 and store.bytes == 0
    assert store.put(_key(2), _entry(b"x" * 84, 4))  # exactly the budget
    assert store.bytes == store.max_bytes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_budget_never_exceeded_under_10x_oversubscription(seed: int) -> None:
    rng = random.Random(seed)
    store = Store(64 * 1024)
    written = 0
    order: list[bytes] = []  # the model LRU: least recent first
    for i in range(2000):
        if order and rng.random() < 0.3:
            key = rng.choice(order)
            entry = store.peek(key)
            if entry is not None:
                assert store.get(key, entry.prefix, entry.enc, ()) is entry
                order.remove(key)
                order.append(key)
            continue
        entry = _entry(rng.randbytes(rng.randrange(1, 2000)), rng.randrange(0, 500))
        assert store.put(_key(i), entry)
        written += entry.size
        order.append(_key(i))
        assert store.bytes <= store.max_bytes
        assert store.bytes == sum(store.peek(k).size for k in store.keys())
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
    from flashtoken.daemon.store import MAX_WALK_BLOCKS

    block, seed = 64, b"s" * 16
    data = bytes(random.Random(5).randrange(256) for _ in range(block * (MAX_WALK_BLOCKS + 100)))
    state, digests, entries = xxhash.xxh3_128(), [], []
    for i in range(len(data) // block):
        state.update(data[i * block : (i + 1) * block])
        digests.append(state.digest())
        # A block cut at its end whose "tokens" are its bytes (decode: the identity).
        chunk = data[i * block : (i + 1) * block]
        entries.append(Entry(b"", "e", (), chunk, (i + 1) * block, None, (i + 1) * block, seed))
    store = Store(1 << 30)
    assert len(store.put_chain(seed, digests, entries)) == len(entries)
    path, _ = store.walk(seed, data, block, "e", (), lambda frame: frame)
    assert len(path) == MAX_WALK_BLOCKS  # the rest is a miss this time
    path, _ = store.walk(seed, data, block, "e", (), lambda frame: frame)
    assert len(path) == len(entries)  # the next walk starts from the first one's end (a memo)
