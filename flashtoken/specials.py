"""The special-token policy of ``encode``, in one place.

tiktoken's ``encode(text, *, allowed_special=set(), disallowed_special="all")`` first raises
``ValueError`` if ``text`` contains a disallowed special token, then encodes with the allowed
ones as single tokens that split the text into segments encoded apart. A prefix cache must do
the same for ``prefix + suffix`` while looking only at the suffix and the join, so:

- a disallowed token inside the prefix is found once; one in the suffix or spanning the join
  (``"... <|endof"`` + ``"text|> ..."``) is found in the last ``longest - 1`` characters of the
  prefix plus the suffix. Either way tiktoken itself is then called on the whole text, so the
  error is tiktoken's own, word for word;
- an allowed token is a hard boundary: the prefix's stable cut never lies before the end of its
  last allowed token, and never after the start of a trailing fragment that the suffix could
  complete into an allowed token.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import regex
import tiktoken

from flashtoken import tiktoken_parts

if TYPE_CHECKING:  # an Encoder has the two calls used here (flashtoken/backends.py)
    from flashtoken.backends import Encoder

SpecialArg = Literal["all"] | AbstractSet[str] | Collection[str]


@dataclass(frozen=True)
class SpecialPolicy:
    """Normalised ``allowed_special`` / ``disallowed_special``, as tiktoken normalises them.

    ``ordinary`` marks the policy of ``encode_ordinary`` itself (:data:`ORDINARY`), as opposed to
    ``encode`` with nothing allowed: the two give the same ids but not the same exception where
    tiktoken fails (see :func:`encode_with`).
    """

    allowed: frozenset[str]
    disallowed: frozenset[str]
    ordinary: bool = False

    @classmethod
    def of(
        cls,
        enc: tiktoken.Encoding,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> SpecialPolicy:
        specials = enc.special_tokens_set
        if allowed_special == "all":
            allowed = frozenset(specials)
        else:
            allowed = _string_set(allowed_special, "allowed_special")
        if disallowed_special == "all":
            disallowed = frozenset(specials) - allowed
        else:
            disallowed = _string_set(disallowed_special, "disallowed_special")
        # Strings in allowed_special that are no special token change nothing in tiktoken.
        return cls(allowed & specials, disallowed)

    @classmethod
    def parse(
        cls, enc: tiktoken.Encoding, allowed_special: object, disallowed_special: object
    ) -> SpecialPolicy | None:
        """:meth:`of` for the arguments of an ``encode`` call, or None when FlashToken does not
        reproduce what tiktoken does with them.

        tiktoken takes ``"all"`` or a set / frozenset for ``allowed_special`` (a list fails its
        ``special_tokens_set - allowed_special`` or its Rust conversion with TypeError) and
        anything iterable for ``disallowed_special``, which it checks for first (so a bad
        ``allowed_special`` with a disallowed token present is a ValueError). Rather than copy
        each of those rules, the caller hands a call with any other argument to tiktoken whole:
        its outcome (ids, TypeError or ValueError) is the answer by construction. Nothing is
        consumed here, so a generator reaches tiktoken intact.
        """
        if not (_is_all(allowed_special) or type(allowed_special) in (set, frozenset)):
            return None
        if not (_is_all(disallowed_special) or type(disallowed_special) in _COLLECTIONS):
            return None
        try:
            return cls.of(enc, allowed_special, disallowed_special)  # type: ignore[arg-type]
        except TypeError:  # an item that is no str: tiktoken says what it says about that
            return None

    @property
    def key(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """A stable, hashable, serialisable form (sorted), for cache keys and the wire."""
        return tuple(sorted(self.allowed)), tuple(sorted(self.disallowed))

    @functools.cached_property
    def reach(self) -> int:
        """How far a special string can reach back from the end of the prefix into it.

        Computed once per policy: encode paths ask on every call, and o200k_harmony has over a
        thousand special tokens (~44 us to measure them all)."""
        return max(map(len, self.allowed | self.disallowed), default=1) - 1

    @functools.cached_property
    def _allowed_starts(self) -> tuple[str, ...]:
        return tuple({token[0] for token in self.allowed if token})

    def may_hold_allowed(self, text: str) -> bool:
        """False when no allowed special token can occur in ``text`` (not even its first
        character does): tiktoken's ``encode`` then equals ``encode_ordinary``, which skips
        converting the allowed set (over a thousand tokens for o200k_harmony) on every call."""
        return any(start in text for start in self._allowed_starts)

    def finds_disallowed(self, text: str) -> bool:
        return bool(self.disallowed) and _search_pattern(self.disallowed).search(text) is not None

    def last_allowed_end(self, text: str, start: int = 0) -> int:
        """End of the last allowed special token in ``text[start:]``, or ``start``."""
        end = start
        if self.allowed:
            for match in _search_pattern(self.allowed).finditer(text, start):
                end = match.end()
        return end

    def completable_from(self, text: str, start: int) -> int:
        """Earliest offset >= ``start`` where the rest of ``text`` is a proper prefix of an
        allowed token (a continuation could complete it), or ``len(text)``."""
        if self.allowed:
            prefixes = _proper_prefixes(self.allowed)
            for offset in range(max(start, len(text) - self.reach), len(text)):
                if text[offset:] in prefixes:
                    return offset
        return len(text)


ORDINARY = SpecialPolicy(frozenset(), frozenset(), ordinary=True)
"""The policy of ``encode_ordinary``: every special token's text is ordinary text."""

