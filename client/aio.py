"""``AsyncClient``: ``Client`` for asyncio (zmq.asyncio), with the same API as coroutines.

The same core (client/core.py, client/chains.py) makes every decision and the same flows
(client/flows.py) order the steps; this module is their asyncio driver, and only the waiting
differs. Encoding — the suffix, or the whole prefix on a local fallback — runs on the event
loop's thread: a suffix costs microseconds, and a local prefix encode happens once per prefix
and process (the same cost a direct tiktoken call would have). Wrap calls in
``loop.run_in_executor`` if even that one encode of a very long prefix must not hold the loop;
``encode_batch`` runs its suffixes' encodes on threads.
"""

from __future__ import annotations

import asyncio
import functools
import os
from array import array
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from flashtoken.prefix import ORDINARY
from flashtoken.specials import SpecialArg, SpecialPolicy
from flashtoken.wire.admin import request_stats

from .base import ClientBase, batch_source, to_numpy
from .flows import Acquire, Drop, Flow, Recv, Release, Run, Send, Step, auto_encode, closing, drive
from .flows import fetch_prefix as fetch_flow
from .sockets import (
    CONTEXT,
    SOCKET_ERRORS,
    abandon,
    configure_dealer,
    ms_left,
    send_within,
    trusted,
)
from .tally import Tallied

__all__ = ["AsyncClient"]

T = TypeVar("T")


