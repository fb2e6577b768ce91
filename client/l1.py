"""A worker's own caches of declared prefixes (the L1): least recently used first, within a byte
budget, remembering which entries the daemon gave, so that a daemon caught answering wrong loses
all it said before.

Hits take no lock (a dict lookup and a move to the end, each atomic under the GIL); updates take
one, which a fork may leave held (``after_fork``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Union

from flashtoken.admission import WholeText
from flashtoken.prefix import FixedPrefixTokenCache

__all__ = ["L1Key", "Prefix", "PrefixL1", "l1_key"]

_BYTES_PER_TOKEN = 12  # the head list (8, its ints shared) + tails and arrays made on demand
_BYTES_PER_ENTRY = 512

L1Key = Union[str, "tuple[str, frozenset[str]]"]
Prefix = FixedPrefixTokenCache | WholeText


def _entry_bytes(chars: int, cut: int) -> int:
    # cut // 3: a cheap token-count estimate (~3-4 chars a token), without a len() of the head.
    return _BYTES_PER_ENTRY + 2 * chars + _BYTES_PER_TOKEN * cut // 3


def l1_key(prefix: str, allowed: frozenset[str]) -> L1Key:
    # The ordinary policy is keyed by the str itself: its hash is cached on the object, and a
    # caller passing the same object gets an identity comparison, not a memcmp.
    return (prefix, allowed) if allowed else prefix


class PrefixL1:
    """The L1 of one client in one process; ``counters["l1_hits"]`` counts its hits."""

    def __init__(self, limit: int, counters: dict[str, int]) -> None:
        self.limit = limit
        self.bytes = 0
        self._entries: OrderedDict[L1Key, tuple[FixedPrefixTokenCache, int]] = OrderedDict()
        self._from_daemon: set[L1Key] = set()  # keys whose split the daemon gave
        self._lock = threading.Lock()
        self._counters = counters  # the client's (reset in place, never replaced)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: L1Key) -> FixedPrefixTokenCache | None:
        found = self._entries.get(key)
        if found is None:
            return None
        try:
            self._entries.move_to_end(key)
        except KeyError:  # evicted by another thread in between: still a valid cache
            pass
        self._counters["l1_hits"] += 1
        return found[0]

    def put(self, key: L1Key, cache: Prefix, from_daemon: bool = False) -> None:
        if isinstance(cache, WholeText):
            return  # a first sight: encoded whole, not kept (admission on the second sight)
        size = _entry_bytes(len(cache.prefix), cache.cut)
        if size > self.limit:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            while self._entries and self.bytes + size > self.limit:
                gone, (_, gone_size) = self._entries.popitem(last=False)
                self.bytes -= gone_size
                self._from_daemon.discard(gone)
            self._entries[key] = (cache, size)
            self.bytes += size
            if from_daemon:
                self._from_daemon.add(key)
            else:
                self._from_daemon.discard(key)

    def could_hold(self, chars: int) -> bool:
        """Whether a prefix of ``chars`` code points could be kept (its cut at the largest)."""
        return _entry_bytes(chars, chars) <= self.limit

    def distrust(self) -> None:
        """Drop every entry the daemon gave."""
        with self._lock:
            for key in self._from_daemon:
                old = self._entries.pop(key, None)
                if old is not None:
                    self.bytes -= old[1]
            self._from_daemon = set()

    def after_fork(self) -> None:
        """In a child process: the same entries (plain data) and a fresh lock. A lock a parent's
        thread held at the fork would never be released: it is made anew, and the entries it
        guarded emptied (that thread was half way through an update)."""
        if self._lock.locked():
            self._entries = OrderedDict()
            self._from_daemon = set()
            self.bytes = 0
        self._lock = threading.Lock()