_COLLECTIONS = (set, frozenset, tuple, list)


@functools.lru_cache(maxsize=256)
def forbidden_ids(enc: tiktoken.Encoding, allowed: frozenset[str]) -> frozenset[int]:
    """The ids of ``enc``'s special tokens not in ``allowed``: ids that tokens taken from a
    cache must not hold under that policy (a special token's id decodes to its text, so a
    spelling check alone cannot tell it from the ordinary tokens of that text)."""
    return frozenset(i for s, i in tiktoken_parts.special_tokens(enc).items() if s not in allowed)


def _is_all(value: object) -> bool:
    return isinstance(value, str) and value == "all"


def encode_with(enc: tiktoken.Encoding | Encoder, text: str, policy: SpecialPolicy) -> list[int]:
    """tiktoken's encoding of ``text`` with ``policy.allowed`` as special tokens (no check for
    disallowed ones: the caller made it), and tiktoken's own outcome where it fails.

    With no allowed token in ``text``, ``encode`` equals ``encode_ordinary``, which skips
    converting the allowed set (over a thousand tokens for o200k_harmony) on every call. But
    where tiktoken's regex overflows (a million spaces), ``encode_ordinary`` panics
    (``pyo3_runtime.PanicException``, a BaseException) while ``encode`` raises ValueError: an
    ``encode`` call that panicked is replayed as tiktoken's ``encode`` for its own error.
    """
    if policy.allowed and policy.may_hold_allowed(text):
        return enc.encode(text, allowed_special=policy.allowed, disallowed_special=())
    if policy.ordinary:
        return enc.encode_ordinary(text)
    try:
        return enc.encode_ordinary(text)
    except BaseException as exc:
        if not is_panic(exc):
            raise
        return enc.encode(text, allowed_special=policy.allowed, disallowed_special=())


def is_panic(exc: BaseException) -> bool:
    """Whether ``exc`` is a Rust panic surfaced by tiktoken's bindings (not importable by name)."""
    return type(exc).__name__ == "PanicException"


def _string_set(value: object, name: str) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, Collection):
        raise TypeError(f'{name} must be "all" or a collection of strings, not {value!r}')
    if not all(isinstance(item, str) for item in value):
        raise TypeError(f"{name} must contain only strings")
    return frozenset(value)


@functools.lru_cache(maxsize=64)
def _search_pattern(tokens: frozenset[str]) -> regex.Pattern[str]:
    # Longest first, so that of two tokens where one starts the other the longer one is found.
    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)))


@functools.lru_cache(maxsize=64)
def _proper_prefixes(tokens: frozenset[str]) -> frozenset[str]:
    return frozenset(t[:i] for t in tokens for i in range(1, len(t)))
