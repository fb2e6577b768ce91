"""The daemon's side of the host's shared map: declared prefixes, stored where workers read them.

The daemon stays the map's only writer (flashtoken/sharedmap.py): it encodes a prefix from the
bytes it received, derives the key itself, writes the entry, evicts least recently used first
within ``max_bytes`` and counts. Workers read the map without asking, and report the keys they
hit in batches (TOUCH), which is how those hits reach the LRU order and ``get_hits``.

Touched only from the daemon's loop thread, like the store.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flashtoken.mapentry import entry_tokens
from flashtoken.sharedmap import MapWriter, map_path

__all__ = ["HostMap"]

_READER_CHECK_S = 5.0  # how often slots of dead readers are cleared
# How often the hot list is looked at: a change costs one small write transaction (no fsync)
# at most once a second, whatever the rate of hits, and is written within about two (an idle
# daemon's loop wakes once a second).
_HOT_EVERY_S = 1.0


class HostMap:
    """One map per daemon, next to its socket (the same private directory)."""

    def __init__(self, socket_path: str, max_bytes: int) -> None:
        self.writer = MapWriter(map_path(os.path.dirname(socket_path)), max_bytes)
        self.counters = {
            "map_stores": 0,
            "map_refused": 0,
            "map_touched": 0,
            "map_tokens_served": 0,
            "map_sightings": 0,
            "map_readers_cleared": 0,
        }
        self._next_check = time.monotonic() + _READER_CHECK_S
        self._next_hot = 0.0

    def get(
        self, namespace: bytes, eid: bytes, allowed: tuple[str, ...], prefix: bytes
    ) -> tuple[int, bytes] | None:
        """``(cut, token bytes)`` for a client that asked instead of reading (no map there)."""
        return self.writer.get(namespace, eid, allowed, prefix)

    def store(
        self,
        namespace: bytes,
        eid: bytes,
        allowed: tuple[str, ...],
        prefix: bytes,
        cut: int,
        tokens: bytes,
    ) -> bool:
        stored = self.writer.store(namespace, eid, allowed, prefix, cut, tokens)
        self.counters["map_stores" if stored else "map_refused"] += 1
        return stored

    def touch(self, keys: bytes) -> int:
        """A worker's batch of hits: those entries become the most recently used. A key not
        held is a sighting (a worker encoded that prefix whole, seeing no marker) or a hit on an
        entry evicted since: either way the host has now seen it, and says so in the map."""
        listed = [keys[i : i + 16] for i in range(0, len(keys), 16)]
        missing = self.writer.touch(listed)
        self.counters["map_touched"] += len(listed) - len(missing)
        self.counters["map_tokens_served"] += self._tokens(listed, set(missing))
        self.counters["map_sightings"] += self.writer.mark_seen(missing)
        return len(listed) - len(missing)

    def _tokens(self, listed: list[bytes], missing: set[bytes]) -> int:
        """The tokens the workers read from the map for these hits (each entry's count, from its
        header; zero-copy): the map's share of ``tokens_served``, which the daemon cannot count
        when it sends, since readers bypass it. Rejected: a count per key kept beside the
        writer's, which would have to follow every store, eviction and restart."""
        held = [key for key in listed if key not in missing]
        if not held:
            return 0
        with self.writer.env.begin(buffers=True) as txn:
            return sum(entry_tokens(txn.get(key, b"")) for key in held)

    def share(self, budget: int, used_elsewhere: int) -> None:
        """Keep this map within what ``budget`` leaves beside the in-memory chains."""
        self.writer.set_budget(budget - used_elsewhere)

    def housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_hot:
            self._next_hot = now + _HOT_EVERY_S
            self.writer.publish_hot()  # what a worker starting takes into its L1
        if now >= self._next_check:
            self._next_check = now + _READER_CHECK_S
            self.counters["map_readers_cleared"] += self.writer.check_readers()

    def stats(self) -> dict[str, Any]:
        return {
            "map_curr_items": len(self.writer),
            "map_bytes": self.writer.bytes,
            "map_tokens": self.writer.tokens,
            "map_seen": self.writer.seen,
            "map_limit_maxbytes": self.writer.max_bytes,
            "map_evictions": self.writer.evictions,
            "map_rebuilds": self.writer.rebuilds,
            **self.counters,
        }

    def close(self) -> None:
        self.writer.close()
