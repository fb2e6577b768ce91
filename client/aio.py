"""``AsyncClient``: ``Client`` for asyncio (zmq.asyncio), with the same API as coroutines.

The same core (client/core.py, client/chains.py) makes every decision; only the waiting
differs. Encoding — the suffix, or the whole prefix on a local fallback — runs on the event
loop's thread: a suffix costs microseconds, and a local prefix encode happens once per prefix
and process (the same cost a direct tiktoken call would have). Wrap calls in
``loop.run_in_executor`` if even that one encode of a very long prefix must not hold the loop.
"""

from __future__ import annotations

import asyncio
import os
import time
from array import array
from typing import Any

import tiktoken
import zmq
import zmq.asyncio

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

__all__ = ["AsyncClient"]


class AsyncClient:
    """``Client`` for asyncio: the same arguments, the same exactness, ``await``-able calls.

    >>> import asyncio
    >>> async def main():
    ...     async with AsyncClient(encoding="cl100k_base") as client:
    ...         return await client.encode_ordinary(" Answer briefly.",
    ...                                             prefix="You are a helpful assistant.")
    >>> asyncio.run(main())
    [2675, 527, 264, 11190, 18328, 13, 22559, 27851, 13]

    Concurrent tasks share one socket, one request at a time: a task that would wait longer
    than ``timeout_ms`` for it encodes locally instead. Never raises the daemon's errors from
    the encode methods.
    """

    def __init__(
        self,
        address: str | None = None,
        encoding: str | tiktoken.Encoding | None = None,
        **options: Any,
    ) -> None:
        # Checked against the table (client/settings.py); unset ones from FLASHTOKEN_*.
        options = client_settings("AsyncClient", dict(options, address=address, encoding=encoding))
        address = options.pop("address")
        self._core = ClientCore(options.pop("encoding"), **options)
        self.address = address or default_address()
        self._core.attach_map(self.address)
        self._sock: zmq.asyncio.Socket | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: Any = None
        self._closed = False
        register(self)

    @property
    def encoding(self) -> tiktoken.Encoding:
        return self._core.enc

    async def encode_ordinary(self, suffix: str, *, prefix: str | None = None) -> list[int]:
        """``encoding.encode_ordinary(prefix + suffix)``; with no ``prefix``, of ``suffix``
        alone, reusing the longest cached prefix of it (automatic reuse, as ``Client``)."""
        if prefix is None:
            return await self._auto(suffix, ORDINARY)
        return (await self._cache(prefix, frozenset())).encode_ordinary(suffix)

    async def encode_ordinary_array(self, suffix: str, *, prefix: str | None = None) -> array:
        """The same tokens as ``array('I')``."""
        if prefix is None:
            return array("I", await self._auto(suffix, ORDINARY))
        return (await self._cache(prefix, frozenset())).encode_ordinary_array(suffix)

    async def count_ordinary(self, suffix: str, *, prefix: str | None = None) -> int:
        """``len(await encode_ordinary(suffix, prefix=prefix))``, without building the list."""
        if prefix is None:
            return len(await self._auto(suffix, ORDINARY))
        return (await self._cache(prefix, frozenset())).count_ordinary(suffix)

    async def encode(
        self,
        suffix: str,
        *,
        prefix: str | None = None,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> list[int]:
        """``encoding.encode(prefix + suffix, ...)``; tiktoken's ValueError for a disallowed
        special token. With no ``prefix``, automatic reuse."""
        if prefix is None:
            return await self._auto_encode(suffix, allowed_special, disallowed_special)
        allowed = ClientCore.allowed_of(self._core.enc, allowed_special)
        return (await self._cache(prefix, allowed)).encode(
            suffix, allowed_special=allowed_special, disallowed_special=disallowed_special
        )

    async def count(
        self,
        suffix: str,
        *,
        prefix: str | None = None,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> int:
        """``len(await encode(suffix, prefix=prefix, ...))``, without building the list."""
        if prefix is None:
            return len(await self._auto_encode(suffix, allowed_special, disallowed_special))
        allowed = ClientCore.allowed_of(self._core.enc, allowed_special)
        return (await self._cache(prefix, allowed)).count(
            suffix, allowed_special=allowed_special, disallowed_special=disallowed_special
        )

    def stats(self) -> dict[str, Any]:
        """The same counters as ``Client.stats()``."""
        out = self._core.stats()
        out["address"] = self.address
        return out

    async def daemon_stats(self, timeout_ms: int = 1000) -> dict[str, Any]:
        """The daemon's STATS reply; raises DaemonTimeout / DaemonError like ``Client``'s.

        Runs the blocking request in the default executor, so the loop keeps running.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, lambda: request_stats(self.address, timeout_ms=timeout_ms, context=CONTEXT.get())
        )

    def close(self) -> None:
        """Close the socket (LINGER=0); later calls encode locally."""
        self._closed = True
        self._close_socket()
        self._core.stop_following()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # -- automatic reuse: the L1's chain, the daemon's, then local -------------------------------

    async def _auto_encode(
        self, text: str, allowed_special: SpecialArg, disallowed_special: SpecialArg
    ) -> list[int]:
        require_str(text, "text")
        enc = self._core.enc
        policy = SpecialPolicy.parse(enc, allowed_special, disallowed_special)
        if policy is None or policy.finds_disallowed(text):  # tiktoken's own outcome
            return enc.encode(
                text, allowed_special=allowed_special, disallowed_special=disallowed_special
            )
        return await self._auto(text, policy)

    async def _auto(self, text: str, policy: SpecialPolicy) -> list[int]:
        require_str(text, "text")
        core = self._core
        self._check_fork()  # before any lock (the L1's): see client/sockets.py
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
        found = await self._ask_auto(text, plan, policy.allowed)
        return core.auto_finish(text, policy, plan, found)

    def _tell(self, frames: list[bytes] | None) -> None:
        """Send a request that wants no reply, if no round trip holds the socket; never waits."""
        if frames is None:
            return
        if self._core.follower is not None:
            self._core.follower.tell(frames)  # sent from its thread, off this request's path
            return
        if self._loop_lock().locked():
            return
        try:
            sock = self._socket()
        except SOCKET_ERRORS:
            return
        # With NOBLOCK, zmq.asyncio's future is done at once: sent, or failed.
        sent: Any = sock.send_multipart(frames, zmq.NOBLOCK)
        if not sent.done():
            sent.add_done_callback(lambda f: f.cancelled() or f.exception())
            return
        error = sent.exception()
        if error is None:
            self._core.counters["auto_told"] += 1
        elif not isinstance(error, zmq.Again):  # Again: no daemon connected, or a full queue
            self._close_socket()

    async def _ask_auto(self, text: str, plan: Any, allowed: frozenset) -> Any:
        core = self._core
        lock = self._loop_lock()
        try:
            await asyncio.wait_for(lock.acquire(), core.timeout)
        except asyncio.TimeoutError:
            core.busy()
            return None
        try:
            pending = core.prepare_auto(text, plan, allowed)
            if pending is None:
                return None
            return await self._round_trip(pending)
        except SOCKET_ERRORS:
            core.unavailable()
            self._close_socket()
            return None
        finally:
            lock.release()

    def _check_fork(self) -> None:
        if self._core.pid != os.getpid():
            self._after_fork()

    def _after_fork(self) -> None:
        # The parent's socket and context must not be touched here; its asyncio lock belongs
        # to the parent's loop. Also run by client/sockets.py's fork hook.
        if self._sock is not None:
            abandon(self._sock)
        self._sock = self._ctx = None
        self._lock = None
        self._core.after_fork()

    # -- L1, then the daemon, then local ------------------------------------------------------

    async def _cache(self, prefix: str, allowed: frozenset) -> FixedPrefixTokenCache:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        core = self._core
        key = ClientCore.l1_key(prefix, allowed)
        cache = core.l1_get(key)
        if cache is None:
            cache = await self._fetch(prefix, allowed, key)
        return cache

    async def _fetch(self, prefix: str, allowed: frozenset, key: Any) -> FixedPrefixTokenCache:
        core = self._core
        self._check_fork()
        cache = core.from_map(prefix, allowed)  # the host's map first: no round trip
        if cache is not None:
            core.l1_put(key, cache, True)
            await self._touch()
            return cache
        if not self._closed:
            cache = await self._ask(prefix, allowed, key)
            if cache is not None and cache is core.l1.get(key, (None,))[0]:
                return cache  # another task fetched it while this one waited for the socket
        from_daemon = cache is not None
        if cache is None:
            cache = core.build_local(prefix, allowed)
        core.l1_put(key, cache, from_daemon)
        return cache

    async def _ask(self, prefix: str, allowed: frozenset, key: Any) -> FixedPrefixTokenCache | None:
        core = self._core
        lock = self._loop_lock()
        try:
            await asyncio.wait_for(lock.acquire(), core.timeout)
        except asyncio.TimeoutError:
            core.busy()
            return None
        try:
            found = core.l1.get(key)
            if found is not None:  # fetched by the task that held the socket
                return found[0]
            pending = core.prepare(prefix, allowed)
            if pending is None:
                return None
            return await self._round_trip(pending)
        except SOCKET_ERRORS:
            core.unavailable()
            self._close_socket()
            return None
        finally:
            lock.release()

    async def _touch(self) -> None:
        """Report map hits to the daemon (fire-and-forget, never waiting for the socket)."""
        frames = self._core.touch_frames()
        lock = self._loop_lock()
        if frames is None or self._closed or lock.locked():
            return
        try:
            await self._socket().send_multipart(frames, zmq.NOBLOCK)
        except SOCKET_ERRORS:
            pass  # not connected, or its queue is full: the daemon's LRU order is approximate

    def _loop_lock(self) -> asyncio.Lock:
        # asyncio.Lock belongs to one event loop; a client may outlive one (asyncio.run twice).
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def _round_trip(self, pending: Pending | AutoPending) -> Any:
        core = self._core
        deadline = time.monotonic() + core.timeout
        sock = self._socket()
        try:
            # zmq.asyncio reports EAGAIN through the returned future: await it.
            await sock.send_multipart(pending.frames, zmq.NOBLOCK)
        except zmq.Again:
            # No completed connection yet (ZMQ_IMMEDIATE): wait for one within the budget.
            if not await sock.poll(_ms_left(deadline), zmq.POLLOUT):
                core.timed_out()
                self._close_socket()
                return None
            try:
                await sock.send_multipart(pending.frames, zmq.NOBLOCK)
            except zmq.Again:
                core.timed_out()
                self._close_socket()
                return None
        while True:
            remaining = _ms_left(deadline)
            if remaining <= 0 or not await sock.poll(remaining, zmq.POLLIN):
                core.timed_out()
                self._close_socket()
                return None
            frames = await sock.recv_multipart(zmq.NOBLOCK)
            outcome, cache = core.accept(pending, frames)
            if outcome == LATE:
                continue
            if outcome != DONE:
                self._close_socket()
            return cache

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            if self._ctx is None:
                # A shadow: the asyncio face of this process's one context, not a second one.
                self._ctx = zmq.asyncio.Context.shadow(CONTEXT.get().underlying)
            trusted(self.address, self._core.counters)
            sock = self._ctx.socket(zmq.DEALER)
            configure_dealer(sock, self.address)
            self._sock = sock
        return self._sock

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None and self._core.pid == os.getpid():
            sock.close(linger=0)


def _ms_left(deadline: float) -> int:
    left = deadline - time.monotonic()
    return int(left * 1000) + 1 if left > 0 else 0
