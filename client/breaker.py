"""The client's circuit breaker: stop asking a daemon that keeps failing, probe it now and then.

Also the fleet tier's (daemon/fleet.py): the same states for any remote that may hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Breaker"]


class Breaker:
    """A circuit breaker: stop asking a daemon that keeps failing, probe it now and then.

    closed: every request goes out. After ``failures`` consecutive failures: open for
    ``cooldown`` seconds (no request goes out; callers encode locally). Then half-open: one
    probe goes out; its success closes the breaker, its failure opens it again for twice as long
    (up to ``max_cooldown``). So a dead or frozen daemon costs one timeout per cool-down period,
    not one per call.
    """

    def __init__(
        self,
        failures: int,
        cooldown: float,
        max_cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = failures
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.failures = 0
        self.cooldown = self.base_cooldown
        self.open_until = 0.0
        self._state = "closed"

    @property
    def state(self) -> str:
        if self._state == "open" and self.clock() >= self.open_until:
            return "half-open"
        return self._state

    def allow(self) -> bool:
        """Whether a request may go out now; in half-open, only the one probe may."""
        if self._state == "closed":
            return True
        if self._state == "open" and self.clock() >= self.open_until:
            self._state = "probing"
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.cooldown = self.base_cooldown
        self._state = "closed"

    def failure(self) -> None:
        self.failures += 1
        if self._state == "probing":
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            self._open()
        elif self._state == "closed" and self.failures >= self.threshold:
            self._open()

    def _open(self) -> None:
        self._state = "open"
        self.open_until = self.clock() + self.cooldown
