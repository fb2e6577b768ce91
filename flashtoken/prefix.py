"""FixedPrefixTokenCache: encode ``prefix + suffix`` for a fixed prefix, paying for the suffix."""

from __future__ import annotations

import functools
from array import array
from collections.abc import Sequence
from typing import Any, NamedTuple

import tiktoken

from flashtoken.backends import Encoder, get_encoder
from flashtoken.boundary import CutRule, cut_rule, find_cut
from flashtoken.encodings import resolve_encoding
from flashtoken.fit import Cut, check_limit, cut_tokens, within
from flashtoken.ids import token_list
from flashtoken.parity import encode_batch, to_numpy
from flashtoken.specials import ORDINARY, SpecialArg, SpecialPolicy, encode_with
from flashtoken.text import require_str
from flashtoken.unicode import has_surrogates

EncodingLike = str | tiktoken.Encoding

__all__ = ["ORDINARY", "FixedPrefixTokenCache", "PrefixSplit", "TokenDelta", "split_prefix"]


class PrefixSplit(NamedTuple):
    """A prefix split at its stable cut: ``head`` are its tokens before offset ``cut``.

    For every suffix, ``head + encode(prefix[cut:] + suffix)`` is ``encode(prefix + suffix)``.
    """

    head: list[int]
    cut: int


class TokenDelta(NamedTuple):
    """Drop the last ``rollback_tokens`` of the tokens you hold, then add ``tokens_to_append``."""

    rollback_tokens: int
    tokens_to_append: list[int]


def split_prefix(
    encoding: EncodingLike,
    prefix: str,
    *,
    allowed_special: SpecialArg = frozenset(),
    backtrack_pieces: int | None = None,
    backend: str | Encoder = "tiktoken",
) -> PrefixSplit:
    """Encode ``prefix`` once and split it at its stable cut.

    ``backend`` encodes the prefix (flashtoken/backends.py: a fast exact tokenizer, gated).

    >>> split_prefix("cl100k_base", "You are a helpful assistant.")
    PrefixSplit(head=[2675, 527, 264], cut=9)
    """
    enc = resolve_encoding(encoding)
    require_str(prefix, "prefix")
    policy = SpecialPolicy.of(enc, allowed_special, ())
    encoder = get_encoder(enc, backend)
    return _split(enc, cut_rule(enc, backtrack_pieces), policy, prefix, encoder)


def _split(
    enc: tiktoken.Encoding,
    rule: CutRule,
    policy: SpecialPolicy,
    prefix: str,
    encoder: Encoder | tiktoken.Encoding | None = None,
) -> PrefixSplit:
    tokens = encode_with(encoder or enc, prefix, policy)
    cut, kept = find_cut(enc, rule, policy, prefix, 0, tokens)
    return PrefixSplit(token_list(tokens[:kept]), cut)


