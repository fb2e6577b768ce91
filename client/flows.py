"""Each request flow of the clients, written once, without IO (the h11 / redis-py shape).

A flow is a generator: it makes every decision (through ``ClientCore``) and yields the IO it
needs as a step, which a driver performs and sends the outcome of back in:

=================  ===========================================  ================================
step               the driver                                   sends back
=================  ===========================================  ================================
``Acquire(t)``     takes the client's socket lock within ``t``  True if taken
                   seconds (``t=None``: only if free now)
``Release()``      releases it                                  None
``Send(f, d)``     sends frames ``f`` without blocking; with a  True if sent
                   deadline ``d``, waits until ``d`` for a
                   connection (``d=None``: one try)
``Recv(d)``        waits until the deadline ``d`` for a reply   its frames, or None (timed out)
``Drop(linger)``   closes the socket (Lazy Pirate: the next     None
                   use opens a fresh one)
=================  ===========================================  ================================

A socket error (``SOCKET_ERRORS``) raised by a step is thrown into the flow at its ``yield``.
``client/sync.py`` drives the flows with blocking calls, ``client/aio.py`` with awaits; neither
makes a decision, so the two clients cannot drift apart (they did while each wrote its own
copy: one re-checked the L1 under its lock, one did not).

Each flow returns its result and where the ids came from (``last_source``): ``"l1"`` (the
in-process cache), ``"map"`` (the host's map, no round trip), ``"daemon"``, ``"local"`` (one local
encode of the prefix, or of the rest of a text) or ``"whole"`` (a first sight: the whole text
encoded, as tiktoken does, nothing cached).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from flashtoken.admission import WholeText
from flashtoken.specials import SpecialPolicy, encode_with
from flashtoken.text import require_str

from .chains import AUTO_L1, AUTO_TELL
from .core import DONE, LATE, ClientCore
from .l1 import L1Key, Prefix
from .requests import Pending
from .sockets import SOCKET_ERRORS
from .tally import count_tokens

# How long a closing client waits for its socket to connect to hand over its last report.
CLOSE_HANDOVER_S = 0.1

__all__ = [
    "Acquire",
    "Drop",
    "Recv",
    "Release",
    "Send",
    "Source",
    "auto_encode",
    "closing",
    "drive",
    "fetch_prefix",
]

Source = Literal["l1", "map", "daemon", "local", "whole"]


@dataclass(frozen=True)
class Acquire:
    timeout: float | None


@dataclass(frozen=True)
class Release:
    pass


@dataclass(frozen=True)
class Send:
    frames: list[bytes]
    deadline: float | None


@dataclass(frozen=True)
class Recv:
    deadline: float


@dataclass(frozen=True)
class Drop:
    linger: int = 0


Step = Acquire | Release | Send | Recv | Drop
T = TypeVar("T")
Flow = Generator[Step, Any, T]


# -- the flows -------------------------------------------------------------------------------


def fetch_prefix(
    core: ClientCore, prefix: str, allowed: frozenset[str], key: L1Key, closed: bool
) -> Flow[tuple[Prefix, Source]]:
    """A declared prefix the L1 did not hold: the host's map, else the daemon (one round trip
    within ``timeout_ms``), else one local encode; the result is put in the L1."""
    cache = core.from_map(prefix, allowed)  # the host's map first: no round trip
    if cache is not None:
        core.l1.put(key, cache, True)
        yield from _touch(core, closed)
        return cache, "whole" if isinstance(cache, WholeText) else "map"
    found = None
    if not closed:
        if not (yield Acquire(core.timeout)):
            core.busy()
        else:
            # Again under the lock: the thread or task that held it may have fetched this prefix
            # (two missing one prefix would otherwise both round-trip).
            held = core.l1.get(key)
            if held is not None:
                yield Release()
                return held, "l1"
            # Taken under the lock, not before: ``breaker.allow`` lets one probe out of a half-open
            # breaker, and a probe prepared by a caller that then timed out waiting for the lock
            # would never report back, leaving the breaker half-open for good.
            pending = core.prepare(prefix, allowed)
            if pending is not None:
                found = yield from _exchange(core, pending)
            yield Release()
    if found is not None:
        core.l1.put(key, found, True)
        return found, "daemon"
    cache = core.build_local(prefix, allowed)
    core.l1.put(key, cache)
    return cache, "whole" if isinstance(cache, WholeText) else "local"


def auto_encode(
    core: ClientCore, text: str, policy: SpecialPolicy, closed: bool
) -> Flow[tuple[list[int], Source]]:
    """A text with no declared prefix: the L1's chain, then the daemon's, then one local encode
    of the rest (client/chains.py decides which)."""
    require_str(text, "text")
    chains = core.chains
    plan = chains.plan(text, policy)
    if plan is None:  # lone surrogates: not UTF-8, the daemon could not take them
        tokens = encode_with(core.enc, text, policy)
        count_tokens(core.counters, len(tokens), 0)
        return tokens, "local"
    cached: Source = "l1" if plan.path else "local"
    route = chains.route(plan)
    if route == AUTO_L1 or closed:
        return _finish(core, text, policy, plan, None), cached
    chains.follow_chains(policy.allowed)
    if route == AUTO_TELL:
        tokens = _finish(core, text, policy, plan, None)
        yield from _tell(core, chains.prepare_tell(plan, policy.allowed))
        return tokens, cached
    found = None
    if not (yield Acquire(core.timeout)):
        core.busy()
    else:
        pending = chains.prepare_auto(plan, policy.allowed)  # under the lock: see fetch_prefix
        if pending is not None:
            found = yield from _exchange(core, pending)
        yield Release()
    return _finish(core, text, policy, plan, found), cached if found is None else "daemon"


def _finish(core: ClientCore, text: str, policy: SpecialPolicy, plan: Any, found: Any) -> list[int]:
    """The chains' tokens of ``text``, counted: those of the L1's path and of the daemon's
    answer (``found``) as cached, the rest (encoded here) as not (client/tally.py)."""
    # The blocks' lengths, not len(head): the head is joined inside finish. One step a block
    # (~50 ns), next to a list copy of all their tokens.
    cached = sum(len(node.tokens) for node in plan.path)
    if found is not None:
        cached += len(found[0])  # before finish, which extends that list with the rest
    tokens = core.chains.finish(text, policy, plan, found)
    count_tokens(core.counters, len(tokens), cached)
    return tokens


def closing(core: ClientCore, closed: bool) -> Flow[None]:
    """Closing a client: what it has not reported of its map hits and sightings is sent first
    (a worker recycled after a few requests still counts), with a linger of 100 ms to hand it
    over; otherwise the socket closes with LINGER=0."""
    frames = None if closed else core.touch_frames(closing=True)
    linger = 0
    if frames is not None and (yield Acquire(None)):
        try:
            # A socket made just now is still connecting (ZMQ_IMMEDIATE: a send fails until
            # it is): wait for it briefly rather than drop the report.
            if (yield Send(frames, time.monotonic() + CLOSE_HANDOVER_S)):
                linger = 100
        except SOCKET_ERRORS:
            pass  # no daemon to tell: the marks are a hint
        yield Release()
    yield Drop(linger)
    core.chains.stop_following()


def _exchange(core: ClientCore, pending: Pending) -> Flow[Any]:
    """One round trip within ``timeout_ms`` (zguide's Lazy Pirate): the checked result, or None
    (a miss, a timeout, an error: the caller encodes locally)."""
    deadline = time.monotonic() + core.timeout
    try:
        if not (yield Send(pending.frames, deadline)):
            core.timed_out()
            yield Drop()
            return None
        while True:
            frames = yield Recv(deadline)
            if frames is None:
                # The request may still be queued or answered late; a fresh socket next time
                # leaves all of that behind.
                core.timed_out()
                yield Drop()
                return None
            outcome, result = core.accept(pending, frames)
            if outcome == LATE:
                continue
            if outcome != DONE:
                yield Drop()
            return result
    except SOCKET_ERRORS:
        core.unavailable()
        yield Drop()
        return None


def _tell(core: ClientCore, frames: list[bytes] | None) -> Flow[None]:
    """Send a request that wants no reply, if the socket is free now; never waits."""
    if frames is None:
        return
    follower = core.chains.follower
    if follower is not None:
        follower.tell(frames)  # sent from its thread, off this request's path
        return
    if not (yield Acquire(None)):
        return
    try:
        if (yield Send(frames, None)):
            core.counters["auto_told"] += 1
        # else no daemon connected (IMMEDIATE), or its queue is full: it misses this text
    except SOCKET_ERRORS:
        yield Drop()
    yield Release()


def _touch(core: ClientCore, closed: bool) -> Flow[None]:
    """Report map hits to the daemon (fire-and-forget, never waiting for the socket)."""
    request = core.touch_request()
    if request is None:
        return
    if closed or not (yield Acquire(None)):
        core.touch_unsent(request.keys)  # the next report, or the close, takes them
        return
    try:
        # One try: a socket made just now is still connecting (ZMQ_IMMEDIATE), or its queue is
        # full; the next report takes the keys (dropped, a worker's first hits went uncounted).
        if not (yield Send(request.frames(), None)):
            core.touch_unsent(request.keys)
    except SOCKET_ERRORS:
        core.touch_unsent(request.keys)
    yield Release()


# -- driving ----------------------------------------------------------------------------------


class Run:
    """One flow's progress, for a driver's loop: the next step, whether the lock is held (to
    release it if the driver leaves early: an exception, a cancelled task), and the result."""

    def __init__(self, flow: Flow[Any]) -> None:
        self.flow = flow
        self.held = False
        self.value: Any = None  # the flow's return value, once it has returned

    def first(self) -> Step | None:
        return self._advance(lambda: self.flow.send(None))

    def after(self, step: Step, result: Any, error: BaseException | None) -> Step | None:
        """The step after ``step`` gave ``result`` (or raised ``error``)."""
        if isinstance(step, Acquire):
            self.held = bool(result)
        elif isinstance(step, Release):
            self.held = False
        if error is not None:
            return self._advance(lambda: self.flow.throw(error))
        return self._advance(lambda: self.flow.send(result))

    def _advance(self, resume: Callable[[], Step]) -> Step | None:
        try:
            return resume()
        except StopIteration as stop:
            self.value = stop.value
            return None


def drive(flow: Flow[T], do: Callable[[Step], Any], release: Callable[[], None]) -> T:
    """Run ``flow`` with blocking steps: ``do(step)`` performs one; ``release`` frees the lock
    if the flow is left holding it."""
    run = Run(flow)
    try:
        step = run.first()
        while step is not None:
            try:
                result, error = do(step), None
            except SOCKET_ERRORS as exc:
                result, error = None, exc
            step = run.after(step, result, error)
        return run.value
    finally:
        if run.held:
            release()
        flow.close()
