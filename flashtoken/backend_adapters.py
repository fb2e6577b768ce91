"""The fast backends' adapters: each backend's answer for a text, or None where it refuses it.

One class per backend, with the three calls flashtoken/backends.py makes: ``ordinary(text)``,
``special(text, allowed)`` and ``count_ordinary(text)``. An adapter returns ids (or a count), or
None where the text is not its to take; it may also raise, which is a refusal too. Which backend
is trusted, and what happens on a refusal, is backends.py's business, not theirs.
"""

from __future__ import annotations

import base64
import os
import re
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import tiktoken

from flashtoken import tiktoken_parts
from flashtoken.ids import MAX_TOKEN_ID, token_list_from_array

__all__ = ["Avoiding", "Gigatoken", "TokTok", "Unsupported", "gigatoken_tokenizer"]


class Unsupported(Exception):
    """The backend has no tokenizer for this encoding."""


class TokTok:
    """toktok-rs: the vocabularies are compiled in; checked here to be tiktoken's, rank by rank."""

    def __init__(self, enc: tiktoken.Encoding) -> None:
        import toktok

        try:
            tok = toktok._encoding(enc.name)  # the full surface; the public one only counts
        except KeyError as exc:
            raise Unsupported(f"toktok has no encoding {enc.name!r}") from exc
        decode = tok.decode_single_token_bytes
        if dict(tok.special_tokens()) != tiktoken_parts.special_tokens(enc) or any(
            decode(rank) != token for token, rank in tiktoken_parts.mergeable_ranks(enc).items()
        ):
            raise Unsupported(f"toktok's {enc.name} vocabulary is not this Encoding's")
        self.ordinary: Callable[[str], list[int] | None] = tok.encode_ordinary
        self.count_ordinary: Callable[[str], int | None] = tok.count
        self._encode = tok.encode

    def special(self, text: str, allowed: frozenset[str]) -> list[int] | None:
        return self._encode(text, allowed_special=allowed, disallowed_special=())


_GIGA_PRETOKENIZERS = {
    "cl100k_base": "gpt4",
    "o200k_base": "o200k",
    "o200k_harmony": "o200k",
    "r50k_base": "gpt2",
}


def gigatoken_tokenizer(enc: tiktoken.Encoding, pretokenizer: str | None = None) -> Any:
    """A ``gigatoken.Tokenizer`` of ``enc``'s own ranks and special tokens, built offline.

    gigatoken reads a .tiktoken file; writing the ranks tiktoken itself loaded (from bpe-openai's
    shipped file or tiktoken's cache) to a temporary one gives it exactly those, with no download.
    Raises ImportError without gigatoken, Unsupported for an encoding it has no pattern for.
    """
    import gigatoken

    pretokenizer = pretokenizer or _GIGA_PRETOKENIZERS.get(enc.name)
    if pretokenizer is None:
        raise Unsupported(f"gigatoken has no split pattern for {enc.name!r}")
    fd, path = tempfile.mkstemp(suffix=".tiktoken")
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines(
                base64.b64encode(token) + b" %d\n" % rank
                for token, rank in sorted(
                    tiktoken_parts.mergeable_ranks(enc).items(), key=lambda x: x[1]
                )
            )
        return gigatoken.Tokenizer.from_tiktoken(
            path, pretokenizer=pretokenizer, special_tokens=dict(tiktoken_parts.special_tokens(enc))
        )
    finally:
        os.unlink(path)