class FixedPrefixTokenCache:
    """Encodes ``prefix + suffix`` for a fixed ``prefix``, exactly as tiktoken does.

    The prefix is encoded once. Each call re-encodes only the prefix's last few regex pieces
    together with the suffix, and reuses the tokens before them.

    >>> cache = FixedPrefixTokenCache("cl100k_base", "You are a helpful assistant.")
    >>> cache.encode_ordinary(" Answer briefly.")
    [2675, 527, 264, 11190, 18328, 13, 22559, 27851, 13]
    >>> cache.encode_ordinary(" Answer briefly.") == cache.encoding.encode_ordinary(
    ...     "You are a helpful assistant. Answer briefly.")
    True

    ``backtrack_pieces`` sets the number of pieces re-encoded (default 3; 8 for a pattern no
    proof covers); a value below what the encoding's pattern is proven to need is raised to it.
    ``backend`` encodes what is not cached (the prefix once, then each tail + suffix):
    ``"tiktoken"`` (default), ``"toktok"``, ``"gigatoken"``, ``"fastest"`` or an
    :class:`~flashtoken.backends.Encoder`; a fast one is used only once it has passed the
    exactness gate against tiktoken (docs/BACKENDS.md).

    ``eager=False`` encodes nothing up front: the first ``encode_ordinary`` or
    ``count_ordinary`` encodes ``prefix + suffix`` whole, as tiktoken (or the backend) would,
    and the prefix is split on the next call. A prefix used once then costs one encode, not the
    prefix's and then the tail's. Rejected: taking the split from that first encode: counting
    the tokens before the cut walks back over the suffix's, 10-60 µs, over 10% of the encode.
    """

    def __init__(
        self,
        encoding: EncodingLike,
        prefix: str,
        *,
        backtrack_pieces: int | None = None,
        backend: str | Encoder = "tiktoken",
        eager: bool = True,
    ) -> None:
        require_str(prefix, "prefix")
        enc = resolve_encoding(encoding)
        if eager:
            self._setup(enc, prefix, cut_rule(enc, backtrack_pieces), backend)
            self._use_ordinary(self._split_for(ORDINARY))
        else:
            # Often used once: the cut rule (~2 µs, most of the set-up) waits for a split
            # (__getattr__) unless the pieces were chosen. Two methods shadowed for the first call
            # only (pop: a batch's threads may all make it): the hot paths stay check-free.
            rule = None if backtrack_pieces is None else cut_rule(enc, backtrack_pieces)
            self._setup(enc, prefix, rule, backend)
            whole, shadows = self._encoder, self.__dict__

            def first(suffix: str, count: bool = False) -> Any:
                shadows.pop("encode_ordinary", None), shadows.pop("count_ordinary", None)
                return (whole.count_ordinary if count else whole.encode_ordinary)(prefix + suffix)

            self.encode_ordinary = first  # type: ignore[method-assign]
            self.count_ordinary = lambda suffix: first(suffix, True)  # type: ignore[method-assign]

    @classmethod
    def from_split(
        cls,
        encoding: EncodingLike,
        prefix: str,
        split: PrefixSplit,
        *,
        allowed_special: SpecialArg = frozenset(),
        backend: str | Encoder = "tiktoken",
    ) -> FixedPrefixTokenCache:
        """A cache whose split for ``allowed_special`` was computed elsewhere (by the daemon).

        ``split.head`` may be a list (kept as it is: pass :func:`token_list`'s to save memory) or
        an ``array('I')``. The caller vouches for ``split``; the splits of other policies are
        computed here when first used.
        """
        self = cls.__new__(cls)
        enc = resolve_encoding(encoding)
        self._setup(enc, prefix, _default_rule(enc), backend)
        # A worker's first request for a prefix from the host map comes here: nothing computed
        # that the entry's first use does not need.
        plain = type(allowed_special) is frozenset and not allowed_special
        allowed = frozenset() if plain else SpecialPolicy.of(enc, allowed_special, ()).allowed
        if not isinstance(split.head, list):
            split = PrefixSplit(token_list(split.head), split.cut)
        self._splits[allowed] = split
        if not allowed:
            self._use_ordinary(split)
        # Otherwise the ordinary split is computed if encode_ordinary is ever called (__getattr__).
        return self

    def _setup(
        self, enc: tiktoken.Encoding, prefix: str, rule: CutRule | None, backend: str | Encoder
    ) -> None:
        self._enc = enc
        # What is not cached is encoded by this object (tiktoken's own methods by default).
        self._encoder = get_encoder(enc, backend)
        self._prefix = prefix
        if rule is not None:  # else the default rule, made when first needed (__getattr__)
            self._rule = rule
        self._splits: dict[frozenset[str], PrefixSplit] = {}
        self._held_tails: dict[frozenset[str], list[int]] = {}
        self._prefix_has: dict[frozenset[str], bool] = {}
        self._policies: dict[tuple[object, object], SpecialPolicy | None] = {}

    def _use_ordinary(self, split: PrefixSplit) -> None:
        # Plain attributes, read by the hot paths below without a lookup of the split.
        self._head, self._tail = split.head, self._prefix[split.cut :]

    def __getattr__(self, name: str) -> object:
        # Only reached for attributes not set yet: the ordinary split of a cache made with
        # from_split for another policy, and the array form of the head. Computing them here
        # keeps the hot paths free of "is it computed yet?" checks.
        if name in ("_head", "_tail"):
            self._use_ordinary(self._split_for(ORDINARY))
            return getattr(self, name)
        if name == "_rule":  # a lazy cache's (eager=False)
            self._rule = cut_rule(self._enc)
            return self._rule
        if name == "_raw_prefix":  # for encode_to_numpy
            self._raw_prefix = has_surrogates(self._prefix)
            return self._raw_prefix
        if name == "_head_array":
            self._head_array = array("I", self._head)
            return self._head_array
        raise AttributeError(name)

    # -- read-only views ------------------------------------------------------------------------

    @property
    def encoding(self) -> tiktoken.Encoding:
        return self._enc

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def backtrack_pieces(self) -> int:
        """How many trailing pieces are re-encoded (the asked value, or the proven minimum)."""
        return self._rule.pieces

    @property
    def prefix_tokens(self) -> tuple[int, ...]:
        """``encoding.encode_ordinary(prefix)``."""
        return tuple(self._head + self._held_tail(ORDINARY))

    def _held_tail(self, policy: SpecialPolicy) -> list[int]:
        """The prefix's own tokens after its cut, under ``policy``."""
        held = self._held_tails.get(policy.allowed)
        if held is None:
            split = self._split_for(policy)
            held = self._held_tails[policy.allowed] = encode_with(
                self._encoder, self._prefix[split.cut :], policy
            )
        return held

    def _delta(self, policy: SpecialPolicy, tail: list[int]) -> TokenDelta:
        """The delta from the prefix's own tokens to ``head + tail``, rolling back no more than
        needed: the prefix's tokens after the cut often start the same way as ``tail``."""
        held = self._held_tail(policy)
        same = 0
        for mine, theirs in zip(held, tail, strict=False):
            if mine != theirs:
                break
            same += 1
        return TokenDelta(len(held) - same, tail[same:])

    @property
    def cut(self) -> int:
        """Offset into ``prefix`` where re-encoding starts (for ``encode_ordinary``)."""
        return len(self._prefix) - len(self._tail)

    # -- encode_ordinary ----------------------------------------------------------------------

    def encode_ordinary(self, suffix: str) -> list[int]:
        """``encoding.encode_ordinary(prefix + suffix)``, without re-encoding the prefix."""
        return self._head + self._encoder.encode_ordinary(self._tail + suffix)

    def encode_ordinary_array(self, suffix: str) -> array[int]:
        """The same tokens as an ``array('I')`` (uint32): one memcpy for the prefix's part.

        Wrap it without copying with ``numpy.frombuffer(a, dtype=numpy.uint32)``.
        """
        return self._head_array + array("I", self._encoder.encode_ordinary(self._tail + suffix))

    def count_ordinary(self, suffix: str) -> int:
        """``len(encode_ordinary(suffix))``, without building the list."""
        return len(self._head) + self._encoder.count_ordinary(self._tail + suffix)

    def encode_ordinary_delta(self, suffix: str) -> TokenDelta:
        """For callers holding ``prefix_tokens`` (a KV cache): what to drop and what to add.

        >>> cache = FixedPrefixTokenCache("cl100k_base", "Total: 12")
        >>> cache.prefix_tokens, cache.encode_ordinary_delta("3")
        ((7749, 25, 220, 717), TokenDelta(rollback_tokens=1, tokens_to_append=[4513]))
        """
        return self._delta(ORDINARY, self._encoder.encode_ordinary(self._tail + suffix))

    # -- encode, with special tokens ----------------------------------------------------------

    def encode(
        self,
        suffix: str,
        *,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> list[int]:
        """``encoding.encode(prefix + suffix, allowed_special=..., disallowed_special=...)``.

        Raises tiktoken's own ValueError if the text has a disallowed special token, also one
        that only forms across the join (``"...<|endof"`` + ``"text|>..."``).
        """
        split, tail = self._encode_plan(suffix, allowed_special, disallowed_special)
        return split.head + tail

    def count(
        self,
        suffix: str,
        *,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> int:
        """``len(encode(suffix, ...))``, without building the list."""
        split, tail = self._encode_plan(suffix, allowed_special, disallowed_special)
        return len(split.head) + len(tail)

    def encode_delta(
        self,
        suffix: str,
        *,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> TokenDelta:
        """Like :meth:`encode_ordinary_delta`, against ``encode(prefix, allowed_special=...)``."""
        split, tail = self._encode_plan(suffix, allowed_special, disallowed_special)
        # tiktoken took the arguments (or it would have raised), so allowed_special is "all" or
        # a set, and the tokens the caller holds are those of this policy.
        policy = SpecialPolicy.of(self._enc, allowed_special, ())
        own = self._split_for(policy)
        if split is not own:  # tiktoken encoded the whole text (and did not raise): all new
            return TokenDelta(len(own.head) + len(self._held_tail(policy)), tail)
        return self._delta(policy, tail)

    def _encode_plan(
        self, suffix: str, allowed_special: SpecialArg, disallowed_special: SpecialArg
    ) -> tuple[PrefixSplit, list[int]]:
        require_str(suffix, "suffix")
        policy = self._policy(allowed_special, disallowed_special)
        if policy is None or (policy.disallowed and self._finds_disallowed(policy, suffix)):
            # tiktoken raises its own error (and if it did not, its answer is still exact).
            return PrefixSplit([], 0), self._enc.encode(
                self._prefix + suffix,
                allowed_special=allowed_special,  # type: ignore[arg-type]
                disallowed_special=disallowed_special,
            )
        split = self._split_for(policy)
        return split, encode_with(self._encoder, self._prefix[split.cut :] + suffix, policy)

    def _policy(self, allowed_special: object, disallowed_special: object) -> SpecialPolicy | None:
        """The policy of these arguments (memoised), or None: hand the call to tiktoken."""
        key = (_memo_key(allowed_special), _memo_key(disallowed_special))
        policy = self._policies.get(key, _UNSEEN)
        if policy is _UNSEEN:
            policy = SpecialPolicy.parse(self._enc, allowed_special, disallowed_special)
            if None not in key and len(self._policies) < 64:
                self._policies[key] = policy
        return policy  # type: ignore[return-value]

    def _finds_disallowed(self, policy: SpecialPolicy, suffix: str) -> bool:
        in_prefix = self._prefix_has.get(policy.disallowed)
        if in_prefix is None:
            in_prefix = self._prefix_has[policy.disallowed] = policy.finds_disallowed(self._prefix)
        join = self._prefix[max(0, len(self._prefix) - policy.reach) :]
        return in_prefix or policy.finds_disallowed(join + suffix)

    def _split_for(self, policy: SpecialPolicy) -> PrefixSplit:
        split = self._splits.get(policy.allowed)
        if split is None:
            split = self._splits[policy.allowed] = _split(
                self._enc, self._rule, policy, self._prefix, self._encoder
            )
        return split

    # -- budgeting, batches, numpy and decode (flashtoken/fit.py, flashtoken/parity.py) --------

    def fits_ordinary(self, suffix: str, max_tokens: int) -> bool:
        """``count_ordinary(suffix) <= max_tokens``; no encode where bounds decide
        (flashtoken/fit.py)."""
        return within(
            self._enc,
            self._encoder.count_ordinary,
            len(self._head),
            self._tail + suffix,
            max_tokens,
        )

    def truncate_ordinary(self, suffix: str, max_tokens: int) -> Cut:
        """The first ids of ``prefix + suffix``, at most ``max_tokens``, ending at a character,
        and the offset into ``prefix + suffix`` they spell up to; within the cached part of the
        prefix, with no encode at all.

        >>> FixedPrefixTokenCache("cl100k_base", "You are a helpful assistant.").truncate_ordinary(
        ...     " Answer briefly.", 2)
        Cut(tokens=[2675, 527], offset=7)
        """
        require_str(suffix, "suffix")
        check_limit(max_tokens)
        head = self._head
        if max_tokens < len(head):
            return cut_tokens(self._enc, self._prefix[: self.cut], head, max_tokens)
        text = self._prefix + suffix
        return cut_tokens(self._enc, text, self.encode_ordinary(suffix), max_tokens)

    def encode_ordinary_batch(
        self, suffixes: Sequence[str], *, num_threads: int = 8
    ) -> list[list[int]]:
        """``[encode_ordinary(s) for s in suffixes]``, on threads as tiktoken's batch."""
        return encode_batch(self.encode_ordinary, suffixes, num_threads)

    def encode_batch(
        self,
        suffixes: Sequence[str],
        *,
        num_threads: int = 8,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> list[list[int]]:
        """``[encode(s, ...) for s in suffixes]``, on threads as tiktoken's batch."""
        specials = {"allowed_special": allowed_special, "disallowed_special": disallowed_special}
        return encode_batch(lambda s: self.encode(s, **specials), suffixes, num_threads)

    def encode_to_numpy(
        self,
        suffix: str,
        *,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> Any:
        """``encoding.encode_to_numpy(prefix + suffix, ...)``: a uint32 ``numpy.ndarray``.

        Raises tiktoken's errors: also its UnicodeEncodeError for surrogates (this one call of
        tiktoken does not replace them)."""
        if self._raw_prefix or has_surrogates(suffix):
            return self._enc.encode_to_numpy(
                self._prefix + suffix,
                allowed_special=allowed_special,  # type: ignore[arg-type]
                disallowed_special=disallowed_special,
            )
        split, tail = self._encode_plan(suffix, allowed_special, disallowed_special)
        ordinary = split is self._splits.get(ORDINARY.allowed)  # its head's array is kept
        return to_numpy(
            (self._head_array if ordinary else array("I", split.head)) + array("I", tail)
        )

    def decode(self, tokens: Sequence[int], errors: str = "replace") -> str:
        """``encoding.decode(tokens, errors)``."""
        return self._enc.decode(tokens, errors=errors)

    def __repr__(self) -> str:
        shown = self._prefix if len(self._prefix) <= 40 else self._prefix[:37] + "..."
        return f"FixedPrefixTokenCache({self._enc.name!r}, {shown!r})"


# cut_rule(enc), made once per encoding (at most 16 held): every map or daemon hit makes a cache.
_default_rule = functools.lru_cache(maxsize=16)(cut_rule)

_UNSEEN = object()


def _memo_key(arg: object) -> object:
    """A key for the policy memo, or None where there is none (then nothing is memoised).

    The type is part of the key: tiktoken takes a set for ``allowed_special`` and refuses a list
    of the same strings. Only collections are read: a generator must reach tiktoken unconsumed.
    """
    if isinstance(arg, str):
        return arg
    if type(arg) in (set, frozenset, tuple, list):
        try:
            return type(arg), frozenset(arg)  # type: ignore[call-overload]
        except TypeError:  # unhashable items
            return None
    return None
