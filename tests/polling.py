"""Waiting for a condition, never for a fixed time: the one polling helper of the tests.

A loaded machine only makes a wait longer, never a test wrong; the deadline is generous and
exists only so that a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def poll(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """``predicate()``'s first true value, polled every ``interval`` seconds, or None if none
    came within ``timeout`` seconds (for a wait whose running out is not a failure)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def wait_until(
    predicate: Callable[[], Any], timeout: float, message: str, interval: float = 0.02
) -> Any:
    """``predicate()``'s first true value, polled every ``interval`` seconds; AssertionError with
    ``message`` if none came within ``timeout`` seconds."""
    value = poll(predicate, timeout, interval)
    if not value:
        raise AssertionError(message)
    return value