class AsyncClient(ClientBase):
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
    the encode methods. ``last_source`` is per task. ``decode`` and ``decode_bytes`` do no IO
    and are plain methods, as tiktoken's.
    """

    _sock: zmq.asyncio.Socket | None

    def _open(self) -> None:
        self._sock = None
        self._ctx: zmq.asyncio.Context | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    async def encode_ordinary(self, suffix: str, *, prefix: str | None = None) -> list[int]:
        """``encoding.encode_ordinary(prefix + suffix)``; with no ``prefix``, of ``suffix``
        alone, reusing the longest cached prefix of it (automatic reuse, as ``Client``)."""
        if prefix is None:
            return await self._auto(suffix, ORDINARY)
        return (await self._prefix(prefix, frozenset())).encode_ordinary(suffix)

    async def encode_ordinary_array(self, suffix: str, *, prefix: str | None = None) -> array[int]:
        """The same tokens as ``array('I')``."""
        if prefix is None:
            return array("I", await self._auto(suffix, ORDINARY))
        return (await self._prefix(prefix, frozenset())).encode_ordinary_array(suffix)

    async def count_ordinary(self, suffix: str, *, prefix: str | None = None) -> int:
        """``len(await encode_ordinary(suffix, prefix=prefix))``, without building the list."""
        if prefix is None:
            return len(await self._auto(suffix, ORDINARY))
        return (await self._prefix(prefix, frozenset())).count_ordinary(suffix)

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
            policy = self._auto_policy(suffix, allowed_special, disallowed_special)
            if policy is None:
                return self._tiktoken(suffix, allowed_special, disallowed_special)
            return await self._auto(suffix, policy)
        return (await self._prefix(prefix, self._allowed(allowed_special))).encode(
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
            return len(
                await self.encode(
                    suffix, allowed_special=allowed_special, disallowed_special=disallowed_special
                )
            )
        return (await self._prefix(prefix, self._allowed(allowed_special))).count(
            suffix, allowed_special=allowed_special, disallowed_special=disallowed_special
        )

    async def encode_to_numpy(
        self,
        suffix: str,
        *,
        prefix: str | None = None,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> Any:
        """``await encode(...)`` as a ``numpy.uint32`` array, as tiktoken's ``encode_to_numpy``."""
        tokens = await self.encode(
            suffix,
            prefix=prefix,
            allowed_special=allowed_special,
            disallowed_special=disallowed_special,
        )
        return to_numpy(tokens)

    async def encode_ordinary_batch(
        self, texts: list[str], *, prefix: str | None = None, num_threads: int = 8
    ) -> list[list[int]]:
        """``[await encode_ordinary(t, prefix=prefix) for t in texts]``: with a ``prefix``, one
        lookup for the batch and the suffixes encoded on ``num_threads`` threads (tiktoken
        releases the GIL), the loop free meanwhile; with none, the texts' flows as tasks."""
        if prefix is None:
            return await self._batch(self.encode_ordinary, texts)
        cache = await self._prefix(prefix, frozenset())
        return await _threads(cache.encode_ordinary, texts, num_threads)

    async def encode_batch(
        self,
        texts: list[str],
        *,
        prefix: str | None = None,
        num_threads: int = 8,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> list[list[int]]:
        """``[await encode(t, prefix=prefix, ...) for t in texts]``, as ``encode_ordinary_batch``
        runs them; raises the first text's error, as tiktoken's ``encode_batch``."""
        special: Any = dict(allowed_special=allowed_special, disallowed_special=disallowed_special)
        if prefix is None:
            return await self._batch(functools.partial(self.encode, **special), texts)
        cache = await self._prefix(prefix, self._allowed(allowed_special))
        return await _threads(functools.partial(cache.encode, **special), texts, num_threads)

    async def daemon_stats(self, timeout_ms: int = 1000) -> dict[str, Any]:
        """The daemon's STATS reply; raises DaemonTimeout / DaemonError like ``Client``'s.

        Runs the blocking request in the default executor, so the loop keeps running.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, lambda: request_stats(self.address, timeout_ms=timeout_ms, context=CONTEXT.get())
        )

    def close(self) -> None:
        """Close the socket, after sending the map hits not yet reported, as ``Client.close``
        (client/flows.py's ``closing``); later calls encode locally.

        Not a coroutine, as ``Client.close``: it runs the flow on the socket's synchronous face.
        With reports to send on a socket still connecting, that waits for the connection up to
        ``CLOSE_HANDOVER_S`` (0.1 s), blocking the loop that long at most."""
        closed, self._closed = self._closed, True
        drive(closing(self._core, closed), self._step_now, lambda: None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # -- running the flows --------------------------------------------------------------------

    async def _prefix(self, prefix: str, allowed: frozenset[str]) -> Tallied:
        key, cache = self._l1(prefix, allowed)
        if cache is not None:
            return cache
        flow = fetch_flow(self._core, prefix, allowed, key, self._closed)
        fetched, source = await self._run(flow)
        return self._fetched(fetched, source, allowed)

    async def _auto(self, text: str, policy: SpecialPolicy) -> list[int]:
        tokens, source = await self._run(auto_encode(self._core, text, policy, self._closed))
        self._source.set(source)
        return tokens

    async def _batch(
        self, encode: Callable[[str], Coroutine[Any, Any, list[int]]], texts: list[str]
    ) -> list[list[int]]:
        async def one(text: str) -> tuple[list[int], str | None]:
            return await encode(text), self.last_source  # the task's own source

        done = await asyncio.gather(*(one(text) for text in texts))
        self._source.set(batch_source([source for _, source in done]))  # type: ignore[misc]
        return [tokens for tokens, _ in done]

    async def _run(self, flow: Flow[T]) -> T:
        if self._core.pid != os.getpid():  # before any lock (the L1's): see client/sockets.py
            self._after_fork()
        run = Run(flow)
        lock = self._loop_lock()
        try:
            step = run.first()
            while step is not None:
                try:
                    result, error = await _STEPS[type(step)](self, step), None
                except SOCKET_ERRORS as exc:
                    result, error = None, exc
                step = run.after(step, result, error)
            return run.value
        finally:
            if run.held:  # left early: an exception, or this task was cancelled
                lock.release()
            flow.close()

    async def _acquire(self, step: Acquire) -> bool:
        lock = self._loop_lock()
        if step.timeout is None:
            if lock.locked():
                return False
            await lock.acquire()  # free: returns at once
            return True
        try:
            await asyncio.wait_for(lock.acquire(), step.timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _release(self, step: Release) -> None:
        self._loop_lock().release()

    async def _recv(self, step: Recv) -> list[bytes] | None:
        sock = self._socket()
        remaining = ms_left(step.deadline)
        if remaining <= 0 or not await sock.poll(remaining):  # flags=POLLIN
            return None
        return await sock.recv_multipart(zmq.NOBLOCK)

    async def _drop(self, step: Drop) -> None:
        self._close_socket(step.linger)

    async def _send(self, step: Send) -> bool:
        sock = self._socket()
        try:
            # zmq.asyncio reports EAGAIN through the returned future: await it.
            await sock.send_multipart(step.frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            if step.deadline is None:
                return False
        # No completed connection yet (ZMQ_IMMEDIATE): wait for one within the budget.
        # pyzmq's stub for the asyncio socket's poll omits its flags argument.
        if not await sock.poll(ms_left(step.deadline), zmq.POLLOUT):  # type: ignore[call-arg]
            return False
        try:
            await sock.send_multipart(step.frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _step_now(self, step: Step) -> Any:
        """The steps of ``closing``, done at once from synchronous code (no loop needed)."""
        if isinstance(step, Acquire):
            # Nothing else runs while this code does: the socket is free unless a task is in
            # the middle of a round trip on it (it holds the lock across its awaits).
            assert step.timeout is None
            return self._lock is None or not self._lock.locked()
        if isinstance(step, Send):
            # The same socket through its synchronous face: zmq.asyncio's send needs a loop.
            sock: zmq.Socket[bytes] = zmq.Socket.shadow(self._socket().underlying)
            return send_within(sock, step.frames, step.deadline)
        if isinstance(step, Drop):
            return self._close_socket(step.linger)
        assert isinstance(step, Release)
        return None  # nothing was taken

    def _after_fork(self) -> None:
        # The parent's socket and context must not be touched here; its asyncio lock belongs
        # to the parent's loop. Also run by client/sockets.py's fork hook.
        if self._sock is not None:
            abandon(self._sock)
        self._sock = self._ctx = None
        self._lock = None
        self._core.after_fork()

    def _loop_lock(self) -> asyncio.Lock:
        # asyncio.Lock belongs to one event loop; a client may outlive one (asyncio.run twice).
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

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

    def _close_socket(self, linger: int = 0) -> None:
        sock, self._sock = self._sock, None
        if sock is not None and self._core.pid == os.getpid():
            sock.close(linger=linger)


_STEPS: dict[type, Callable[[AsyncClient, Any], Coroutine[Any, Any, Any]]] = {
    Acquire: AsyncClient._acquire,
    Release: AsyncClient._release,
    Send: AsyncClient._send,
    Recv: AsyncClient._recv,
    Drop: AsyncClient._drop,
}


async def _threads(fn: Callable[[str], T], texts: list[str], num_threads: int) -> list[T]:
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(num_threads) as pool:
        return list(await asyncio.gather(*(loop.run_in_executor(pool, fn, t) for t in texts)))
