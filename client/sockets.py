"""Sockets and contexts of the clients, per process: the DEALER's options, one zmq.Context
per process (made lazily, new after a fork), every client's locks and sockets reset in a forked
child, and closing everything at interpreter exit."""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from typing import Any

import zmq

from flashtoken.errors import DaemonUnavailable
from flashtoken.wire import MAX_HEADER_BYTES, MAX_PREFIX_BYTES, check_daemon_socket, ipc_path
from flashtoken.wire.auth import key_file, read_keys, secure_client

__all__ = [
    "CONTEXT",
    "MAX_REPLY_BYTES",
    "SOCKET_ERRORS",
    "abandon",
    "configure_dealer",
    "ms_left",
    "send_within",
    "register",
    "trusted",
]

# What making or using a client socket may raise: ZeroMQ's errors, and ours for a socket that
# is not the daemon's (``trusted``). The client falls back to local encoding on either.
SOCKET_ERRORS = (zmq.ZMQError, DaemonUnavailable)


def trusted(address: str, counters: dict[str, int]) -> None:
    """Check who may be the daemon at ``address`` before a socket connects to it
    (``check_daemon_socket``: owner, mode, directory; for tcp://, that this user holds the
    daemon's key file, flashtoken/wire/auth.py); counts ``untrusted`` and raises
    DaemonUnavailable if the check fails."""
    if address.startswith("tcp://"):
        read_keys(key_file())  # DaemonUnavailable saying why: the client encodes locally
        return
    try:
        check_daemon_socket(address)
    except DaemonUnavailable:
        path = ipc_path(address)
        if path is not None and os.path.lexists(path):  # there, but not the daemon's
            counters["untrusted"] += 1
        raise


def ms_left(deadline: float) -> int:
    """Milliseconds to a ``time.monotonic()`` deadline, for a poll: rounded up (a poll of 0 ms
    would give up on a reply that is microseconds away), 0 once it has passed."""
    left = deadline - time.monotonic()
    return int(left * 1000) + 1 if left > 0 else 0


# Reply size limit: a header plus 4 bytes a token, and a prefix never has more tokens than bytes.
MAX_REPLY_BYTES = MAX_HEADER_BYTES + 4 * MAX_PREFIX_BYTES

# Sockets and contexts inherited from a parent process: never used, closed or collected in the
# child (closing would tear down the parent's connection state shared through the fork).
_abandoned: list[Any] = []


def send_within(sock: zmq.Socket, frames: list[bytes], deadline: float | None) -> bool:
    """Send without blocking past ``deadline`` (None: one try); False if the socket never
    became writable (no completed connection: ZMQ_IMMEDIATE, or a full queue).

    Copied, not ``copy=False``: a request frame (a prefix, or a whole text for AUTO) is sent
    once, and pyzmq's zero-copy path for frames over 64 KiB hands every buffer to a
    garbage-collector thread that must take the GIL: measured at ~300 us a send against ~15 us
    for copying a 140 KB text.
    """
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)
        return True
    except zmq.Again:
        if deadline is None:
            return False
        # A fresh socket still connecting, or no daemon: wait for one within the budget.
        remaining = ms_left(deadline)
        if remaining <= 0 or not sock.poll(remaining, zmq.POLLOUT):
            return False
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False


def abandon(thing: Any) -> None:
    """Keep a socket, context or follower inherited from the parent from ever being used,
    closed or collected here."""
    _abandoned.append(thing)


def configure_dealer(sock: zmq.Socket, address: str) -> None:
    """The client socket's options: bounded everything, and no queueing to a dead daemon; on
    tcp://, CURVE with the key file's keys (DaemonUnavailable, the socket closed, without it)."""
    sock.setsockopt(zmq.LINGER, 0)
    try:
        secure_client(sock, address)
    except DaemonUnavailable:
        sock.close(linger=0)
        raise
    sock.setsockopt(zmq.SNDHWM, 64)
    sock.setsockopt(zmq.RCVHWM, 64)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
    # Queue only on completed connections: a send to a daemon that is not there fails at once
    # (EAGAIN) instead of queueing a request it would answer after its restart.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    sock.connect(address)


class _ContextHolder:
    """One zmq.Context per process, made lazily, terminated at exit after every client closed.

    Not ``zmq.Context.instance()``: that one is shared with the application, which may term it.
    """

    def __init__(self) -> None:
        self.pid = -1
        self.ctx: zmq.Context | None = None
        self.lock = threading.Lock()

    def get(self) -> zmq.Context:
        pid = os.getpid()
        if self.pid != pid:
            with self.lock:
                if self.pid != pid:
                    if self.ctx is not None:
                        abandon(self.ctx)
                    self.ctx = zmq.Context()
                    self.pid = pid
        assert self.ctx is not None
        return self.ctx


CONTEXT = _ContextHolder()
_clients: weakref.WeakSet[Any] = weakref.WeakSet()


def register(client: Any) -> None:
    _clients.add(client)


def _after_fork_in_child() -> None:
    # Before the child runs any code of its own: a lock a parent's thread held at the fork
    # (ours, a client's, its L1's) would otherwise never be released in the child. A pid check
    # inside a call comes too late when the call takes a lock first (the hang of issue 11).
    CONTEXT.lock = threading.Lock()
    for client in list(_clients):
        if client._core.pid != os.getpid():
            client._after_fork()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_all() -> None:
    # Never hang interpreter exit: every socket closes with LINGER=0, then the context ends.
    for client in list(_clients):
        try:
            client._close_socket()
            client._core.chains.stop_following()  # before the context goes: its thread uses it
        except Exception:
            pass
    if CONTEXT.ctx is not None and CONTEXT.pid == os.getpid():
        CONTEXT.ctx.destroy(linger=0)
        CONTEXT.ctx = None
        CONTEXT.pid = -1
