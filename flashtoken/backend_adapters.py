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
from flashtoken.ids import token_list_from_bytes

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
    """gigatoken, built from this Encoding's own ranks and special tokens (no file is fetched)."""

    def __init__(self, enc: tiktoken.Encoding) -> None:
        tok = gigatoken_tokenizer(enc)
        # The raw encode (a numpy array) recognises every special token: so only texts that
        # hold no special token outside ``allowed`` are its to take.
        self._raw = tok.backend.encode
        self._specials = frozenset(tiktoken_parts.special_tokens(enc))
        # Most texts hold no special token's text, and cheap tests tell: each character of the
        # tokens' common prefix ("<|" for OpenAI's) on its own (~1 us on 32 KiB), then the
        # prefix (a two-character search is ~30 us on 32 KiB stored 4 bytes a character), and
        # only then the regex search (~50-100 us, a character at a time).
        common = os.path.commonprefix(sorted(self._specials)) if self._specials else ""
        self._chars = tuple(dict.fromkeys(common))
        self._starts = (common,) if common else tuple({s[0] for s in self._specials})
        self._patterns: dict[frozenset[str], re.Pattern[str]] = {}

    def _takes(self, text: str, allowed: frozenset[str]) -> bool:
        if not all(ch in text for ch in self._chars):
            return True
        if not any(start in text for start in self._starts):
            return True
        pattern = self._patterns.get(allowed)
        if pattern is None:
            others = sorted(self._specials - allowed, key=len, reverse=True)
            pattern = re.compile("|".join(map(re.escape, others)) or "(?!)")
            if len(self._patterns) < 64:
                self._patterns[allowed] = pattern
        return pattern.search(text) is None

    def ordinary(self, text: str) -> list[int] | None:
        return token_list_from_bytes(self._raw(text)) if self._takes(text, frozenset()) else None

    def special(self, text: str, allowed: frozenset[str]) -> list[int] | None:
        return token_list_from_bytes(self._raw(text)) if self._takes(text, allowed) else None

    def count_ordinary(self, text: str) -> int | None:
        return len(self._raw(text)) if self._takes(text, frozenset()) else None


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
    point is thrown away (those texts are rare: the work lost is rare)."""

    def __init__(self, inner: Any, avoid: str) -> None:
        self.inner = inner
        self.avoided = len(avoid)
        bmp = tuple(c for c in avoid if c <= "\uffff")
        narrow = all(c > "\u00ff" for c in bmp)  # none can be in a text stored 1 byte a char
        astral = frozenset(c for c in avoid if c > "\uffff")
        utf8 = frozenset(c.encode("utf-8") for c in avoid)
        leads = tuple(sorted({(seq[:1], len(seq)) for seq in utf8}))  # (lead byte, length)
        astral_chars = re.compile("[\U00010000-\U0010ffff]").findall

        def every_character(text: str) -> bool:
            return any(c in text for c in bmp) or not astral.isdisjoint(astral_chars(text))

        # Measured on 32 KiB of non-ASCII text: a `c in text` costs ~1 us, a regex class search
        # ~50-190 us whatever the class (a character at a time), close to toktok's whole encode
        # at worst. So: a text stored 1 or 2 bytes a character (no astral code point) is
        # searched for the few BMP ones, one by one; a text stored 4 bytes a character (emoji,
        # say) at each UTF-8 lead byte of an avoided code point (~3 us on 32 KiB with a few
        # emoji: E0, EA and F0 for cl100k_base). A text with more such lead bytes than one per
        # 128 characters (Indic, emoji-heavy) is searched character by character (~60 us).
        # Rejected: one class of every avoided range (~1 ms: `re` tests astral ranges one by
        # one); checking before the encode (the UTF-8 conversion was then paid twice).
        def holds_avoided(text: str) -> bool:
            if text.isascii():
                return False
            if not _may_hold_astral(text):
                return not (narrow and _one_byte_a_char(text)) and any(c in text for c in bmp)
            data = text.encode("utf-8", "surrogatepass")
            # A lead byte costs ~0.25 us to look at, a character ~2 ns to collect (findall).
            most = max(64, len(text) >> 7)
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

        self._holds_avoided = holds_avoided

    def ordinary(self, text: str) -> list[int] | None:
        out = self.inner.ordinary(text)
        return None if out is None or self._holds_avoided(text) else out

    def special(self, text: str, allowed: frozenset[str]) -> list[int] | None:
        out = self.inner.special(text, allowed)
        return None if out is None or self._holds_avoided(text) else out

    def count_ordinary(self, text: str) -> int | None:
        out = self.inner.count_ordinary(text)
        return None if out is None or self._holds_avoided(text) else out


def _one_byte_a_char(text: str) -> bool:
    """True only if CPython stores ``text`` 1 byte a character (no code point above U+00FF):
    a header of ~73 bytes plus n, where 2 bytes a character take 2n + 74."""
    return _ONE_BYTE_TELLS and sys.getsizeof(text) < 2 * len(text) + 70


def _may_hold_astral(text: str) -> bool:
    """False only if ``text`` has no character above U+FFFF, known without reading it.

    CPython stores a string in 1, 2 or 4 bytes a character, the widest its characters need, and
    ``sys.getsizeof`` shows which (a header of under 100 bytes plus the characters). Elsewhere
    (``_SIZE_TELLS`` false) every non-ASCII text is searched."""
    n = len(text)
    return not _SIZE_TELLS or n < 64 or sys.getsizeof(text) > 3 * n + 100


_SIZE_TELLS = (
    sys.getsizeof("\U0001f44d" * 100) > 400
    and sys.getsizeof("\u4e2d\U0001f44d" * 50) > 400
    and sys.getsizeof("\u4e2d" * 100) < 300
)
_ONE_BYTE_TELLS = (
    sys.getsizeof("\u00e9" * 100) < 250 < sys.getsizeof("\u4e2d" * 100)
    and sys.getsizeof("\u00e9" * 4) < 2 * 4 + 70
)
