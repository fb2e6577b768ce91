"""The host's shared map: prefix tokens in a memory-mapped LMDB database that every worker reads.

The daemon is the map's only writer: it encodes, stores, evicts and counts. Workers open the same
file read-only and take a hit with no round trip: hash the prefix, look the key up, confirm the
entry, copy the tokens out of the mapping. LMDB (one writer, many readers in many processes, MVCC
so a reader never sees a half-written or freed entry, crash-safe, zero-copy reads) does what a
home-made shared-memory table would have to be debugged into doing.

This module is the daemon's side (the writer). The workers' side is flashtoken/mapreader.py,
the entries' format flashtoken/mapentry.py's; one environment per process, fork safety and the
trust check are flashtoken/mapenv.py's.

``import flashtoken`` does not import this module (nor lmdb).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from itertools import islice

import lmdb

from flashtoken.mapentry import (
    FORMAT,
    HOT_KEY,
    HOT_KEYS,
    SALT_KEY,
    SEEN_MARKER,
    VERSION_KEY,
    confirm,
    entry_cost,
    entry_key,
    entry_tokens,
    is_seen_marker,
    pack_entry,
    pack_hot,
)
from flashtoken.mapenv import environment, envs_lock, forget_environment, trusted

log = logging.getLogger("flashtoken.sharedmap")

_MARKER_COST = entry_cost(b"k" * 16, len(SEEN_MARKER))

MAP_DIRNAME = "map"


def map_path(directory: str) -> str:
    """Where the daemon whose private directory is ``directory`` keeps its map."""
    return os.path.join(directory, MAP_DIRNAME)


class MapWriter:
    """The daemon's side: puts, least-recently-used eviction within ``max_bytes``, touches.

    The LRU order lives in the daemon (readers report their hits in batches, since they bypass
    it). After a restart the map is reopened as it was (a hot cache) and its entries are counted
    again; their order of use is not kept across restarts.
    """

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        # Room for LMDB's own pages (branch pages, pages freed but still read by old snapshots).
        self._map_size = 2 * max_bytes + 64 * 1024 * 1024
        # key -> (cost in bytes, tokens held), oldest first
        self._order: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
        # Sighting markers (keys the host saw once and has not cached), oldest first; at most
        # one per 4 KiB of budget, so they take under 3% of it.
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self.seen_capacity = max(64, min(65536, max_bytes // 4096))
        self._hot: list[bytes] = []  # the hot list as last written
        self.bytes = 0
        self.tokens = 0
        self.evictions = 0
        self.rebuilds = 0
        self.env = self._open()

    def _open(self) -> lmdb.Environment:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        if not trusted(self.path) and os.path.exists(os.path.join(self.path, "data.mdb")):
            self._rebuild("another owner, mode or a symlink")
        try:
            with envs_lock:
                env = environment(self.path, writer_map_size=self._map_size)
            with env.begin() as txn:
                version = txn.get(VERSION_KEY)
            if version not in (None, FORMAT):
                raise lmdb.Error(f"format {version!r}")
            if env.info()["map_size"] != self._map_size:
                env.set_mapsize(self._map_size)
            self._index(env)
        except lmdb.Error as exc:
            forget_environment(self.path)
            self._rebuild(str(exc))
            with envs_lock:
                env = environment(self.path, writer_map_size=self._map_size)
        with env.begin(write=True) as txn:
            txn.put(VERSION_KEY, FORMAT)
            self.salt = bytes(txn.get(SALT_KEY) or b"")
            if len(self.salt) != 16:
                self.salt = os.urandom(16)
                txn.put(SALT_KEY, self.salt)
        return env

    def _index(self, env: lmdb.Environment) -> None:
        """Count the entries a previous daemon left (a hot restart); drop damaged ones."""
        damaged = []
        with env.begin(buffers=True) as txn:
            for stored, value in txn.cursor():
                key = bytes(stored)
                if key in (VERSION_KEY, SALT_KEY, HOT_KEY):
                    continue
                if len(key) != 16 or bytes(value[:4]) != FORMAT:
                    damaged.append(key)
                    continue
                if is_seen_marker(value):
                    self._seen[key] = None
                    self.bytes += _MARKER_COST
                    continue
                self._add(key, entry_cost(key, len(value)), entry_tokens(value))
        if damaged:
            with env.begin(write=True) as txn:
                for key in damaged:
                    txn.delete(key)
        self._evict_to(self.max_bytes)

    def _rebuild(self, why: str) -> None:
        """Start from an empty map: one we cannot trust is removed, never read."""
        log.warning("rebuilding the host map %s: %s", self.path, why)
        self.rebuilds += 1
        self._order.clear()
        self._seen.clear()
        self._hot = []
        self.bytes = self.tokens = 0
        for name in ("data.mdb", "lock.mdb"):
            try:
                os.unlink(os.path.join(self.path, name))
            except FileNotFoundError:
                pass
        os.chmod(self.path, 0o700)

    def put(self, key: bytes, value: bytes) -> bool:
        """Store one entry (replacing any under ``key``), evicting the least recently used first.

        False when it cannot fit (larger than the budget, or the map is full even after
        eviction): the entry is then simply not shared.
        """
        cost = entry_cost(key, len(value))
        if cost > self.max_bytes:
            return False
        self._drop_from_order(key)
        self._evict_to(self.max_bytes - cost)
        for _ in range(2):
            try:
                with self.env.begin(write=True) as txn:
                    txn.put(key, value)
                break
            except lmdb.MapFullError:
                self._evict_to(max(0, self.bytes // 2))  # LMDB's own pages took the room
        else:
            return False
        if self._seen.pop(key, 0) is None:  # the marker it replaced
            self.bytes -= _MARKER_COST
        self._add(key, cost, entry_tokens(value))
        return True

    def touch(self, keys: list[bytes]) -> list[bytes]:
        """Move these keys to most recently used (readers' hits); the keys not held (the
        sightings of prefixes not cached, or hits on entries evicted since)."""
        missing = []
        for key in keys:
            if key in self._order:
                self._order.move_to_end(key)
            else:
                missing.append(key)
        return missing

    def mark_seen(self, keys: list[bytes]) -> int:
        """Store a sighting marker under each key not held yet (flashtoken/admission.py):
        workers that find one ask the daemon to fill, where a key with nothing under it is
        encoded whole by the worker. Returns how many were new."""
        new = [k for k in keys if k not in self._order and k not in self._seen]
        if not new:
            return 0
        for key in new:
            self._seen[key] = None
        self.bytes += _MARKER_COST * len(new)
        gone = []
        while len(self._seen) > self.seen_capacity:
            gone.append(self._seen.popitem(last=False)[0])
        self.bytes -= _MARKER_COST * len(gone)
        try:
            with self.env.begin(write=True) as txn:
                for key in new:
                    if key in self._seen:
                        txn.put(key, SEEN_MARKER)
                for key in gone:
                    txn.delete(key)
        except lmdb.MapFullError:  # the markers are a hint: none is better than an error
            pass
        return len(new)

    def delete(self, key: bytes) -> None:
        if self._drop_from_order(key):
            with self.env.begin(write=True) as txn:
                txn.delete(key)

    def store(
        self,
        namespace: bytes,
        eid: bytes,
        allowed: tuple[str, ...],
        prefix: bytes,
        cut: int,
        tokens: bytes,
    ) -> bool:
        """Store a declared prefix's split (``tokens`` as little-endian uint32 bytes)."""
        key = self.key(namespace, eid, allowed, prefix)
        return self.put(key, pack_entry(namespace, eid, allowed, prefix, cut, tokens))

    def key(self, namespace: bytes, eid: bytes, allowed: tuple[str, ...], prefix: bytes) -> bytes:
        return entry_key(self.salt, namespace, eid, allowed, prefix)

    def get(
        self, namespace: bytes, eid: bytes, allowed: tuple[str, ...], prefix: bytes
    ) -> tuple[int, bytes] | None:
        """The daemon's own read: ``(cut, token bytes)`` for a client with no map (TCP)."""
        with self.env.begin(buffers=True) as txn:
            value = txn.get(self.key(namespace, eid, allowed, prefix))
            found = None if value is None else confirm(value, namespace, eid, allowed, prefix)
            return None if found is None else (found[0], bytes(found[1]))

    def __contains__(self, key: bytes) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    @property
    def seen(self) -> int:
        """How many sighting markers the map holds."""
        return len(self._seen)

    def _add(self, key: bytes, cost: int, tokens: int) -> None:
        self._order[key] = (cost, tokens)
        self.bytes += cost
        self.tokens += tokens

    def _drop_from_order(self, key: bytes) -> bool:
        held = self._order.pop(key, None)
        if held is None:
            return False
        self.bytes -= held[0]
        self.tokens -= held[1]
        return True

    def set_budget(self, max_bytes: int) -> None:
        """A new byte budget (the daemon shares one between this map and its chains)."""
        self.max_bytes = max(0, max_bytes)
        self._evict_to(self.max_bytes)

    def _evict_to(self, limit: int) -> None:
        if self.bytes <= limit:
            return
        victims = []
        while self.bytes > limit and self._order:
            key, (cost, tokens) = self._order.popitem(last=False)
            self.bytes -= cost
            self.tokens -= tokens
            victims.append(key)
        with self.env.begin(write=True) as txn:
            for key in victims:
                txn.delete(key)
        self.evictions += len(victims)

    def publish_hot(self) -> None:
        """Write the hot list (the most recently used keys, newest first) if it changed."""
        hot = list(islice(reversed(self._order), HOT_KEYS))
        if hot == self._hot:
            return
        try:
            with self.env.begin(write=True) as txn:
                txn.put(HOT_KEY, pack_hot(hot))
        except lmdb.MapFullError:  # a hint, like the markers
            return
        self._hot = hot

    def check_readers(self) -> int:
        """Clear reader slots of dead processes (a worker killed mid-read), so that the pages
        their snapshots pinned can be reused. Returns how many were cleared."""
        return self.env.reader_check()

    def close(self) -> None:
        forget_environment(self.path)
