"""Stable cuts: how much of a text's encoding no continuation of the text can change.

tiktoken encodes ``text`` by splitting it into regex pieces (with its private pattern, read by
``tiktoken_parts.pattern``) and running BPE inside each piece. Appending to ``text`` can only
change its last few pieces: at most 1 for cl100k_base, at most 2 for r50k/p50k and o200k
(docs/ALGORITHM.md proves it and gives examples).
So the tokens of ``text`` before the start of its K-th last piece are final: a *stable cut*.

Everything here works on a window ``text[start:end]`` whose ``start`` is known to be a piece
boundary tiktoken's scan passes through (the start of the text, the end of an allowed special
token, an earlier stable cut). The cut is found in ``text[start:end]`` as if the text ended at
``end``; that is always safe, because the real text is one of the continuations the cut is stable
under. Callers use ``end`` to stop before anything the scan cannot be sure of: the first code point
whose Unicode class tiktoken may see differently, a trailing high surrogate, the possible start of
a special token that the continuation could complete.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import regex
import tiktoken

from flashtoken import models, tiktoken_parts, unicode
from flashtoken.specials import SpecialPolicy

# The patterns whose behaviour under appending is proven in docs/ALGORITHM.md, with the number
# of trailing pieces an append can change. Keyed by the exact pattern text: a pattern that
# differs in a single character is an unknown pattern, and is not cached at all.
_R50K = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
PROVEN_PIECES = {
    _R50K: 2,
    _CL100K: 1,
    _O200K: 2,  # also Llama 4's pattern, character for character
    # The open models' patterns (flashtoken/models.py; docs/ALGORITHM.md, "The open models").
    models.LLAMA3_PATTERN: 2,
    models.TEKKEN_PATTERN: 2,
    models.KIMI_PATTERN: 2,
}

DEFAULT_BACKTRACK_PIECES = 3
"""Pieces re-encoded by default: one more than any proof needs, as a margin."""


class UncachedEncodingWarning(UserWarning):
    """An encoding FlashToken cannot cache exactly: every call encodes the whole text."""


@dataclass(frozen=True)
class CutRule:
    """How to find stable cuts for one tiktoken pattern.

    ``pieces`` is how many trailing pieces to leave unstable. ``proven`` says whether a proof
    covers the pattern; if not, no cut is ever made after a known boundary (the start of the text
    or the end of an allowed special token), so every path encodes the whole text with tiktoken.
    """

    pattern: regex.Pattern[str] | None  # None when not proven: never scanned
    pieces: int

    @property
    def proven(self) -> bool:
        return self.pattern is not None

    def cut(self, text: str, start: int, end: int) -> int:
        """The start of the K-th last piece of ``text[start:end]`` (``start`` if there are fewer).

        ``end`` is pulled back to the first code point of uncertain class: the cut of the shorter
        text is stable under every continuation, the real one included. The scan starts at the
        last *anchor* that leaves K pieces to scan, not at ``start``.
        """
        if self.pattern is None:
            # A probe self-check (K = 8, a dozen continuations tried against tiktoken) was
            # rejected: it is a net, not a proof, and a look-ahead reaching to the end of the
            # text slipped through it for 5% of short texts. Slow and exact instead.
            return start
        before = end
        while True:
            origin = _last_anchor(text, start, before)
            stop = unicode.first_uncertain(text, origin, end)
            # The proven patterns match every character (each has a catch-all alternative), so
            # the pieces tile the window and the last ones' lengths give the cut; findall builds
            # them in C, several times faster than a Match object per piece.
            pieces = self.pattern.findall(text, origin, stop)
            if len(pieces) >= self.pieces:
                return stop - sum(map(len, pieces[-self.pieces :]))
            if origin == start:
                return start
            before = origin - 1


# Offsets where every proven pattern has a piece boundary that the text before them decides:
# after a newline that a letter follows, and at a space between two letters. Searched from the
# end ((?r)): the last one is usually a few characters back.
_ANCHOR = regex.compile(r"(?r)(?<=\n)(?=[A-Za-z])|(?<=[A-Za-z])(?= [A-Za-z])")


def _last_anchor(text: str, start: int, end: int) -> int:
    """The last *anchor* ``p`` in ``(start, end)``, or ``start``.

    An anchor is an offset where ``text[p-1]`` is a newline and ``text[p]`` an ASCII letter, or
    ``text[p]`` is a space between two ASCII letters. Every proven pattern has a piece boundary
    there and decides its pieces before ``p`` from ``text[:p+1]`` alone: no alternative holds a
    newline followed by a letter, or a letter followed by a space, and every run they read stops
    at such a place (docs/ALGORITHM.md, "Anchors"). So a scan may start at ``p`` as if the text
    started there, whatever comes before it, even a code point of uncertain class.
    """
    if end - 1 <= start:
        return start
    found = _ANCHOR.search(text, start + 1, end)
    return found.start() if found else start


def cut_rule(enc: tiktoken.Encoding, backtrack_pieces: int | None = None) -> CutRule:
    """The rule for ``enc``'s pattern, re-encoding ``backtrack_pieces`` pieces (default: 3).

    A value below what the pattern is proven to need is raised to it, never used: "re-encode
    fewer pieces" can only mean "as few as stays exact". Raises ValueError below 1. A pattern no
    proof covers gets a rule that never cuts, and one :class:`UncachedEncodingWarning` per
    encoding and process.
    """
    proven = PROVEN_PIECES.get(tiktoken_parts.pattern(enc))
    if backtrack_pieces is None:
        backtrack_pieces = DEFAULT_BACKTRACK_PIECES
    if not isinstance(backtrack_pieces, int) or isinstance(backtrack_pieces, bool):
        raise TypeError(f"backtrack_pieces must be an int, not {type(backtrack_pieces).__name__}")
    if backtrack_pieces < 1:
        raise ValueError(f"backtrack_pieces must be 1 or more (or None), not {backtrack_pieces}")
    if proven is None:
        _warn_uncached(enc.name, tiktoken_parts.pattern(enc))
        # Not even compiled: Python's regex may read an unproven pattern otherwise than Rust's
        # (class intersections), and no scan of it is ever needed.
        return CutRule(None, backtrack_pieces)
    return CutRule(_compile(tiktoken_parts.pattern(enc)), max(backtrack_pieces, proven))


_uncached: dict[str, str] = {}  # encoding name -> its unproven pattern, as warned


def uncached_encodings() -> list[str]:
    """The encodings this process could not cache (no proof covers their pattern), for stats."""
    return sorted(_uncached)


def _warn_uncached(name: str, pat_str: str) -> None:
    if _uncached.get(name) == pat_str:
        return
    _uncached[name] = pat_str
    warnings.warn(
        f"FlashToken has no proof that cuts are stable for encoding {name!r}: its regex pattern "
        "is none of the proven ones (r50k, p50k, cl100k, o200k and the model patterns of "
        "docs/ALGORITHM.md). Every call encodes the whole text with tiktoken: exact, but "
        "nothing is cached for this encoding.",
        UncachedEncodingWarning,
        stacklevel=3,
    )


# Inside a character class: a set operator Rust's regex has but regex reads otherwise ("||" is
# a union in regex's V1 and two "|" in Rust), and a POSIX class (ASCII in Rust, Unicode in regex).
_DIVERGENT_IN_CLASS = regex.compile(r"\|\||\[:\^?[a-z]+:\]")


@functools.lru_cache(maxsize=32)
def _compile(pat_str: str) -> regex.Pattern[str]:
    """``pat_str`` compiled so that ``regex`` splits text exactly as tiktoken's Rust regex does.

    - ``$``: Python's also matches before a final newline, Rust's only at the very end: ``\\Z``.
    - Classes: Rust's nest and take ``&&``, ``--`` and ``~~`` as set operations (Kimi's
      ``[\\p{Lu}&&[^\\p{Han}]]``); ``regex`` reads them so only in its V1 mode (V0 reads the
      ``&&`` as two ampersands and closes the class at the first ``]``).
    - V1 turns on *full* case folding under ``(?i)`` (``ss`` matches ``ß``); Rust folds simply,
      so ``-f`` turns it off again.

    Raises ValueError for a construct that means something else in the two engines (see
    ``_DIVERGENT_IN_CLASS``): no cut found with it could be trusted. tests/test_model_patterns.py
    compares the pieces with tiktoken's own, observed through tiktoken itself.
    """
    for cls in _classes(pat_str):
        bad = _DIVERGENT_IN_CLASS.search(cls)
        if bad:
            raise ValueError(
                f"the pattern's class {cls!r} holds {bad.group()!r}, which Rust's regex (tiktoken)"
                " and Python's regex read differently; escape it to mean the characters"
            )
    return regex.compile("(?V1-f)" + regex.sub(r"(?<!\\)\$", r"\\Z", pat_str))


def _classes(pat_str: str) -> list[str]:
    """The text of each outermost character class of ``pat_str``, escapes kept."""
    found, depth, start, i = [], 0, 0, 0
    while i < len(pat_str):
        char = pat_str[i]
        if char == "\\":
            i += 2
            continue
        if char == "[":
            if depth == 0:
                start = i
            depth += 1
            if pat_str.startswith("^", i + 1):
                i += 1
            if pat_str.startswith("]", i + 1):  # a leading "]" is a literal in both engines
                i += 1
        elif char == "]" and depth:
            depth -= 1
            if depth == 0:
                found.append(pat_str[start : i + 1])
        i += 1
    return found


def find_cut(
    enc: tiktoken.Encoding,
    rule: CutRule,
    policy: SpecialPolicy,
    text: str,
    start: int,
    tokens: Sequence[int],
    end: int | None = None,
) -> tuple[int, int]:
    """The stable cut of ``text[:end]`` at or after the known boundary ``start``.

    ``tokens`` are the tokens tiktoken gives ``text[start:]`` within the whole text (all of them
    when ``start == 0``). Returns ``(cut, n)``: an offset into ``text`` (never inside a surrogate
    pair) and how many of ``tokens`` lie before it. ``(start, 0)`` when nothing can be kept.
    """
    cut = stable_offset(rule, policy, text, start, len(text) if end is None else end)
    kept = _tokens_before(enc, tokens, text[cut:])
    if kept is None:  # the cut is no token boundary: only a wrong split can do that; keep nothing
        return start, 0
    return cut, kept


def stable_offset(rule: CutRule, policy: SpecialPolicy, text: str, start: int, end: int) -> int:
    """The stable cut of ``text[:end]`` at or after the known boundary ``start``, as an offset.

    Stable under every continuation of ``text[:end]``: the real text after ``end`` is one.
    """
    if end > start and unicode.is_high_surrogate(text[end - 1]):
        end -= 1  # the continuation may complete it into a pair, one character
    window = text[start:end]
    raw = unicode.has_surrogates(window)
    if raw:
        window = unicode.repair_surrogates(window)
    # An allowed special token is a hard boundary: tiktoken scans the text after it afresh.
    boundary = policy.last_allowed_end(window)
    cut = rule.cut(window, boundary, policy.completable_from(window, boundary))
    if raw:
        cut = unicode.raw_offset(text[start:end], cut)
    return start + cut


def _tokens_before(enc: tiktoken.Encoding, tokens: Sequence[int], rest: str) -> int | None:
    """How many of ``tokens`` come before the ones that spell ``rest``; None if none do exactly.

    Walks back from the end, so it costs the length of ``rest``, not of the text.
    """
    if unicode.has_surrogates(rest):
        rest = unicode.repair_surrogates(rest)
    need = len(rest.encode("utf-8"))
    n = len(tokens)
    while need > 0 and n > 0:
        n -= 1
        need -= len(enc.decode_single_token_bytes(tokens[n]))
    return n if need == 0 else None
