"""How many of the tokens a client returned came from a cache, and how many it encoded itself.

Two counters of ``Client.stats()`` (and ``AsyncClient.stats()``), as serving stacks report a
prompt's ``cached_tokens``: ``cached_tokens``, the tokens of the results taken as they were from a
cache (this process's L1, the host's map, the daemon, and through it the fleet), and
``uncached_tokens``, those this process encoded for the call (a suffix, the re-encoded last
pieces of a prefix, the rest of a text after its cached chain, a prefix seen for the first time).
Their sum is every token the encode and count methods returned. A prefix fetched by a call and
encoded locally counts as uncached for that call; the next call finds it in the L1.

Counted where every call's tokens are known: for a text with no prefix in ``auto_encode``
(client/flows.py), for a declared prefix here, on the cache that ``ClientBase`` hands to either
driver. Plain dict increments, as the other counters (no lock: a rare lost increment between two
threads is the price of not taking one on every call).
"""

from __future__ import annotations

from array import array
from typing import Any

from flashtoken.prefix import FixedPrefixTokenCache

__all__ = ["CACHED_SOURCES", "Tallied", "count_tokens"]

# Where a declared prefix's head came from without this call encoding it (client/flows.py's
# sources); "local" and "whole" were encoded by the call.
CACHED_SOURCES = frozenset({"l1", "map", "daemon"})


def count_tokens(counters: dict[str, int], returned: int, cached: int) -> None:
    """Count one call's ``returned`` tokens, of which the first ``cached`` came from a cache."""
    counters["cached_tokens"] += cached
    counters["uncached_tokens"] += returned - cached


class Tallied:
    """A declared prefix's cache as one call uses it: the same methods, each result counted.

    ``cached`` is the number of tokens every result starts with that the cache held before the
    call (the prefix's tokens before its stable cut), 0 when the call itself encoded the prefix.
    A new one per call (a few hundred nanoseconds): the L1 keeps the bare cache, whose source
    differs from call to call.
    """

    __slots__ = ("_cache", "_counters", "_cached")

    def __init__(self, cache: Any, counters: dict[str, int], cached: int) -> None:
        self._cache = cache
        self._counters = counters
        self._cached = cached

    @classmethod
    def of(
        cls, cache: Any, source: str | None, allowed: frozenset[str], counters: dict[str, int]
    ) -> Tallied:
        reused = source in CACHED_SOURCES and isinstance(cache, FixedPrefixTokenCache)
        return cls(cache, counters, cache.head_count(allowed) if reused else 0)

    def _counted(self, returned: int) -> None:
        count_tokens(self._counters, returned, self._cached)

    def encode_ordinary(self, suffix: str) -> list[int]:
        tokens: list[int] = self._cache.encode_ordinary(suffix)
        self._counted(len(tokens))
        return tokens

    def encode_ordinary_array(self, suffix: str) -> array[int]:
        tokens: array[int] = self._cache.encode_ordinary_array(suffix)
        self._counted(len(tokens))
        return tokens

    def count_ordinary(self, suffix: str) -> int:
        n: int = self._cache.count_ordinary(suffix)
        self._counted(n)
        return n

    def encode(self, suffix: str, **special: Any) -> list[int]:
        tokens: list[int] = self._cache.encode(suffix, **special)
        self._counted(len(tokens))  # not reached when tiktoken raised: nothing was returned
        return tokens

    def count(self, suffix: str, **special: Any) -> int:
        n: int = self._cache.count(suffix, **special)
        self._counted(n)
        return n
