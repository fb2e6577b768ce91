"""``Client``: exact tiktoken tokens through an in-process cache and the shared daemon.

The decisions are client/core.py's (and client/chains.py's), the order of the steps
client/flows.py's; this module is the blocking driver of those flows: it waits on the socket
(zguide's Lazy Pirate: poll with a timeout, drop the socket after a failure, reopen it on the
next use) and on a thread lock, one round trip at a time.
"""

from __future__ import annotations

import functools
import os
import threading
from array import array
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import zmq

from flashtoken.prefix import ORDINARY
from flashtoken.specials import SpecialArg, SpecialPolicy
from flashtoken.wire.admin import request_stats

from .base import ClientBase, batch_source, to_numpy
from .flows import Acquire, Drop, Flow, Recv, Release, Send, Step, auto_encode, closing, drive
from .flows import fetch_prefix as fetch_flow
from .sockets import CONTEXT, abandon, configure_dealer, ms_left, send_within, trusted
from .tally import Tallied

__all__ = ["Client"]

T = TypeVar("T")


class Client(ClientBase):
    """Encode ``prefix + suffix`` exactly as tiktoken does, sharing prefix work across processes.

    >>> client = Client(encoding="cl100k_base")           # the daemon's default address
    >>> client.encode_ordinary(" Answer briefly.", prefix="You are a helpful assistant.")
    [2675, 527, 264, 11190, 18328, 13, 22559, 27851, 13]
    >>> client.last_source in ("l1", "map", "daemon", "local", "whole")
    True
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
    ``last_source`` says, per thread, where the last call's ids came from.

    The encode methods never raise the daemon's errors: every answer is tiktoken's, whatever
    the daemon does. ``encode`` raises tiktoken's ``ValueError`` for a disallowed special token,
    as tiktoken would. A ``Client`` made before ``fork()`` works in the child (gunicorn
    ``--preload``): sockets are made per process. It may be shared by threads (one round trip at
    a time; a thread that would wait longer than ``timeout_ms`` for the socket encodes locally).

    Arguments: ``address`` (default: ``flashtoken.wire.default_address()``), ``encoding`` (a
    name or a ``tiktoken.Encoding``), and the keyword-only settings of the table in
    client/settings.py (docs/INTEGRATION.md, "Settings"); a keyword left None is read from its
    ``FLASHTOKEN_*`` environment variable, else takes the table's default.
    """

    _sock: zmq.Socket | None

    def _open(self) -> None:
        self._sock = None  # made on first use, per process (client/sockets.py)
        self._lock = threading.Lock()

    # -- the encode API, as tiktoken's (with a ``prefix``) ------------------------------------

    def encode_ordinary(self, suffix: str, *, prefix: str | None = None) -> list[int]:
        """``encoding.encode_ordinary(prefix + suffix)``; with no ``prefix``, of ``suffix``
        alone, reusing the longest cached prefix of it (automatic reuse)."""
        if prefix is None:
            return self._auto(suffix, ORDINARY)
        return self._prefix(prefix, frozenset()).encode_ordinary(suffix)

    def encode_ordinary_array(self, suffix: str, *, prefix: str | None = None) -> array[int]:
        """The same tokens as ``array('I')`` (``numpy.frombuffer(a, dtype=numpy.uint32)``)."""
        if prefix is None:
            return array("I", self._auto(suffix, ORDINARY))
        return self._prefix(prefix, frozenset()).encode_ordinary_array(suffix)

    def count_ordinary(self, suffix: str, *, prefix: str | None = None) -> int:
        """``len(encode_ordinary(suffix, prefix=prefix))``, without building the list."""
        if prefix is None:
            return len(self._auto(suffix, ORDINARY))
        return self._prefix(prefix, frozenset()).count_ordinary(suffix)

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
            policy = self._auto_policy(suffix, allowed_special, disallowed_special)
            if policy is None:
                return self._tiktoken(suffix, allowed_special, disallowed_special)
            return self._auto(suffix, policy)
        return self._prefix(prefix, self._allowed(allowed_special)).encode(
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
            return len(
                self.encode(
                    suffix, allowed_special=allowed_special, disallowed_special=disallowed_special
                )
            )
        return self._prefix(prefix, self._allowed(allowed_special)).count(
            suffix, allowed_special=allowed_special, disallowed_special=disallowed_special
        )

    def encode_to_numpy(
        self,
        suffix: str,
        *,
        prefix: str | None = None,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> Any:
        """``encode(...)`` as a ``numpy.uint32`` array, as tiktoken's ``encode_to_numpy``."""
        return to_numpy(
            self.encode(
                suffix,
                prefix=prefix,
                allowed_special=allowed_special,
                disallowed_special=disallowed_special,
            )
        )

    def encode_ordinary_batch(
        self, texts: list[str], *, prefix: str | None = None, num_threads: int = 8
    ) -> list[list[int]]:
        """``[encode_ordinary(t, prefix=prefix) for t in texts]`` on ``num_threads`` threads,
        as tiktoken's ``encode_ordinary_batch`` (tiktoken releases the GIL while it encodes)."""
        if prefix is None:
            return self._batch(self.encode_ordinary, texts, num_threads)
        cache = self._prefix(prefix, frozenset())  # one lookup (or round trip) for the batch
        return _threads(cache.encode_ordinary, texts, num_threads)

    def encode_batch(
        self,
        texts: list[str],
        *,
        prefix: str | None = None,
        num_threads: int = 8,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> list[list[int]]:
        """``[encode(t, prefix=prefix, ...) for t in texts]`` on ``num_threads`` threads, as
        tiktoken's ``encode_batch``; raises the first text's error as it does."""
        special: Any = dict(allowed_special=allowed_special, disallowed_special=disallowed_special)
        if prefix is None:
            return self._batch(functools.partial(self.encode, **special), texts, num_threads)
        cache = self._prefix(prefix, self._allowed(allowed_special))
        return _threads(functools.partial(cache.encode, **special), texts, num_threads)

    def daemon_stats(self, timeout_ms: int = 1000) -> dict[str, Any]:
        """The daemon's STATS reply: ``{"stats": {...}, "settings": {...}}``.

        Raises DaemonTimeout if no reply comes within ``timeout_ms``, DaemonError for an error
        reply or a malformed one.
        """
        return request_stats(self.address, timeout_ms=timeout_ms, context=CONTEXT.get())

    def close(self) -> None:
        """Close the socket (after sending the map hits not yet reported: client/flows.py's
        ``closing``). The client still works afterwards, locally only."""
        closed, self._closed = self._closed, True
        self._run(closing(self._core, closed))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- running the flows --------------------------------------------------------------------

    def _prefix(self, prefix: str, allowed: frozenset[str]) -> Tallied:
        key, cache = self._l1(prefix, allowed)
        if cache is not None:
            return cache
        fetched, source = self._run(fetch_flow(self._core, prefix, allowed, key, self._closed))
        return self._fetched(fetched, source, allowed)

    def _auto(self, text: str, policy: SpecialPolicy) -> list[int]:
        tokens, source = self._run(auto_encode(self._core, text, policy, self._closed))
        self._source.set(source)
        return tokens

    def _batch(
        self, encode: Callable[[str], list[int]], texts: list[str], n: int
    ) -> list[list[int]]:
        def one(text: str) -> tuple[list[int], Any]:
            return encode(text), self.last_source  # the pool thread's own source

        done = _threads(one, texts, n)
        self._source.set(batch_source([source for _, source in done]))
        return [tokens for tokens, _ in done]

    def _run(self, flow: Flow[T]) -> T:
        if self._core.pid != os.getpid():  # before any lock (the L1's): see client/sockets.py
            self._after_fork()
        return drive(flow, self._step, self._lock.release)

    def _step(self, step: Step) -> Any:
        return _STEPS[type(step)](self, step)

    def _acquire(self, step: Acquire) -> bool:
        if step.timeout is None:
            return self._lock.acquire(blocking=False)
        return self._lock.acquire(timeout=step.timeout)

    def _release(self, step: Release) -> None:
        self._lock.release()

    def _send(self, step: Send) -> bool:
        return send_within(self._socket(), step.frames, step.deadline)

    def _recv(self, step: Recv) -> list[bytes] | None:
        sock = self._socket()
        remaining = ms_left(step.deadline)
        if remaining <= 0 or not sock.poll(remaining, zmq.POLLIN):
            return None
        return sock.recv_multipart(zmq.NOBLOCK)

    def _drop(self, step: Drop) -> None:
        self._close_socket(step.linger)

    def _after_fork(self) -> None:
        # The parent's socket must not be touched here: keep it from being collected (which
        # would close it) and start afresh. The lock may have been held by a parent's thread.
        if self._sock is not None:
            abandon(self._sock)
            self._sock = None
        self._lock = threading.Lock()
        self._core.after_fork()

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


_STEPS: dict[type, Callable[[Client, Any], Any]] = {
    Acquire: Client._acquire,
    Release: Client._release,
    Send: Client._send,
    Recv: Client._recv,
    Drop: Client._drop,
}


def _threads(fn: Callable[[str], T], texts: Iterable[str], num_threads: int) -> list[T]:
    with ThreadPoolExecutor(num_threads) as pool:
        return list(pool.map(fn, texts))
