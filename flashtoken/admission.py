"""Admission on the second sight: what is cached is what was asked for at least twice.

A prompt whose declared prefix changes on every request (a chat's whole history passed as
``prefix=``) is never served from a cache, so caching it only costs: an encode split in two, an
L1 entry, a fill, and the eviction of something useful. A :class:`SecondSight` remembers the
digests of texts seen once (memcached's and TinyLFU's doorkeeper idea, minus the counting), so
the first request for a text is encoded whole, exactly as tiktoken would, and only a text seen
again is cached.

Bounded: at most ``capacity`` digests (16 bytes each), the oldest half forgotten when full, so a
flood of distinct texts costs a fixed amount of memory and at worst one more miss for a text
that comes back after it.
"""

from __future__ import annotations

import threading

__all__ = ["SecondSight"]


class SecondSight:
    """``seen_before(digest)``: whether ``digest`` was offered before (and remember it)."""

    def __init__(self, capacity: int = 65536) -> None:
        if capacity < 2:
            raise ValueError(f"capacity must be 2 or more, not {capacity}")
        self.capacity = capacity
        self._seen: dict[bytes, None] = {}  # insertion-ordered: the oldest first
        self._lock = threading.Lock()

    def seen_before(self, digest: bytes) -> bool:
        with self._lock:
            if digest in self._seen:
                return True
            if len(self._seen) >= self.capacity:
                for old in list(self._seen)[: self.capacity // 2]:
                    del self._seen[old]
            self._seen[digest] = None
            return False

    def forget(self, digest: bytes) -> None:
        """Forget ``digest`` (the text is cached now: its sightings are the cache's business)."""
        with self._lock:
            self._seen.pop(digest, None)

    def __len__(self) -> int:
        return len(self._seen)
