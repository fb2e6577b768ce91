"""How long a GET may wait for the daemon's fill of its prefix (single flight).

A worker that misses a prefix whose fill is in flight should wait for it while that is quicker
than encoding the prefix itself, and no longer (docs/PROTOCOL.md, ``wait_ms``). "Encoding it
itself" is measured, not assumed: :class:`WaitBudget` keeps what this worker's own local encodes
of prefixes cost it, wall clock, in nanoseconds a character. On an idle host that is the
tokenizer's speed; on a host whose cores are all busy (a cold start: every worker and the
daemon's fill threads encoding at once) it is several times more, and so is a fill's time: a
budget fixed at the idle speed ran out for most GETs of a cold start at 4 workers on 2 cores
(``waited_misses`` 70-115 of 120 fills), and each of those workers then encoded the prefix the
daemon was encoding too, on the same cores.

The wait stays inside the client's own round-trip timeout (a fraction of it), so a wait never
trips the breaker, and is twice the measured local cost: the daemon's one encode serves every
worker that waits for it.
"""

from __future__ import annotations

__all__ = ["IDLE_NS_PER_CHAR", "WaitBudget"]

# ns a character of tiktoken's encode on an idle core (cl100k_base, English and code: ~2.1 ms
# for 32 KiB here), until this worker has measured its own.
IDLE_NS_PER_CHAR = 61.0
_WEIGHT = 0.3  # of the latest measurement in the running average
_SHARE_OF_TIMEOUT = 0.75  # the rest of the timeout is the reply's margin after a wait ends
_LOWEST, _HIGHEST = 1.0, 100_000.0  # ns a character: bounds on one measurement's say


class WaitBudget:
    """``ms(chars)``: the wait a GET for a prefix of ``chars`` characters may ask for;
    ``observe(chars, seconds)``: a local encode of such a prefix took ``seconds``."""

    def __init__(self, timeout_s: float, ns_per_char: float = IDLE_NS_PER_CHAR) -> None:
        self.ns_per_char = ns_per_char
        self._most_ms = int(timeout_s * 1000 * _SHARE_OF_TIMEOUT)

    def observe(self, chars: int, seconds: float) -> None:
        if chars <= 0:
            return
        sample = min(max(seconds * 1e9 / chars, _LOWEST), _HIGHEST)
        self.ns_per_char += _WEIGHT * (sample - self.ns_per_char)

    def ms(self, chars: int) -> int:
        return max(0, min(self._most_ms, 1 + int(2 * self.ns_per_char * chars / 1e6)))
