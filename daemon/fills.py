"""The daemon's fill pool: threads that encode off the loop, each fill within a time budget.

A fill is a function run on a pool thread that returns a result for the loop (each fill is a
flight, daemon/flights.py, whose owner stores the result). The loop never waits on a fill:
``submit`` queues it and returns; ``done`` hands back the results that are in; ``overdue``
tells the loop which fills have run past the budget, and
those are *abandoned*: the loop forgets them (their result, if it ever comes, is dropped) and
the pool starts a thread in place of the stuck one, so that one encode that never ends (a
download that hangs inside tiktoken's registry lock, an adversarial text) cannot take the pool
with it. A Python thread cannot be interrupted, so an abandoned thread runs on; at most
``max_abandoned`` are replaced, after which the pool refuses new fills rather than grow.

Rejected: ``concurrent.futures.ThreadPoolExecutor``. Its threads are joined at interpreter exit,
so a daemon asked to stop (SIGTERM) with a fill running did not exit (issue 11: 182% CPU 60 s
after SIGTERM). These threads are daemon threads: stopping the daemon never waits on an encode.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["FILL_BUDGET_S", "FillPool"]

# s: how long one fill may run. A fill is bounded in size (at most MAX_PREFIX_BYTES, or
# MAX_FILL_BLOCKS blocks of a chain), and tiktoken encodes 4 MiB in about a second; what runs
# past this is stuck. The environment variable is for tests and operators until the setting
# table carries it.
FILL_BUDGET_S = float(os.environ.get("FLASHTOKEN_DAEMON_FILL_BUDGET_S", "30"))


class _Job:
    __slots__ = ("id", "key", "fn", "args", "started")

    def __init__(self, job_id: int, key: Any, fn: Callable[..., Any], args: tuple) -> None:
        self.id, self.key, self.fn, self.args = job_id, key, fn, args
        self.started: float | None = None


class FillPool:
    """``threads`` daemon threads running fills; a fill is ``fn(*args) -> result``."""

    def __init__(
        self,
        threads: int,
        wake: Callable[[], None],
        *,
        budget: float = FILL_BUDGET_S,
        max_abandoned: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threads = threads
        self.budget = budget
        self.max_abandoned = max_abandoned
        self.abandoned = 0  # fills given up on (counted by the loop as fills_abandoned)
        self._wake = wake
        self._clock = clock
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._live: dict[int, _Job] = {}  # queued or running, by id (the loop's view)
        self._ids = itertools.count(1)
        self._workers = 0
        self._stopping = False

    def submit(self, key: Any, fn: Callable[..., Any], *args: Any) -> bool:
        """Queue ``fn(*args)``; False when the pool is out of threads (too many abandoned)."""
        if self._workers == 0:
            for _ in range(self.threads):
                self._start_worker()
        if self.abandoned >= self.max_abandoned:
            return False
        job = _Job(next(self._ids), key, fn, args)
        self._live[job.id] = job
        self._jobs.put(job)
        return True

    def done(self) -> list[tuple[Any, Any]]:
        """``(key, result)`` of the fills finished since the last call (abandoned ones not)."""
        out: list[tuple[Any, Any]] = []
        while True:
            try:
                job_id, result = self._results.get_nowait()
            except queue.Empty:
                return out
            job = self._live.pop(job_id, None)
            if job is not None:
                out.append((job.key, result))

    def overdue(self) -> list[tuple[Any, tuple]]:
        """Abandon the fills running longer than the budget; returns their keys and args."""
        now = self._clock()
        late = [
            job
            for job in self._live.values()
            if job.started is not None and now - job.started > self.budget
        ]
        for job in late:
            del self._live[job.id]
            self.abandoned += 1
            if self.abandoned <= self.max_abandoned:
                self._start_worker()  # in place of the stuck one
        return [(job.key, job.args) for job in late]

    def running(self) -> int:
        return sum(1 for job in self._live.values() if job.started is not None)

    def close(self) -> None:
        """Stop the threads once their current fill ends; never waits for one."""
        self._stopping = True
        for _ in range(self._workers):
            self._jobs.put(None)

    def _start_worker(self) -> None:
        self._workers += 1
        thread = threading.Thread(target=self._work, name="flashtoken-fill", daemon=True)
        thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._stopping:
                return
            if job.id not in self._live:
                continue  # abandoned while queued (cannot happen today: only running ones are)
            job.started = self._clock()  # read by the loop's overdue(): a float store is atomic
            try:
                result = job.fn(*job.args)
            except BaseException as exc:  # noqa: B036 - the fill functions catch their own
                result = exc
            self._results.put((job.id, result))
            self._wake()
