"""Admission on the second sight: what is cached is what was asked for at least twice.

A prompt whose declared prefix changes on every request (a chat's whole history passed as
``prefix=``) is never served from a cache, so caching it only costs: an encode split in two, an
L1 entry, a fill, and the eviction of something useful. A :class:`SecondSight` remembers the
digests of texts seen once (memcached's and TinyLFU's doorkeeper idea, minus the counting), so
the first request for a text is encoded whole, exactly as tiktoken would, and only a text seen
again is cached.

Bounded: at most ``capacity`` digests (16 bytes each), the oldest half forgotten when full, so a
flood of distinct texts costs a fixed amount of memory and at worst one more miss for a text
that comes back after it.
"""

from __future__ import annotations

import threading
from array import array

import tiktoken

from flashtoken.specials import SpecialArg

__all__ = ["SecondSight", "WholeText"]


class SecondSight:
    """``seen_before(digest)``: whether ``digest`` was offered before (and remember it)."""

    def __init__(self, capacity: int = 65536) -> None:
        if capacity < 2:
            raise ValueError(f"capacity must be 2 or more, not {capacity}")
        self.capacity = capacity
        self._seen: dict[bytes, None] = {}  # insertion-ordered: the oldest first
        self._lock = threading.Lock()

    def seen_before(self, digest: bytes) -> bool:
        with self._lock:
            if digest in self._seen:
                return True
            if len(self._seen) >= self.capacity:
                for old in list(self._seen)[: self.capacity // 2]:
                    del self._seen[old]
            self._seen[digest] = None
            return False

    def forget(self, digest: bytes) -> None:
        """Forget ``digest`` (the text is cached now: its sightings are the cache's business)."""
        with self._lock:
            self._seen.pop(digest, None)

    def __len__(self) -> int:
        return len(self._seen)


class WholeText:
    """A declared prefix not cached (yet): the calls of a :class:`FixedPrefixTokenCache`, each
    answered by encoding ``prefix + suffix`` whole. For ``encode`` that is tiktoken's own call,
    so its ids and its exceptions are tiktoken's by construction; for ``encode_ordinary``,
    ``encoder`` (tiktoken, or a fast backend that passed its gate)."""

    __slots__ = ("prefix", "_enc", "_encoder")

    def __init__(self, enc: tiktoken.Encoding, prefix: str, encoder: object = None) -> None:
        self.prefix = prefix
        self._enc = enc
        self._encoder = encoder or enc

    def encode_ordinary(self, suffix: str) -> list[int]:
        return self._encoder.encode_ordinary(self.prefix + _str(suffix))  # type: ignore[attr-defined]

    def encode_ordinary_array(self, suffix: str) -> array[int]:
        return array("I", self.encode_ordinary(suffix))

    def count_ordinary(self, suffix: str) -> int:
        return len(self.encode_ordinary(suffix))

    def encode(
        self,
        suffix: str,
        *,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> list[int]:
        return self._enc.encode(
            self.prefix + _str(suffix),
            allowed_special=allowed_special,  # type: ignore[arg-type]
            disallowed_special=disallowed_special,
        )

    def count(
        self,
        suffix: str,
        *,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> int:
        return len(
            self.encode(
                suffix, allowed_special=allowed_special, disallowed_special=disallowed_special
            )
        )


def _str(suffix: object) -> str:
    if not isinstance(suffix, str):  # the message FixedPrefixTokenCache gives
        raise TypeError(f"suffix must be a str, not {type(suffix).__name__}")
    return suffix
