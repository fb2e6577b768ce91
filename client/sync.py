"""``Client``: exact tiktoken tokens through an in-process cache and the shared daemon.

All decisions are in ``client/core.py`` (and its ``chains.py`` half); this module only waits on
the socket (zguide's Lazy Pirate: poll with a timeout, drop the socket after a failure, reopen
it on the next use).
"""

from __future__ import annotations

import os
import threading
import time
from array import array
from typing import Any

import tiktoken
import zmq

from flashtoken.prefix import ORDINARY, FixedPrefixTokenCache
from flashtoken.specials import SpecialArg, SpecialPolicy, encode_with
from flashtoken.text import require_str
from flashtoken.wire import default_address
from flashtoken.wire.admin import request_stats

from .chains import AUTO_L1, AUTO_TELL, AutoPending
from .core import (
    DONE,
    LATE,
    ClientCore,
    Pending,
)
from .settings import client_settings
from .sockets import CONTEXT, SOCKET_ERRORS, abandon, configure_dealer, register, trusted

__all__ = ["Client"]


class Client:
    """Encode ``prefix + suffix`` exactly as tiktoken does, sharing prefix work across processes.

    >>> client = Client(encoding="cl100k_base")           # the daemon's default address
    >>> client.encode_ordinary(" Answer briefly.", prefix="You are a helpful assistant.")
    [2675, 527, 264, 11190, 18328, 13, 22559, 27851, 13]
    >>> client.close()

    With no ``prefix``, the whole text's longest cached prefix is found automatically
    (``flashtoken.AutoPrefixCache`` in this process first; then, if more than
    ``auto_local_bytes`` remain, one round trip to learn the longest chain of blocks the daemon
    holds; then one local encode of the rest). A background thread tells the daemon about the
    blocks this process encoded and takes those the daemon publishes for the conversations this
    process holds (client/follow.py), so that the next request finds the previous turns here:

    >>> with Client(encoding="cl100k_base") as client:
    ...     client.encode_ordinary("You are a helpful assistant. Answer briefly.")
    [2675, 527, 264, 11190, 18328, 13, 22559, 27851, 13]

    With a ``prefix``, each call looks ``prefix`` up in the in-process cache (L1). On a miss it
    asks the daemon (L2, one round trip within ``timeout_ms``); on a daemon miss, or when the
    daemon is down, frozen, slow or answers nonsense, it encodes the prefix locally (one tiktoken
    call) and the daemon fills its store in the background for the other workers. Either way the
    prefix lands in L1 and the next call with it costs about a list copy plus encoding the suffix.

    The encode methods never raise the daemon's errors: every answer is tiktoken's, whatever
    the daemon does. ``encode`` raises tiktoken's ``ValueError`` for a disallowed special token,
    as tiktoken would. A ``Client`` made before ``fork()`` works in the child (gunicorn
    ``--preload``): sockets are made per process. It may be shared by threads (one round trip at
    a time; a thread that would wait longer than ``timeout_ms`` for the socket encodes locally).

    Arguments: ``address`` (default: ``flashtoken.wire.default_address()``), ``encoding`` (a
    name or a ``tiktoken.Encoding``), and keyword-only ``timeout_ms`` (20), ``l1_bytes`` (64 MiB),
    ``namespace`` (a salt for the daemon's keys: clients with different namespaces share
    nothing), ``breaker_failures`` (3), ``breaker_cooldown_ms`` (250), ``breaker_max_cooldown_ms``
    (5000), ``max_prefix_bytes`` (4 MiB), ``fill`` (True: ask the daemon to fill on a miss), and
    for texts with no prefix ``auto_l1_bytes`` (64 MiB), ``auto_block_bytes`` (512),
    ``auto_local_bytes`` (4096) and ``follow`` (True: run the background thread); see
    docs/INTEGRATION.md, "Automatic reuse".
    """

    def __init__(
        self,
        address: str | None = None,
        encoding: str | tiktoken.Encoding | None = None,
        **options: Any,
    ) -> None:
        # Checked against the table (client/settings.py); unset ones from FLASHTOKEN_*.
        options = client_settings("Client", dict(options, address=address, encoding=encoding))
        address = options.pop("address")
        self._core = ClientCore(options.pop("encoding"), **options)
        self.address = address or default_address()
        self._core.attach_map(self.address)
        self._sock: zmq.Socket | None = None
        self._lock = threading.Lock()
        self._closed = False
        register(self)

    @property
    def encoding(self) -> tiktoken.Encoding:
        return self._core.enc

    # -- the encode API -----------------------------------------------------------------------

    def encode_ordinary(self, suffix: str, *, prefix: str | None = None) -> list[int]:
        """``encoding.encode_ordinary(prefix + suffix)``; with no ``prefix``, of ``suffix``
        alone, reusing the longest cached prefix of it (automatic reuse)."""
        if prefix is None:
            return self._auto(suffix, ORDINARY)
        return self._cache(prefix, frozenset()).encode_ordinary(suffix)

    def encode_ordinary_array(self, suffix: str, *, prefix: str | None = None) -> array:
        """The same tokens as ``array('I')`` (``numpy.frombuffer(a, dtype=numpy.uint32)``)."""
        if prefix is None:
            return array("I", self._auto(suffix, ORDINARY))
        return self._cache(prefix, frozenset()).encode_ordinary_array(suffix)

    def count_ordinary(self, suffix: str, *, prefix: str | None = None) -> int:
        """``len(encode_ordinary(suffix, prefix=prefix))``, without building the list."""
        if prefix is None:
            return len(self._auto(suffix, ORDINARY))
        return self._cache(prefix, frozenset()).count_ordinary(suffix)

    def encode(
        self,
        suffix: str,
        *,
        prefix: str | None = None,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> list[int]:
        """``encoding.encode(prefix + suffix, allowed_special=..., disallowed_special=...)``;
        with no ``prefix``, automatic reuse as in ``encode_ordinary``.

        Raises tiktoken's ``ValueError`` if the text holds a disallowed special token, also one
        that only forms across the join.
        """
        if prefix is None:
            return self._auto_encode(suffix, allowed_special, disallowed_special)
        allowed = ClientCore.allowed_of(self._core.enc, allowed_special)
        return self._cache(prefix, allowed).encode(
            suffix, allowed_special=allowed_special, disallowed_special=disallowed_special
        )

    def count(
        self,
        suffix: str,
        *,
        prefix: str | None = None,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> int:
        """``len(encode(suffix, prefix=prefix, ...))``, without building the list."""
        if prefix is None:
            return len(self._auto_encode(suffix, allowed_special, disallowed_special))
        allowed = ClientCore.allowed_of(self._core.enc, allowed_special)
        return self._cache(prefix, allowed).count(
            suffix, allowed_special=allowed_special, disallowed_special=disallowed_special
        )

    def stats(self) -> dict[str, Any]:
        """This process's counters: ``l1_hits``, ``l2_hits`` (daemon hits), ``misses`` (daemon
        misses), ``fallbacks`` (local encodes without a daemon answer), ``timeouts``, ``errors``,
        ``rejected_hits``, ``late_replies``, ``breaker`` (closed / open / half-open), L1 size."""
        out = self._core.stats()
        out["address"] = self.address
        return out

    def daemon_stats(self, timeout_ms: int = 1000) -> dict[str, Any]:
        """The daemon's STATS reply: ``{"stats": {...}, "settings": {...}}``.

        Raises DaemonTimeout if no reply comes within ``timeout_ms``, DaemonError for an error
        reply or a malformed one.
        """
        return request_stats(self.address, timeout_ms=timeout_ms, context=CONTEXT.get())

    def close(self) -> None:
        """Close the socket. The client still works afterwards, locally only.

        What the worker has not reported of its map hits and sightings is sent first (a
        worker recycled after a few requests still counts), with a linger of 100 ms to hand it
        over; otherwise LINGER=0."""
        linger = 0
        frames = None if self._closed else self._core.touch_frames(closing=True)
        if frames is not None and self._lock.acquire(blocking=False):
            try:
                self._socket().send_multipart(frames, zmq.NOBLOCK)
                linger = 100
            except (*SOCKET_ERRORS, OSError):
                pass  # no daemon to tell: the marks are a hint
            finally:
                self._lock.release()
        self._closed = True
        self._close_socket(linger)
        self._core.stop_following()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- automatic reuse: the L1's chain, the daemon's, then local -------------------------------

    def _auto_encode(
        self, text: str, allowed_special: SpecialArg, disallowed_special: SpecialArg
    ) -> list[int]:
        require_str(text, "text")
        enc = self._core.enc
        policy = SpecialPolicy.parse(enc, allowed_special, disallowed_special)
        if policy is None or policy.finds_disallowed(text):  # tiktoken's own outcome
            return enc.encode(
                text, allowed_special=allowed_special, disallowed_special=disallowed_special
            )
        return self._auto(text, policy)

    def _auto(self, text: str, policy: SpecialPolicy) -> list[int]:
        require_str(text, "text")
        core = self._core
        if core.pid != os.getpid():  # before any lock (the L1's): see client/sockets.py
            self._after_fork()
        plan = core.auto_plan(text, policy)
        if plan is None:  # lone surrogates: not UTF-8, the daemon could not take them
            return encode_with(core.enc, text, policy)
        route = core.auto_route(plan)
        if route == AUTO_L1 or self._closed:
            return core.auto_finish(text, policy, plan, None)
        core.follow_chains(CONTEXT.get(), self.address, policy.allowed)
        if route == AUTO_TELL:
            tokens = core.auto_finish(text, policy, plan, None)
            self._tell(core.prepare_tell(plan, policy.allowed))
            return tokens
        found = None
        pending = core.prepare_auto(text, plan, policy.allowed)
        if pending is not None:
            found = self._ask(pending)
        return core.auto_finish(text, policy, plan, found)

    def _tell(self, frames: list[bytes] | None) -> None:
        """Send a request that wants no reply, if the socket is free now; never waits."""
        if frames is None:
            return
        if self._core.follower is not None:
            self._core.follower.tell(frames)  # sent from its thread, off this request's path
            return
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._socket().send_multipart(frames, zmq.NOBLOCK)
            self._core.counters["auto_told"] += 1
        except zmq.Again:
            pass  # no daemon connected (IMMEDIATE), or its queue is full: it misses this text
        except SOCKET_ERRORS:
            self._close_socket()
        finally:
            self._lock.release()

    # -- L1, then the daemon, then local ------------------------------------------------------

    def _cache(self, prefix: str, allowed: frozenset) -> FixedPrefixTokenCache:
        core = self._core
        key = ClientCore.l1_key(prefix, allowed) if isinstance(prefix, str) else None
        if key is None:
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        cache = core.l1_get(key)
        if cache is None:
            cache = self._fetch(prefix, allowed, key)
        return cache

    def _fetch(self, prefix: str, allowed: frozenset, key: Any) -> FixedPrefixTokenCache:
        core = self._core
        if core.pid != os.getpid():
            self._after_fork()
        cache = core.from_map(prefix, allowed)  # the host's map first: no round trip
        if cache is not None:
            core.l1_put(key, cache, True)
            self._touch()
            return cache
        if not self._closed:
            pending = core.prepare(prefix, allowed)
            if pending is not None:
                cache = self._ask(pending)
        from_daemon = cache is not None
        if cache is None:
            cache = core.build_local(prefix, allowed)
        core.l1_put(key, cache, from_daemon)
        return cache

    def _touch(self) -> None:
        """Report map hits to the daemon (fire-and-forget, never waiting for the socket)."""
        frames = self._core.touch_frames()
        if frames is None or self._closed or not self._lock.acquire(blocking=False):
            return
        try:
            self._socket().send_multipart(frames, zmq.NOBLOCK)
        except SOCKET_ERRORS:
            pass  # not connected, or its queue is full: the daemon's LRU order is approximate
        finally:
            self._lock.release()

    def _after_fork(self) -> None:
        # The parent's socket must not be touched here: keep it from being collected (which
        # would close it) and start afresh. The lock may have been held by a parent's thread.
        if self._sock is not None:
            abandon(self._sock)
            self._sock = None
        self._lock = threading.Lock()
        self._core.after_fork()

    def _ask(self, pending: Pending | AutoPending) -> Any:
        core = self._core
        if not self._lock.acquire(timeout=core.timeout):
            core.busy()
            return None
        try:
            return self._round_trip(pending)
        except SOCKET_ERRORS:
            core.unavailable()
            self._close_socket()
            return None
        finally:
            self._lock.release()

    def _round_trip(self, pending: Pending | AutoPending) -> Any:
        core = self._core
        deadline = time.monotonic() + core.timeout
        sock = self._socket()
        if not _send(sock, pending.frames, deadline):
            core.timed_out()
            self._close_socket()
            return None
        while True:
            remaining = _ms_left(deadline)
            if remaining <= 0 or not sock.poll(remaining, zmq.POLLIN):
                # Lazy Pirate: the request may still be queued or answered late; a fresh socket
                # next time leaves all of that behind.
                core.timed_out()
                self._close_socket()
                return None
            outcome, cache = core.accept(pending, sock.recv_multipart(zmq.NOBLOCK))
            if outcome == LATE:
                continue
            if outcome != DONE:
                self._close_socket()
            return cache

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            trusted(self.address, self._core.counters)
            sock = CONTEXT.get().socket(zmq.DEALER)
            configure_dealer(sock, self.address)
            self._sock = sock
        return self._sock

    def _close_socket(self, linger: int = 0) -> None:
        sock, self._sock = self._sock, None
        if sock is not None and self._core.pid == os.getpid():
            sock.close(linger=linger)


def _ms_left(deadline: float) -> int:
    # Round up: a poll of 0 ms would give up on a reply that is microseconds away.
    left = deadline - time.monotonic()
    return int(left * 1000) + 1 if left > 0 else 0


def _send(sock: zmq.Socket, frames: list, deadline: float) -> bool:
    """Send without blocking past ``deadline``; False if the socket never became writable.

    Copied, not ``copy=False``: a request frame (a prefix, or a whole text for AUTO) is sent
    once, and pyzmq's zero-copy path for frames over 64 KiB hands every buffer to a
    garbage-collector thread that must take the GIL: measured at ~300 us a send against ~15 us
    for copying a 140 KB text.
    """
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)
        return True
    except zmq.Again:
        # No completed connection yet (ZMQ_IMMEDIATE): a fresh socket still connecting, or no
        # daemon. Wait for one within the budget.
        remaining = _ms_left(deadline)
        if remaining <= 0 or not sock.poll(remaining, zmq.POLLOUT):
            return False
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False
