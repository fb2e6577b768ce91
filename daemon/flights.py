"""Single flight: one fill per key at a time, the GETs that wait for it, the fills that failed.

Every fill the daemon runs, of a declared prefix (daemon/prefixes.py) or of a chain's blocks
(daemon/chains.py), is a *flight* under a key that names what it encodes. While a flight is in
the air no second fill of that key starts; a GET that misses a prefix whose fill is in flight, the
GET that started it included, waits for it (``wait``) within the budget its client sent
(``wait_ms``: about what encoding the prefix itself would cost the worker) and is answered with
the hit when the fill lands, or a miss when it fails or the budget runs out. So N workers that
miss one new prefix at once cause one encode, not N + 1 (issue 13). A fill that fails, or runs
past the pool's time budget, is remembered (``failed``), so that a text tiktoken cannot encode
(o200k's panic on ~1M spaces) is not encoded again on every request.

Rejected: answering every miss at once and letting each worker encode locally (the old way): on a
cold start every worker encodes the prefix *and* the daemon encodes it again, on the same cores.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from flashtoken.wire import GetMiss

from .budget import PENDING_FILL_BYTES
from .fills import FillPool
from .settings import FAILED_FILLS_KEPT

log = logging.getLogger("flashtoken.daemon")

# What a flight's owner makes of its result (on the loop): the reply for each GET waiting for
# it, given the request id (None: the fill made nothing to answer with, they get a miss).
Answer = Callable[[int], list[Any]] | None


class _Flight:
    __slots__ = ("size", "land", "waiters")

    def __init__(self, size: int, land: Callable[[Any], Answer]) -> None:
        self.size = size
        self.land = land
        self.waiters: list[tuple[bytes, int, float]] = []  # (identity, request id, deadline)


class Flights:
    """The fills in flight, by key, on ``pool``; replies to waiters go out through ``send``."""

    def __init__(
        self,
        pool: FillPool,
        send: Callable[[bytes, list[Any]], None],
        counters: dict[str, int],
        *,
        max_pending: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self._send = send
        self._counters = counters
        self._max_pending = max_pending
        self._clock = clock
        self._flights: dict[Any, _Flight] = {}
        self._failed: OrderedDict[Any, str] = OrderedDict()
        self.pending_bytes = 0  # of the requests the flights hold (daemon/budget.py)

    def __contains__(self, key: Any) -> bool:
        return key in self._flights

    def __len__(self) -> int:
        return len(self._flights)

    def failed(self, key: Any) -> str | None:
        """Why the fill of ``key`` failed before (it is not tried again), or None."""
        return self._failed.get(key)

    def start(
        self, key: Any, size: int, land: Callable[[Any], Answer], fn: Callable[..., Any], *args: Any
    ) -> bool:
        """Run ``fn(*args)`` on the pool as the flight of ``key``; ``land(result)`` runs on the
        loop when it is done. False (no flight) when one is in flight already, the fill failed
        before, too many are pending, or the pool refuses it (too many stuck, or the requests
        waiting for fills would hold more than ``PENDING_FILL_BYTES``: ``fills_refused``)."""
        if key in self._flights or key in self._failed or len(self._flights) >= self._max_pending:
            return False
        if self.pending_bytes + size > PENDING_FILL_BYTES or not self.pool.submit(key, fn, *args):
            self._counters["fills_refused"] += 1
            return False
        self._flights[key] = _Flight(size, land)
        self.pending_bytes += size
        return True

    def wait(self, key: Any, identity: bytes, request_id: int, budget_s: float) -> bool:
        """Answer this GET when the flight of ``key`` lands, or after ``budget_s``; False if no
        flight is in the air (answer it now)."""
        flight = self._flights.get(key)
        if flight is None or budget_s <= 0:
            return False
        flight.waiters.append((identity, request_id, self._clock() + budget_s))
        return True

    def land(self) -> int:
        """Hand the fills that are done to their owners and answer their waiters; how many."""
        done = self.pool.done()
        for key, result in done:
            flight = self._take(key)
            if flight is not None:
                self._answer(flight, flight.land(result))
        return len(done)

    def fill_failed(self, key: Any, error: str, what: str) -> None:
        """A fill of ``what`` (e.g. "a 512-byte cl100k_base prefix") raised ``error``: counted,
        logged and remembered."""
        self._counters["fill_errors"] += 1
        log.warning("fill of %s failed: %s", what, error)
        self.fail(key, error)

    def fail(self, key: Any, error: str) -> None:
        """Remember that the fill of ``key`` failed (bounded: the oldest are forgotten)."""
        self._failed[key] = error
        while len(self._failed) > FAILED_FILLS_KEPT:
            self._failed.popitem(last=False)

    def abandon_overdue(self) -> list[tuple[Any, tuple]]:
        """The fills that ran past the pool's budget, given up on and remembered as failed, their
        waiters answered with a miss; returns their keys and fill arguments."""
        late = self.pool.overdue()
        for key, _ in late:
            flight = self._take(key)
            self._counters["fills_abandoned"] += 1
            self.fail(key, f"abandoned after {self.pool.budget:g} s (the fill time budget)")
            if flight is not None:
                self._answer(flight, None)
        return late

    def expire(self) -> None:
        """Answer with a miss the waiters whose budget ran out (their workers encode locally,
        as they would have without waiting); the flight goes on."""
        now = self._clock()
        for flight in self._flights.values():
            if any(deadline <= now for _, _, deadline in flight.waiters):
                keep = []
                for waiter in flight.waiters:
                    if waiter[2] <= now:
                        self._counters["waited_misses"] += 1
                        self._send(waiter[0], GetMiss(waiter[1], True).frames())
                    else:
                        keep.append(waiter)
                flight.waiters = keep

    def next_deadline(self) -> float | None:
        """When the first waiter's budget runs out (the loop polls no longer than that)."""
        deadlines = [d for f in self._flights.values() for _, _, d in f.waiters]
        return min(deadlines) if deadlines else None

    def clear(self) -> None:
        """The daemon stops: nothing lands any more."""
        self._flights.clear()
        self.pending_bytes = 0

    def _take(self, key: Any) -> _Flight | None:
        flight = self._flights.pop(key, None)
        if flight is not None:
            self.pending_bytes -= flight.size
        return flight

    def _answer(self, flight: _Flight, answer: Answer) -> None:
        for identity, request_id, _ in flight.waiters:
            if answer is not None:
                self._counters["waited_hits"] += 1
                self._send(identity, answer(request_id))
            else:
                self._counters["waited_misses"] += 1
                self._send(identity, GetMiss(request_id, False).frames())


def fill_error(exc: BaseException) -> str:
    """What a fill that raised ``exc`` remembers and answers with (bounded)."""
    return f"{type(exc).__name__}: {exc}"[:300]