class Gigatoken:
    """gigatoken, built from this Encoding's own ranks and special tokens (no file is fetched).

    Its raw encode (a numpy array) recognises every special token. So an answer is kept only if
    it holds no special token's id outside ``allowed``: every OpenAI encoding numbers its special
    tokens above its ranks, so one comparison with the array's maximum (which the conversion to
    a list computes anyway) tells that the answer holds none at all, and the text then held no
    special token gigatoken saw, which makes its answer the ordinary encoding (gated). Rejected:
    searching the text for special-token text before encoding (``"<|"``, then a regex of the
    tokens): ~30 µs on 32 KiB stored 2 bytes a character wherever ``<`` and ``|`` both occur,
    a fifth of the encode, where the maximum costs ~2 µs.
    """

    def __init__(self, enc: tiktoken.Encoding) -> None:
        specials = tiktoken_parts.special_tokens(enc)
        ranks = tiktoken_parts.mergeable_ranks(enc)
        self._floor = min(specials.values(), default=MAX_TOKEN_ID)
        if ranks and max(ranks.values()) >= self._floor:
            raise Unsupported(f"{enc.name} numbers a special token among its ranks")
        tok = gigatoken_tokenizer(enc)
        self._raw = tok.backend.encode
        self._specials = specials
        self._every = frozenset(specials)
        self._allowed_ids: dict[frozenset[str], frozenset[int]] = {}

    def _allowed(self, allowed: frozenset[str]) -> frozenset[int]:
        """The ids an answer may hold under ``allowed``: those of allowed tokens that no other
        token shares (two o200k_harmony tokens share 200018: that id cannot tell which)."""
        ids = self._allowed_ids.get(allowed)
        if ids is None:
            others = {i for s, i in self._specials.items() if s not in allowed}
            ids = frozenset(i for s, i in self._specials.items() if s in allowed) - others
            if len(self._allowed_ids) < 64:
                self._allowed_ids[allowed] = ids
        return ids

    def ordinary(self, text: str) -> list[int] | None:
        ids = self._raw(text)
        top = int(ids.max(initial=0))
        return None if top >= self._floor else token_list_from_array(ids, top)

    def special(self, text: str, allowed: frozenset[str]) -> list[int] | None:
        ids = self._raw(text)
        top = int(ids.max(initial=0))
        if top >= self._floor and allowed != self._every:
            found = set(ids[ids >= self._floor].tolist())
            if not found <= self._allowed(allowed):
                return None
        return token_list_from_array(ids, top)

    def count_ordinary(self, text: str) -> int | None:
        ids = self._raw(text)
        return None if int(ids.max(initial=0)) >= self._floor else len(ids)


class Avoiding:
    """A backend, minus the texts holding a code point it classifies otherwise than tiktoken.

    toktok-rs 0.3 and gigatoken 0.10 carry Unicode 17 tables where tiktoken 0.14 has Unicode 16:
    on some 4,700 code points assigned since (U+A7CE, U+16EA0, U+323B0, ...) their regex splits
    otherwise (``"\U000323b0:A"``: tiktoken ``[.., 25, 32]``, both backends ``[.., 56748]``). The
    gate finds those code points (backend_gate.disagreeing_code_points) and such texts go to
    tiktoken. ASCII text skips the search.

    The backend encodes first and the text is searched after: the backend reads the text as
    UTF-8, which CPython then keeps with the string, so ``text.encode()`` here is a copy, not a
    second conversion, and the astral code points are found by their UTF-8 lead byte (a memchr
    each) instead of a regex over every character. An answer for a text holding an avoided code
    point is thrown away (those texts are rare: the work lost is rare). The text's size is taken
    *before* the encode: that cached UTF-8 counts in ``sys.getsizeof`` and would hide how many
    bytes a character the string is stored in (:func:`_width_test`)."""

    def __init__(self, inner: Any, avoid: str) -> None:
        self.inner = inner
        self.avoided = len(avoid)
        holds = _avoided_test(avoid)
        getsizeof = sys.getsizeof
        # Closures, not methods: a 100-character text takes toktok about a microsecond, so each
        # lookup and call layer on this path is a visible share of it.
        inner_ordinary, inner_special, inner_count = (
            inner.ordinary,
            inner.special,
            inner.count_ordinary,
        )

        def ordinary(text: str) -> list[int] | None:
            if text.isascii():
                return inner_ordinary(text)
            size = getsizeof(text)
            out = inner_ordinary(text)
            return None if out is None or holds(text, size) else out

        def special(text: str, allowed: frozenset[str]) -> list[int] | None:
            if text.isascii():
                return inner_special(text, allowed)
            size = getsizeof(text)
            out = inner_special(text, allowed)
            return None if out is None or holds(text, size) else out

        def count_ordinary(text: str) -> int | None:
            if text.isascii():
                return inner_count(text)
            size = getsizeof(text)
            out = inner_count(text)
            return None if out is None or holds(text, size) else out

        self.ordinary: Callable[[str], list[int] | None] = ordinary
        self.special: Callable[[str, frozenset[str]], list[int] | None] = special
        self.count_ordinary: Callable[[str], int | None] = count_ordinary


