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

Admission on the second sight (flashtoken/admission.py): a prefix with nothing in the map is
the host's first sight of it. The worker encodes that request whole, as tiktoken would, caches
nothing and reports the key at once; the daemon leaves a marker under it. A worker that finds
the marker asks the daemon, which encodes the prefix once for the host. A prefix that changes
on every request thus costs a lookup and a 16-byte message, not a split encode, an L1 entry and
a fill.

A worker starting takes the host's hot prefixes (the daemon's list of the entries used most
recently) into its L1, within ``preload_bytes``: a worker recycled by gunicorn's
``--max-requests`` serves its first request for a hot prefix from its L1, as the one it
replaced did (~0.35 ms more at start for each 32 KiB prefix taken).
"""

from __future__ import annotations

import os
import time
from array import array
from typing import TYPE_CHECKING

import tiktoken

from flashtoken.backends import Encoder, get_encoder
from flashtoken.ids import warm as warm_ids
from flashtoken.mapentry import Hit, entry_identity, pack_entry
from flashtoken.prefix import FixedPrefixTokenCache, PrefixSplit
from flashtoken.wire import ipc_path

if TYPE_CHECKING:
    from flashtoken.mapreader import Absent

__all__ = ["HostMapView"]

TOUCH_BATCH = 256  # keys per TOUCH: 4 KiB
TOUCH_EVERY_S = 1.0  # a batch is sent at least this often while hits come
FIRST_REPORT_AFTER_S = 0.05
# Sightings go sooner, so that other workers find the marker; but not one send per request: a
# send to an idle socket wakes ZeroMQ's I/O thread, which on a busy host preempts the sender
# for 0.2-0.5 ms (measured), as much as encoding 8 KiB.
SIGHTINGS_EVERY_S = 0.05


def _first_report() -> float:
    # A process's first hits are reported soon after it starts (a worker recycled early still
    # counts), but not within its first request: that would make the socket on its path.
    return time.monotonic() - TOUCH_EVERY_S + FIRST_REPORT_AFTER_S


# What the rehearsal encodes after its made-up prefix: the kinds of text a request's suffix
# holds (tiktoken's first call on such text costs ~25 us more than its later ones, measured).
_SAMPLE = (
    " User: 1,234.56 dollars, up 12% (see §3)? Les modèles découpent le texte."
    " 注意：请用中文回答。 def f(x):\n    return {'a': [x, -1]}\n\tOK!"
)


def _rehearse(view: HostMapView, enc: tiktoken.Encoding, backend: Encoder | str) -> None:
    """Take a hit's steps once on a made-up entry at start-up (~3 ms): the shared ints made,
    the code run and the memory it needs allocated, so that a worker's first hit costs about
    what its later ones do (without this, about twice as much)."""
    from flashtoken.mapreader import hit_of

    warm_ids(enc.n_vocab)
    # First: what tiktoken allocates for such text then lies below the memory the hit's steps
    # free, which stays mapped for the first hit (in the other order, ~20 pages faulted anew).
    get_encoder(enc, backend).encode_ordinary(_SAMPLE)
    size = 32 * 1024
    prefix = b"w" * size
    ids = array("I", range(1000, 1000 + size // 4)).tobytes()
    value = pack_entry(b"", bytes(32), (), prefix, size, ids)
    found = hit_of(value, b"", b"", bytes(32), (), prefix)
    assert isinstance(found, Hit)
    cache = view.cache_of(found, enc, prefix.decode(), frozenset(), backend)
    cache.encode_ordinary(" warm")
    assert view.reader is not None
    view.reader.get(b"", bytes(32), (), b"rehearsal: never stored")


def _cache(
    found: Hit, enc: tiktoken.Encoding, prefix: str, allowed: frozenset, backend: Encoder | str
) -> FixedPrefixTokenCache:
    return FixedPrefixTokenCache.from_split(
        enc, prefix, PrefixSplit(found.tokens, found.cut), allowed_special=allowed, backend=backend
    )


class HostMapView:
    """The host map as one worker sees it; ``None``-like (no hits) for a non-ipc daemon."""

    def __init__(
        self, address: str, enc: tiktoken.Encoding, backend: Encoder | str = "tiktoken"
    ) -> None:
        from flashtoken.mapreader import MapReader  # lmdb: imported by the client only
        from flashtoken.sharedmap import map_path

        path = ipc_path(address)
        self.reader = None if path is None else MapReader(map_path(os.path.dirname(path)))
        self._touched: list[bytes] = []
        self._sightings = False
        if self.reader is not None:
            # Here, not in the first request (a fork reopens the map lazily).
            self.reader.open()
            _rehearse(self, enc, backend)
            self._touched = []
        self._last_report = _first_report()
        self._since = 0.0  # when the oldest key not reported yet was taken

    def lookup(
        self,
        enc: tiktoken.Encoding,
        namespace: bytes,
        eid: bytes,
        allowed: frozenset,
        prefix: str,
        data: bytes,
        backend: Encoder | str = "tiktoken",
    ) -> FixedPrefixTokenCache | Absent | None:
        """The L1 entry for ``prefix`` from the map; :class:`Absent` when the map holds no
        tokens for it (and whether the host has seen it); None with no usable map."""
        if self.reader is None:
            return None
        found = self.reader.lookup(namespace, eid, tuple(sorted(allowed)), data)
        if not isinstance(found, Hit):
            return found
        if found.cut > len(prefix):
            return None
        return self.cache_of(found, enc, prefix, allowed, backend)

    def cache_of(
        self,
        found: Hit,
        enc: tiktoken.Encoding,
        prefix: str,
        allowed: frozenset,
        backend: Encoder | str,
    ) -> FixedPrefixTokenCache:
        """The L1 entry of a confirmed hit (counted as used, for the daemon's LRU order)."""
        self._note(found.key)
        return _cache(found, enc, prefix, allowed, backend)

    def hot(
        self,
        enc: tiktoken.Encoding,
        namespace: bytes,
        eid: bytes,
        budget: int,
        backend: Encoder | str = "tiktoken",
    ) -> list[tuple[str, frozenset[str], FixedPrefixTokenCache]]:
        """The host's hot prefixes of this namespace and encoding as ``(prefix, allowed, L1
        entry)``, newest first, within ``budget`` bytes of the map: each confirmed as a hit
        is (its fields, checksum and cut), not counted as used (no request asked for it)."""
        from flashtoken.mapreader import hit_of

        taken: list[tuple[str, frozenset[str], FixedPrefixTokenCache]] = []
        if self.reader is None or budget <= 0:
            return taken
        for key, value in self.reader.hot(budget):
            identity = entry_identity(value)
            if identity is None or identity[:2] != (namespace, eid):
                continue
            allowed, data = identity[2], identity[3]
            if not enc.special_tokens_set.issuperset(allowed):
                continue
            try:
                # Strict: the text whose UTF-8 is the stored bytes, as a request's would be.
                prefix = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            found = hit_of(value, key, namespace, eid, allowed, data)
            if isinstance(found, Hit) and found.cut <= len(prefix):
                policy = frozenset(allowed)
                taken.append((prefix, policy, _cache(found, enc, prefix, policy, backend)))
        return taken

    def sighted(self, key: bytes) -> None:
        """This worker encodes ``key``'s prefix whole: tell the daemon soon (within 50 ms, not
        the second a hit's report may wait), so that the next worker asking finds the marker."""
        self._note(key)
        self._sightings = True

    def _note(self, key: bytes) -> None:
        if not self._touched:
            self._since = time.monotonic()
        self._touched.append(key)

    def touches_due(self) -> bytes | None:
        """The keys to report now (a full batch, or the oldest older than 50 ms for a sighting,
        a second for hits), or None."""
        if not self._touched:
            return None
        now = time.monotonic()
        if len(self._touched) < TOUCH_BATCH and not self._due(now):
            return None
        keys, self._touched = self._touched[:TOUCH_BATCH], self._touched[TOUCH_BATCH:]
        self._last_report = now
        self._sightings = False
        return b"".join(keys)

    def _due(self, now: float) -> bool:
        if self._sightings:
            return now - self._last_report >= SIGHTINGS_EVERY_S
        # Hits wait FIRST_REPORT_AFTER_S at least: never sent by the request that took them,
        # which would make a fresh worker's socket on its first request's path (~1 ms; with the
        # daemon frozen, a connect that never completes). A worker's first request comes any
        # time after its start, so the time since the start cannot promise that alone.
        return (
            now - self._last_report >= TOUCH_EVERY_S and now - self._since >= FIRST_REPORT_AFTER_S
        )

    def pending(self) -> bytes | None:
        """Every key not reported yet (at close: a short-lived worker's hits and sightings)."""
        keys, self._touched = self._touched[:TOUCH_BATCH], []
        self._sightings = False
        return b"".join(keys) or None

    def after_fork(self) -> None:
        self._touched = []  # the parent's hits are the parent's to report
        self._sightings = False
        self._last_report = _first_report()
