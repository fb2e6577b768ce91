"""One LMDB environment per host map per process, safe across fork(), and the map's trust check.

Used by the map's reader and writer (flashtoken/sharedmap.py). ``import flashtoken`` does not
import this module (nor lmdb).
"""

from __future__ import annotations

import os
import stat
import threading

import lmdb

__all__ = [
    "environment",
    "envs_lock",
    "forget",
    "forget_environment",
    "open_environment",
    "trusted",
]

# LMDB forbids opening one database twice in a process (closing one handle drops the other's
# locks; py-lmdb refuses the second open) and using a handle after fork(). A child cannot close
# the handle it inherited either: that would clear the reader slots of its parent. So a process
# holds one Environment per path, and read-only ones are closed just *before* a fork, by the
# parent, and opened again on the next use on either side (about 100 us, once). Reads hold the
# same lock as that close, so a fork never closes a handle under a read.

_envs: dict[tuple[int, str], lmdb.Environment] = {}
_writers: set[str] = set()
envs_lock = threading.Lock()


def _close_readers_before_fork() -> None:
    envs_lock.acquire()
    for (pid, path), env in list(_envs.items()):
        if pid == os.getpid() and path not in _writers:
            del _envs[(pid, path)]
            env.close()


def _after_fork() -> None:
    envs_lock.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_close_readers_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork
    )


def environment(path: str, *, writer_map_size: int | None = None) -> lmdb.Environment:
    """This process's environment for the map at ``path``: read-write with ``writer_map_size``
    (the daemon), else read-only (raises ``lmdb.Error`` if there is no map there). The caller
    holds ``envs_lock``."""
    key = (os.getpid(), path)
    env = _envs.get(key)
    if env is None:
        if writer_map_size is None:
            # map_size=0: the writer's map size, read from the file. The library's default
            # (10 MiB, or the data's size if larger) would stop every read once the daemon's
            # data outgrew it (MDB_MAP_RESIZED; the reader then adopts the new size).
            env = lmdb.open(
                path,
                map_size=0,
                readonly=True,
                create=False,
                lock=True,
                max_readers=1024,
                max_dbs=0,
            )
        else:
            env = lmdb.open(
                path,
                map_size=writer_map_size,
                subdir=True,
                create=True,
                mode=0o600,
                max_readers=1024,
                # A cache: no fsync per commit. A killed daemon loses nothing committed (the
                # pages are in the OS's cache); a crashed host may lose the map, which the
                # checksums then catch and the daemon rebuilds.
                sync=False,
                metasync=False,
                readahead=False,
            )
            _writers.add(path)
        _envs[key] = env
    return env


def forget_environment(path: str) -> None:
    """Close this process's environment for ``path`` (the daemon, before it rebuilds the map)."""
    with envs_lock:
        forget(path)


def forget(path: str) -> None:
    env = _envs.pop((os.getpid(), path), None)
    _writers.discard(path)
    if env is not None:
        env.close()


def trusted(path: str) -> bool:
    """Whether the map at ``path`` is ours to trust: a directory and files owned by this user,
    open to nobody else, no symlinks (the socket directory's own rule)."""
    from flashtoken.wire.addresses import user_id  # msgpack, which the map's users have

    me = user_id(effective=False)  # None (Windows): no owner or mode bits, the ACL decides
    try:
        for name in ("", "data.mdb", "lock.mdb"):
            info = os.lstat(os.path.join(path, name) if name else path)
            if stat.S_ISLNK(info.st_mode):
                return False
            if me is not None and (info.st_uid != me or info.st_mode & 0o077):
                return False
    except OSError:
        return False
    return True


def open_environment(path: str) -> lmdb.Environment | None:
    """This process's environment for ``path`` if it has one open (the caller holds the lock)."""
    return _envs.get((os.getpid(), path))
