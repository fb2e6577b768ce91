"""A worker's side of the host's shared map: hits with no round trip, and the hits it reports.

The daemon writes declared prefixes into an LMDB map in its private directory
(flashtoken/sharedmap.py); every worker on the host opens it read-only. A hit costs a hash, a
lookup, a memcmp of the prefix and a checksum, then building the token list: no socket, so hits
go on while the daemon is frozen or restarting. What the worker trusts, and why: the map lies in
the daemon's private directory (owner-only, checked before it is opened), so only the daemon's
user can write it; the checksum catches a damaged file; the stored prefix bytes, namespace,
encoding id and policy confirm that the entry is this prompt's and not a colliding one.

Readers bypass the daemon, so the daemon cannot see which entries are used: the worker reports
its hits in batches (TOUCH, fire-and-forget) for the daemon's least-recently-used order.
"""

from __future__ import annotations

import os
import time

import tiktoken

from flashtoken.prefix import FixedPrefixTokenCache, PrefixSplit
from flashtoken.wire import ipc_path

__all__ = ["HostMapView"]

TOUCH_BATCH = 256  # keys per TOUCH: 4 KiB
TOUCH_EVERY_S = 1.0  # a batch is sent at least this often while hits come
FIRST_REPORT_AFTER_S = 0.05


def _first_report() -> float:
    # A process's first hits are reported soon after it starts (a worker recycled early still
    # counts), but not within its first request: that would make the socket on its path.
    return time.monotonic() - TOUCH_EVERY_S + FIRST_REPORT_AFTER_S


class HostMapView:
    """The host map as one worker sees it; ``None``-like (no hits) for a non-ipc daemon."""

    def __init__(self, address: str) -> None:
        from flashtoken.sharedmap import MapReader, map_path  # lmdb: imported by the client only

        path = ipc_path(address)
        self.reader = None if path is None else MapReader(map_path(os.path.dirname(path)))
        if self.reader is not None:
            self.reader.open()  # here, not in the first request (a fork reopens it lazily)
        self._touched: list[bytes] = []
        self._last_report = _first_report()

    def lookup(
        self,
        enc: tiktoken.Encoding,
        namespace: bytes,
        eid: bytes,
        allowed: frozenset,
        prefix: str,
        data: bytes,
    ) -> FixedPrefixTokenCache | None:
        """The L1 entry for ``prefix`` from the map, or None (not there, or no usable map)."""
        if self.reader is None:
            return None
        hit = self.reader.get(namespace, eid, tuple(sorted(allowed)), data)
        if hit is None or hit.cut > len(prefix):
            return None
        self._touched.append(hit.key)
        return FixedPrefixTokenCache.from_split(
            enc, prefix, PrefixSplit(hit.tokens, hit.cut), allowed_special=allowed
        )

    def touches_due(self) -> bytes | None:
        """The keys to report now (a full batch, or hits older than a second), or None."""
        if not self._touched:
            return None
        now = time.monotonic()
        if len(self._touched) < TOUCH_BATCH and now - self._last_report < TOUCH_EVERY_S:
            return None
        keys, self._touched = self._touched[:TOUCH_BATCH], self._touched[TOUCH_BATCH:]
        self._last_report = now
        return b"".join(keys)

    def after_fork(self) -> None:
        self._touched = []  # the parent's hits are the parent's to report
        self._last_report = _first_report()
