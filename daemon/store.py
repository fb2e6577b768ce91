"""The daemon's store: a byte-budgeted LRU of confirmed prefix splits.

Touched only from the daemon's loop thread (fills hand their results back to it), so it has no
lock: a lock would cost every GET and protect nothing the loop does not already serialise.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from .settings import ENTRY_OVERHEAD


@dataclass(frozen=True)
class Entry:
    """One prefix, split: ``tokens`` (little-endian uint32 bytes) are its tokens before ``cut``.

    ``prefix``, ``enc`` and ``allowed`` are kept to confirm a hit: the key only locates.
    """

    prefix: bytes
    enc: str
    allowed: tuple[str, ...]
    tokens: bytes
    cut: int

    @property
    def size(self) -> int:
        return len(self.tokens) + len(self.prefix) + ENTRY_OVERHEAD

    def matches(self, prefix: bytes, enc: str, allowed: tuple[str, ...]) -> bool:
        # enc and allowed first: cheap; the prefix comparison is a memcmp.
        return self.enc == enc and self.allowed == allowed and self.prefix == prefix


class Store:
    """``key -> Entry``, least recently used first; ``bytes`` never exceeds ``max_bytes``.

    A lookup whose key is present but whose entry holds another prefix (a hash collision, or a
    crafted one) is a miss counted in ``collisions_detected``. The entry already there is kept:
    replacing it would let anyone who can craft collisions evict another tenant's hot prefix at
    will. The colliding prefix is simply not cached until LRU retires the other one.

    >>> store = Store(max_bytes=4096)
    >>> store.put(b"k" * 16, Entry(b"hello", "cl100k_base", (), b"\\x01\\x00\\x00\\x00", 5))
    True
    >>> store.get(b"k" * 16, b"hello", "cl100k_base", ()).cut
    5
    >>> store.get(b"k" * 16, b"hellO", "cl100k_base", ()) is None, store.collisions_detected
    (True, 1)
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.bytes = 0
        self.cmd_get = 0
        self.get_hits = 0
        self.get_misses = 0
        self.collisions_detected = 0
        self.evictions = 0
        self.total_items = 0
        self.items_too_large = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def keys(self) -> list[bytes]:
        """Keys, least recently used first."""
        return list(self._entries)

    def peek(self, key: bytes) -> Optional[Entry]:
        """The entry under ``key`` without counting a get or touching the LRU order."""
        return self._entries.get(key)

    def get(self, key: bytes, prefix: bytes, enc: str, allowed: tuple[str, ...]) -> Optional[Entry]:
        """The confirmed entry for this prefix, or None; counts a get and a hit or a miss."""
        self.cmd_get += 1
        entry = self._entries.get(key)
        if entry is not None:
            if entry.matches(prefix, enc, allowed):
                self._entries.move_to_end(key)
                self.get_hits += 1
                return entry
            self.collisions_detected += 1
        self.get_misses += 1
        return None

    def count_miss(self) -> None:
        """Count a get answered without a lookup (the daemon refused the prefix's fill before)."""
        self.cmd_get += 1
        self.get_misses += 1

    def put(self, key: bytes, entry: Entry) -> bool:
        """Store ``entry``, evicting the least recently used; False if it was not stored.

        Not stored: an entry larger than the whole budget, or one whose key holds another
        prefix's entry (see the class docstring).
        """
        size = entry.size
        if size > self.max_bytes:
            self.items_too_large += 1
            return False
        old = self._entries.get(key)
        if old is not None:
            if not old.matches(entry.prefix, entry.enc, entry.allowed):
                return False
            self._remove(key)
        while self.bytes + size > self.max_bytes:
            self._remove(next(iter(self._entries)))
            self.evictions += 1
        self._entries[key] = entry
        self.bytes += size
        self.total_items += 1
        return True

    def _remove(self, key: bytes) -> None:
        self.bytes -= self._entries.pop(key).size

    def stats(self) -> dict[str, int]:
        return {
            "cmd_get": self.cmd_get,
            "get_hits": self.get_hits,
            "get_misses": self.get_misses,
            "collisions_detected": self.collisions_detected,
            "evictions": self.evictions,
            "curr_items": len(self._entries),
            "total_items": self.total_items,
            "items_too_large": self.items_too_large,
            "bytes": self.bytes,
            "limit_maxbytes": self.max_bytes,
        }