def _avoided_test(avoid: str) -> Callable[[str, int], bool]:
    """``holds(text, size)``: whether the non-ASCII ``text`` holds a code point of ``avoid``,
    ``size`` being ``sys.getsizeof(text)`` taken before a backend read the text."""
    bmp = tuple(c for c in avoid if c <= "\uffff")
    narrow = all(c > "\u00ff" for c in bmp)  # none can be in a text stored 1 byte a char
    astral = frozenset(c for c in avoid if c > "\uffff")
    utf8 = frozenset(c.encode("utf-8") for c in avoid)
    leads = tuple(sorted({(seq[:1], len(seq)) for seq in utf8}))  # (lead byte, length)
    astral_chars = re.compile("[\U00010000-\U0010ffff]").findall
    # A string this size or larger may be 4 bytes a character, then 2 (see _width_test).
    four, two = _width_floors()

    def every_character(text: str) -> bool:
        for c in bmp:
            if c in text:
                return True
        return not astral.isdisjoint(astral_chars(text))

    # Measured on 32 KiB of non-ASCII text: a `c in text` costs ~0.1-1 us, a regex class search
    # ~50-190 us whatever the class (a character at a time), close to toktok's whole encode
    # at worst. So: a text stored 1 or 2 bytes a character (no astral code point) is
    # searched for the few BMP ones, one by one (none at all in 1 byte a character when they
    # all lie above U+00FF); a text stored 4 bytes a character (emoji, say) at each UTF-8 lead
    # byte of an avoided code point (~3 us on 32 KiB with a few emoji: E0, EA and F0 for
    # cl100k_base). A text with more such lead bytes than one per 128 characters (Indic,
    # emoji-heavy) is searched character by character (~60 us).
    # Rejected: one class of every avoided range (~1 ms: `re` tests astral ranges one by
    # one); checking before the encode (the UTF-8 conversion was then paid twice); finding
    # two-byte UTF-8 prefixes (F0 90, ...) with bytes.find (~100 us each on 128 KiB, where the
    # lead byte's memchr takes under 1 us).
    def holds(text: str, size: int) -> bool:
        n = len(text)
        if size < four + 4 * n:  # no code point above U+FFFF
            if narrow and size < two + 2 * n:  # none above U+00FF
                return False
            for c in bmp:
                if c in text:
                    return True
            return False
        data = text.encode("utf-8", "surrogatepass")
        # A lead byte costs ~0.25 us to look at, a character ~2 ns to collect (findall).
        most = max(64, n >> 7)
        for lead, length in leads:
            at, looked = data.find(lead), 0
            while at != -1:
                if data[at : at + length] in utf8:
                    return True
                looked += 1
                if looked > most:
                    return every_character(text)
                at = data.find(lead, at + length)
        return False

    return holds


def _width_floors() -> tuple[int, int]:
    """``(four, two)``: a string of ``n`` characters whose ``sys.getsizeof`` is below
    ``four + 4 * n`` is certainly stored 2 bytes a character or fewer (so holds no code point
    above U+FFFF), and below ``two + 2 * n`` 1 byte a character.

    CPython stores a string in 1, 2 or 4 bytes a character, the widest its characters need,
    after a fixed header; ``sys.getsizeof`` counts those bytes (and the terminating one), and
    also the string's UTF-8 copy once something has asked for it. So a string stored k bytes a
    character is never smaller than ``header + k * (n + 1)``, the headers measured here on
    strings of each width, and the copy can only make a narrow string look wider, never a
    wide one narrower: both tests err towards a search. Where sizes do not follow this layout
    (another interpreter) no size passes either test: every non-ASCII text is searched."""
    getsizeof = sys.getsizeof
    two = getsizeof("\u4e2d") - 2 * 2  # header of a string stored 2 bytes a character
    four = getsizeof("\U0001f44d") - 4 * 2
    tells = (
        getsizeof("\u4e2d" * 100) == two + 2 * 101
        and getsizeof("\U0001f44d" * 100) == four + 4 * 101
        and getsizeof("\u00e9" * 100) < two + 2 * 101
    )
    if not tells:
        return -(1 << 62), -(1 << 62)
    return four + 4, two + 2  # the terminating character's bytes
