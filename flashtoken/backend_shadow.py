"""Shadow verification of a fast backend: sampled calls re-encoded by tiktoken, off the request
path (flashtoken/backends.py's ``shadow_fraction``; docs/BACKENDS.md, item 5).

One daemon thread per Encoder and process re-encodes what it is offered; the queue is bounded
and a full queue drops the sample (``shadow_dropped``), never blocks the caller. A disagreement
disables the backend for that encoding in the whole process, logs the case at ERROR on the
``flashtoken.backends`` logger and is counted (``shadow_mismatches``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any

import tiktoken

__all__ = ["Shadow", "fatal"]

_log = logging.getLogger("flashtoken.backends")


def fatal(exc: BaseException) -> bool:
    """Whether ``exc`` must pass through a backend call (anything else is a refusal)."""
    return isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit))


class Shadow:
    """Re-encodes sampled calls with tiktoken on one daemon thread; disables on a disagreement."""

    MAX_QUEUED = 256

    def __init__(self, enc: tiktoken.Encoding, state: Any) -> None:
        # state: the backend's trusted state (backends._State); disable(reason) on a mismatch.
        self._enc = enc
        self._state = state
        self._pid = -1
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, Any, list[int]]] = queue.Queue(self.MAX_QUEUED)
        self.counts = {
            "shadow_offered": 0,
            "shadow_checked": 0,
            "shadow_dropped": 0,
            "shadow_mismatches": 0,
        }

    def offer(self, text: str, allowed: Any, ids: list[int]) -> None:
        if self._pid != os.getpid():  # first use, or a forked child: threads do not survive fork
            self._start()
        self.counts["shadow_offered"] += 1
        try:
            self._queue.put_nowait((text, allowed, list(ids)))
        except queue.Full:
            self.counts["shadow_dropped"] += 1

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._queue = queue.Queue(self.MAX_QUEUED)
            thread = threading.Thread(target=self._run, name="flashtoken-shadow", daemon=True)
            thread.start()
            self._pid = os.getpid()

    def _run(self) -> None:
        q = self._queue
        while True:
            text, allowed, ids = q.get()
            try:
                if allowed is None:
                    want = self._enc.encode_ordinary(text)
                else:
                    want = self._enc.encode(text, allowed_special=allowed, disallowed_special=())
            except BaseException as exc:  # tiktoken raised where the backend answered
                if fatal(exc):
                    raise
                want = f"raises {type(exc).__name__}"  # type: ignore[assignment]
            self.counts["shadow_checked"] += 1
            if want != ids:
                self.counts["shadow_mismatches"] += 1
                shown = text if len(text) <= 200 else text[:197] + "..."
                reason = (
                    f"shadow check: the backend disagreed with tiktoken on {self._enc.name} for"
                    f" {shown!r} (allowed={sorted(allowed) if allowed else None}); disabled"
                )
                self._state.disable(reason)
                _log.error("%s", reason)
