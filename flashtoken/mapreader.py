"""A worker's read-only view of the host's shared map (flashtoken/sharedmap.py: the writer).

A hit needs no round trip: hash the prefix, look the key up, confirm the entry, copy the tokens
out of the mapping; a worker starting reads the daemon's hot list the same way. ``import
flashtoken`` does not import this module (nor lmdb).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import lmdb

from flashtoken.ids import token_list_from_bytes
from flashtoken.mapentry import HOT_KEY, SALT_KEY, Hit, confirm, entry_key, hot_keys
from flashtoken.mapenv import environment, envs_lock, forget, open_environment, trusted

__all__ = ["Absent", "MapReader", "hit_of"]


@dataclass(frozen=True)
class Absent:
    """No tokens in the map for a prefix: its ``key``, and whether the host has ``seen`` it."""

    key: bytes
    seen: bool


class MapReader:
    """A worker's read-only view of the host's map (opened lazily, again after fork).

    The map's ownership and mode are checked when it is opened, not on every read: a check
    then could not vouch for the file already mapped anyway. A map the daemon rebuilt (a new
    file under the same name) is noticed within ``RECHECK_S`` and opened anew; until then the
    old file is read, which stays intact (LMDB never rewrites an unlinked file) and holds only
    what the daemon wrote.
    """

    RECHECK_S = 1.0

    def __init__(self, path: str) -> None:
        self.path = path
        self._failed_pid = 0  # the pid that found no usable map (retried on reopen())
        self._opened: tuple[lmdb.Environment, bytes, int] | None = None  # env, salt, inode
        self._checked = 0.0

    def get(
        self, namespace: bytes, eid: bytes, allowed: tuple[str, ...], prefix: bytes
    ) -> Hit | None:
        """The confirmed hit for this prefix, or None (not there, not ours, not usable)."""
        found = self.lookup(namespace, eid, allowed, prefix)
        return found if isinstance(found, Hit) else None

    def lookup(
        self, namespace: bytes, eid: bytes, allowed: tuple[str, ...], prefix: bytes
    ) -> Hit | Absent | None:
        """The confirmed hit for this prefix; else :class:`Absent` (with whether the host has
        seen it), or None when there is no usable map."""
        with envs_lock:
            opened = self._open_env()
            if opened is None:
                return None
            env, salt, _ = opened
            key = entry_key(salt, namespace, eid, allowed, prefix)
            for attempt in range(2):
                try:
                    with env.begin(buffers=True) as txn:
                        value = txn.get(key)
                        if value is None:
                            return Absent(key, False)
                        return hit_of(value, key, namespace, eid, allowed, prefix)
                except lmdb.MapResizedError:
                    # A daemon restarted with a larger --max-bytes grew the map: adopt its size
                    # (no transaction of this process is open: they all run under envs_lock).
                    if attempt or not _adopt_map_size(env):
                        break
                except lmdb.Error:
                    break
            self._fail()
            return None

    def hot(self, budget: int) -> list[tuple[bytes, bytes]]:
        """``(key, value)`` copies of the entries in the daemon's hot list, newest first, while
        their values add up to at most ``budget`` bytes; [] with no usable map. Unconfirmed:
        what a starting worker checks, like any hit, before taking them (client/hostmap.py)."""
        with envs_lock:
            opened = self._open_env()
            found: list[tuple[bytes, bytes]] = []
            if opened is None:
                return found
            try:
                with opened[0].begin() as txn:
                    for key in hot_keys(txn.get(HOT_KEY, b"")):
                        value = txn.get(key)
                        if value is None:
                            continue  # evicted since the list was written
                        budget -= len(value)
                        if budget < 0:
                            break
                        found.append((key, value))
            except lmdb.Error:  # a start without the hot prefixes: each is a hit when asked
                return []
            return found

    @property
    def usable(self) -> bool:
        """Whether the last lookup found a map to read (it answers for what the host saw)."""
        return self._opened is not None and self._failed_pid != os.getpid()

    def open(self) -> bool:
        """Open the map now rather than on the first lookup (~1 ms, once per process)."""
        with envs_lock:
            return self._open_env() is not None

    def reopen(self) -> None:
        """Try again to open the map (after the daemon says it exists)."""
        self._failed_pid = 0

    def _open_env(self) -> tuple[lmdb.Environment, bytes, int] | None:
        pid = os.getpid()
        if self._failed_pid == pid:
            return None
        opened = self._opened
        if opened is not None and open_environment(self.path) is opened[0]:
            now = time.monotonic()
            if now - self._checked < self.RECHECK_S:
                return opened
            self._checked = now
            if _inode(self.path) == opened[2]:
                return opened
            forget(self.path)  # rebuilt under us: open the new file
        self._opened = None
        if not trusted(self.path):
            self._failed_pid = pid
            return None
        try:
            env = environment(self.path)
            with env.begin(buffers=True) as txn:
                stored = txn.get(SALT_KEY)
                salt = None if stored is None else bytes(stored)
        except lmdb.Error:
            self._failed_pid = pid
            return None
        if salt is None:  # the daemon has not finished creating it: look again next time
            return None
        self._opened = (env, salt, _inode(self.path))
        self._checked = time.monotonic()
        return self._opened

    def _fail(self) -> None:
        self._failed_pid = os.getpid()
        self._opened = None


def hit_of(
    value: object, key: bytes, namespace: bytes, eid: bytes, allowed: tuple[str, ...], prefix: bytes
) -> Hit | Absent:
    """The hit that ``value`` (found under ``key``) is for this asker, or :class:`Absent`: a
    sighting, a collision (another prefix's entry) or a damaged entry, for which the daemon is
    asked (it encodes from the bytes it receives). Its own function so that a worker's start-up
    can take these steps on a made-up entry (client/hostmap.py)."""
    found = confirm(value, namespace, eid, allowed, prefix)
    if found is None:
        return Absent(key, True)
    # Copied out of the mapping (into the list) before the transaction ends.
    return Hit(token_list_from_bytes(found[1]), found[0], key)


def _adopt_map_size(env: lmdb.Environment) -> bool:
    try:
        env.set_mapsize(0)
    except lmdb.Error:
        return False
    return True


def _inode(path: str) -> int:
    try:
        return os.stat(os.path.join(path, "data.mdb")).st_ino
    except OSError:
        return -1
