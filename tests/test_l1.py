"""The declared prefixes' L1 (client/l1.py): least recently used first within its byte budget,
what the daemon gave dropped when it is distrusted, a lock a fork left held made anew."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("zmq")

from flashtoken.client.l1 import PrefixL1, l1_key  # noqa: E402

from flashtoken import FixedPrefixTokenCache, get_encoding  # noqa: E402
from flashtoken.admission import WholeText  # noqa: E402

ENC = get_encoding("cl100k_base")
CACHES = [
    FixedPrefixTokenCache(ENC, f"prefix {i}: " + "words and more words " * (8 * i))
    for i in range(8)
]


def _size(cache: FixedPrefixTokenCache) -> int:
    l1 = PrefixL1(10**9, {"l1_hits": 0})
    l1.put("k", cache)
    return l1.bytes


@settings(max_examples=150, deadline=None)
@given(
    limit=st.integers(0, 12_000),
    ops=st.lists(st.tuples(st.sampled_from(["put", "get"]), st.integers(0, 7)), max_size=40),
)
def test_the_l1_holds_the_most_recently_used_within_its_budget(limit: int, ops: list) -> None:
    """Against a model: after any puts and gets, the entries held are the most recently used
    ones that fit, oldest evicted first, and ``bytes`` is the sum of their sizes."""
    counters = {"l1_hits": 0}
    l1 = PrefixL1(limit, counters)
    model: OrderedDict[int, int] = OrderedDict()  # index -> size, oldest first
    hits = 0
    for op, i in ops:
        key = l1_key(CACHES[i].prefix, frozenset())
        if op == "get":
            found = l1.get(key)
            assert (found is CACHES[i]) == (i in model)
            if i in model:
                model.move_to_end(i)
                hits += 1
            continue
        l1.put(key, CACHES[i])
        size = _size(CACHES[i])
        if size > limit:
            continue  # never kept, nothing evicted for it
        model.pop(i, None)
        while model and sum(model.values()) + size > limit:
            model.popitem(last=False)
        model[i] = size
    assert l1.bytes == sum(model.values()) <= max(limit, 0)
    assert len(l1) == len(model)
    assert counters["l1_hits"] == hits
    for i in range(len(CACHES)):
        assert (l1.get(l1_key(CACHES[i].prefix, frozenset())) is not None) == (i in model)


def test_distrust_drops_what_the_daemon_gave_and_nothing_else() -> None:
    l1 = PrefixL1(10**7, {"l1_hits": 0})
    given_keys = [l1_key(c.prefix, frozenset()) for c in CACHES[:4]]
    for key, cache in zip(given_keys, CACHES[:4], strict=True):
        l1.put(key, cache, from_daemon=True)
    l1.put(given_keys[0], CACHES[0])  # encoded here since: no longer the daemon's
    for cache in CACHES[4:]:
        l1.put(l1_key(cache.prefix, frozenset({"<|endoftext|>"})), cache)
    l1.distrust()
    assert len(l1) == 1 + 4 and l1.get(given_keys[0]) is CACHES[0]
    assert all(l1.get(key) is None for key in given_keys[1:])
    assert l1.bytes == sum(_size(c) for c in [CACHES[0], *CACHES[4:]])


def test_a_first_sight_is_never_kept() -> None:
    l1 = PrefixL1(10**7, {"l1_hits": 0})
    l1.put("p", WholeText(ENC, "p"))
    assert (len(l1), l1.bytes, l1.get("p")) == (0, 0, None)


def test_a_fork_with_the_lock_held_leaves_an_empty_usable_l1() -> None:
    """A parent's thread half way through an update at the fork: the child's L1 starts empty,
    with a lock it can take (the parent's would never be released)."""
    l1 = PrefixL1(10**7, {"l1_hits": 0})
    l1.put("a", CACHES[1])
    with l1._lock:  # what that thread held
        pid = os.fork()
        if pid == 0:  # the child: what client/sockets.py's fork hook runs
            l1.after_fork()
            ok = len(l1) == 0 and l1.bytes == 0 and l1._lock.acquire(blocking=False)
            if ok:
                l1._lock.release()
                l1.put("b", CACHES[2])
            os._exit(0 if ok and l1.get("b") is CACHES[2] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    l1.after_fork()  # unlocked: the entries stay
    assert l1.get("a") is CACHES[1]
