"""The daemon's own files and sockets: the single-instance lock, private binds, bounded queues.

Kept apart from the loop (daemon/server.py): what the daemon does to the file system and to its
sockets' options before it serves, each a function of its arguments.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import zlib
from typing import Any

import zmq

from flashtoken.errors import DaemonUnavailable
from flashtoken.settings import MAX_IPC_PATH_BYTES
from flashtoken.wire import MAX_HEADER_BYTES, addresses, auth, ipc_path, publish_address

from . import budget

log = logging.getLogger("flashtoken.daemon")

# The ports that lock an ipc path where there is no fcntl (lock_port).
_LOCK_PORT_FIRST = 20000
_LOCK_PORTS = 10000


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class InstanceLock:
    """The single-instance lock of one socket path, held for the daemon's life and released by
    the system when the process ends, however it ends: a pid file or a socket file left by a
    SIGKILL never blocks a restart. ``fd``: the lock file (it holds the owner's pid); ``port``:
    the loopback socket that is the lock where there is no fcntl, else None."""

    def __init__(self, fd: int, port: socket.socket | None) -> None:
        self.fd = fd
        self.port = port

    def close(self) -> None:
        if self.port is not None:
            self.port.close()
        os.close(self.fd)


def lock_port(path: str) -> int:
    """The loopback port that locks ``path`` where there is no fcntl: one of 10,000 below the
    ephemeral ranges (Linux's start at 32768, Windows' at 49152), so that no outgoing
    connection's local port can hold it, derived from the path (every daemon computes the
    same). Two paths may share one: the second daemon is refused, and says so."""
    real = os.path.realpath(path).encode("utf-8", "surrogateescape")
    return _LOCK_PORT_FIRST + zlib.crc32(real) % _LOCK_PORTS


def take_lock(path: str, address: str) -> InstanceLock:
    """One daemon per socket path: a lock on ``{path}.lock``, held for life.

    Two processes binding one ipc path would both succeed, and the second would silently
    take the path from the first. The lock is an exclusive ``flock`` of the file; where fcntl
    does not exist (Windows, or ``FLASHTOKEN_PRETEND_NO_FCNTL``), the port ``lock_port(path)``
    on 127.0.0.1, bound and listening: the system frees both when the process dies, so a
    stale pid file is never a lock. Rejected for the port-less case: a pid file checked for a
    live pid (racy, and fooled by a recycled pid). With the lock held, a socket file left at
    the path is stale (its owner is gone) and is removed. Raises StartupError with a message
    fit for the user.
    """
    if not addresses.ipc_available():
        raise StartupError(
            f"cannot serve {address}: ipc:// is not available here; bind"
            f" {addresses.DEFAULT_TCP_ADDRESS} (this platform's default), authenticated with"
            " the keys of its tcp:// key file"
        )
    if len(path.encode()) > MAX_IPC_PATH_BYTES:
        raise StartupError(
            f"socket path {path!r} is longer than {MAX_IPC_PATH_BYTES} bytes;"
            " choose a shorter --bind ipc:// path"
        )
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise StartupError(f"directory {directory} of {address} does not exist")
    me = addresses.user_id()
    # O_NOFOLLOW: in a shared directory, another user could have planted a symlink here to
    # make the daemon write its pid into a file of its own. And it must be ours.
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path + ".lock", flags, 0o600)
    except OSError as exc:
        raise StartupError(
            f"cannot open the lock file {path}.lock ({exc.strerror}; a symlink is refused);"
            " remove it, or choose another --bind"
        ) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (me is not None and (st.st_uid != me or st.st_mode & 0o077)):
        os.close(fd)
        raise StartupError(
            f"the lock file {path}.lock is not a private file of uid {me} (uid"
            f" {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); remove it, or choose"
            " another --bind"
        )
    port, port_lock = None, None
    if addresses.fcntl_available():
        locked = _flock(fd)
    else:
        port_lock = lock_port(path)
        port = _hold_port(port_lock)
        locked = port is not None
    if not locked:
        os.lseek(fd, 0, os.SEEK_SET)
        owner = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        # Without fcntl the lock is a port, which a program other than a daemon may hold.
        how = "" if port_lock is None else f" (its lock: port {port_lock} on 127.0.0.1)"
        raise StartupError(
            f"another flashtoken-daemon (pid {owner}) is serving {address}{how};"
            " stop it first, or pass another --bind"
        )
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())
    for stale in (path, path + ".full"):  # .full: moved aside by daemon/limits.py
        try:
            st = os.lstat(stale)
        except FileNotFoundError:
            continue
        if me is not None and st.st_uid != me:
            raise StartupError(
                f"{stale} belongs to uid {st.st_uid}, not to this daemon's; remove it, or"
                " choose another --bind"
            )
        log.info("removing stale socket %s", stale)
        os.unlink(stale)
    return InstanceLock(fd, port)


def _flock(fd: int) -> bool:
    """An exclusive flock of ``fd`` without waiting; False if another process holds it."""
    import fcntl  # checked by the caller: absent on Windows

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        return False
    return True


def _hold_port(port: int) -> socket.socket | None:
    """A listening socket on 127.0.0.1:``port``, or None if another holds the port. Without
    SO_REUSEADDR, and on Windows with SO_EXCLUSIVEADDRUSE (else another socket that asks for
    reuse could bind it too): a second bind fails while this one lives. A listener has no
    TIME_WAIT, so a killed daemon's port is free at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    exclusive = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)
    if exclusive is not None:
        sock.setsockopt(socket.SOL_SOCKET, exclusive, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            return None
        raise
    return sock


def bounded(sock: zmq.Socket, hwm: int) -> None:
    """A daemon socket's queues, bounded (daemon/budget.py): in messages per peer, in bytes by
    tracking zero-copy frames, and a peer that stops reading is dropped by ZMTP heartbeats (its
    I/O thread no longer answers once its queue is full), which frees what was queued for it."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, min(hwm, budget.SEND_HWM))
    sock.setsockopt(zmq.RCVHWM, min(hwm, budget.RECEIVE_HWM))
    sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10_000)
    sock.copy_threshold = budget.TRACKED_FRAME_BYTES  # larger frames are zero-copy, tracked
    # Connections the kernel queues before libzmq accepts them: past the door (daemon/limits.py)
    # these still get in, so few.
    sock.setsockopt(zmq.BACKLOG, 16)


def memory() -> dict[str, int]:
    """This process's resident memory now and at its peak (Linux; 0 elsewhere)."""
    out = {"rss_bytes": 0, "rss_max_bytes": 0}
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    out["rss_bytes"] = int(line.split()[1]) * 1024
                elif line.startswith(b"VmHWM:"):
                    out["rss_max_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def bind_private(sock: zmq.Socket, address: str, keys: auth.Keys | None) -> str | None:
    """Bind ``sock``; an ipc socket file is 0600 from the start (umask), not only after the
    chmod; a tcp:// socket is a CURVE server with ``keys``. Returns the ipc socket's path
    (None for another transport). Raises StartupError."""
    try:
        return _bind(sock, address, keys)
    except zmq.ZMQError as exc:
        # On tcp:// the port is the single-instance lock: libzmq binds it exclusively.
        held = exc.errno == errno.EADDRINUSE
        raise StartupError(
            f"cannot bind {address}: {exc}"
            + ("; another flashtoken-daemon may be serving it" if held else "")
        ) from exc


def bind_publisher(
    ctx: zmq.Context, address: str, hwm: int, keys: auth.Keys | None
) -> tuple[zmq.Socket | None, str | None]:
    """The PUB socket that sends every chain block stored to the clients that follow chains
    (docs/PROTOCOL.md, "Publishing"), bound private like the main socket at ``address``, and
    its ipc path; (None, None) where there is no publish address. Raises StartupError."""
    where = publish_address(address)
    if where is None:
        log.info("no publish address for %s: clients will not follow chains", address)
        return None, None
    pub = ctx.socket(zmq.PUB)
    bounded(pub, hwm)
    try:
        return pub, bind_private(pub, where, keys)
    except StartupError:
        pub.close(linger=0)
        raise


def _bind(sock: zmq.Socket, address: str, keys: auth.Keys | None) -> str | None:
    path = ipc_path(address)
    if path is None:
        auth.secure_server(sock, address, keys)
        sock.bind(address)
        return None
    old = os.umask(0o177)
    try:
        sock.bind(address)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return path


def receive(router: zmq.Socket, max_prefix_bytes: int) -> tuple[bytes, list[Any], str | None]:
    """One request, its frames checked as they come: of a message with more frames or more
    bytes than a request can have, only the header is kept and the rest is read and dropped
    uncopied (``recv_multipart`` copied every frame of a 200-frame, 800 MiB message first).
    Returns the identity, the frames and why the message is refused (None: it is not).
    Raises zmq.Again when there is none."""
    identity = router.recv(zmq.NOBLOCK, copy=False)
    more = identity.more
    body: list[Any] = []
    frames, size, limit = 0, 0, max_prefix_bytes + MAX_HEADER_BYTES
    while more:
        frame = router.recv(copy=False)  # the rest of a message is there (atomic delivery)
        more = frame.more
        frames, size = frames + 1, size + len(frame)
        if frames <= 2 and size <= limit:
            body.append(frame.buffer)
    refused = None
    if frames > 2:
        refused = f"a request has 1 or 2 frames, not {frames}"
    elif size > limit:
        refused = f"a request of {size} bytes exceeds the limit of {limit}"
    return identity.bytes, body, refused


def curve_server(ctx: zmq.Context) -> tuple[auth.Keys, auth.ZapHandler]:
    """TCP has no owner: the CURVE keys from the private tcp:// key file, and the ZAP handler
    that admits only its client key, started before any bind. Raises StartupError."""
    try:
        keys = auth.make_keys(auth.key_file())
    except (DaemonUnavailable, OSError) as exc:
        raise StartupError(f"cannot use the tcp:// key file: {exc}") from exc
    log.info("tcp:// with CURVE: only clients holding the keys in %s get in", auth.key_file())
    return keys, auth.ZapHandler(ctx, keys)
