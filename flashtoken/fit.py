"""Context-window budgeting: does a text fit in N tokens, and where to cut it.

"Does it fit" needs no ids, and often no encode: a token is at least one byte of text and at most
the encoding's longest token, so a text of ``c`` characters has between ``c // longest`` and
``4 * c`` tokens; only a count between those bounds encodes (the backend's count, where it has
one, builds no list). "Where do I cut" gives the first ids of the text, at most N, ending at a
character boundary, and the character offset they spell up to.

The caches offer the same on ``prefix + suffix`` (``FixedPrefixTokenCache.fits_ordinary`` and
``truncate_ordinary``): a cut inside the cached prefix encodes nothing at all.

>>> fits_ordinary("cl100k_base", "hello world", 2), fits_ordinary("cl100k_base", "hello world", 1)
(True, False)
>>> truncate_ordinary("cl100k_base", "hello world, and more", 2)
Cut(tokens=[15339, 1917], offset=11)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import tiktoken

from flashtoken import tiktoken_parts, unicode
from flashtoken.backends import Encoder, get_encoder

__all__ = ["Cut", "count_ordinary", "cut_tokens", "fits_ordinary", "truncate_ordinary", "within"]


class Cut(NamedTuple):
    """The first ``len(tokens)`` ids of a text, which spell exactly ``text[:offset]``.

    ``tokens`` is ``encoding.encode_ordinary(text)[:n]`` for the largest ``n`` up to the limit
    whose ids end at a character boundary (an id may end inside a character's UTF-8 bytes); all
    of the text's ids, and ``offset == len(text)``, when it fits.
    """

    tokens: list[int]
    offset: int


def count_ordinary(
    encoding: str | tiktoken.Encoding, text: str, *, backend: str | Encoder = "tiktoken"
) -> int:
    """``len(encoding.encode_ordinary(text))``; a backend with a count builds no list."""
    return get_encoder(encoding, backend).count_ordinary(text)


def fits_ordinary(
    encoding: str | tiktoken.Encoding,
    text: str,
    max_tokens: int,
    *,
    backend: str | Encoder = "tiktoken",
) -> bool:
    """``len(encoding.encode_ordinary(text)) <= max_tokens``, encoding only where the bounds
    do not decide. Raises ValueError for a negative ``max_tokens``."""
    encoder = get_encoder(encoding, backend)
    return within(encoder.encoding, encoder.count_ordinary, 0, text, max_tokens)


def truncate_ordinary(
    encoding: str | tiktoken.Encoding,
    text: str,
    max_tokens: int,
    *,
    backend: str | Encoder = "tiktoken",
) -> Cut:
    """The first ids of ``text``, at most ``max_tokens``, and the offset they spell up to.

    Raises ValueError for a negative ``max_tokens``.
    """
    encoder = get_encoder(encoding, backend)
    check_limit(max_tokens)
    return cut_tokens(encoder.encoding, text, encoder.encode_ordinary(text), max_tokens)


def within(
    enc: tiktoken.Encoding,
    count: Callable[[str], int],
    known: int,
    text: str,
    max_tokens: int,
) -> bool:
    """``known + count(text) <= max_tokens``, without calling ``count`` where bounds decide.

    Bounds: each token of ``encode_ordinary`` spells one byte or more and at most the
    encoding's longest token; a character is 1-4 bytes (a lone surrogate becomes U+FFFD, 3).
    """
    check_limit(max_tokens)
    if known > max_tokens:
        return False
    if known + 4 * len(text) <= max_tokens:
        return True
    if known + len(text) // _longest_token(enc) > max_tokens:
        return False
    return known + count(text) <= max_tokens


def cut_tokens(enc: tiktoken.Encoding, text: str, tokens: Sequence[int], max_tokens: int) -> Cut:
    """:class:`Cut` of ``text`` from ``tokens``, all of ``text``'s ids (or any ids that spell
    ``text`` exactly and are the first of a longer text's: a cached prefix's head)."""
    if len(tokens) <= max_tokens:
        return Cut(list(tokens), len(text))
    raw = text
    if unicode.has_surrogates(text):
        text = unicode.repair_surrogates(text)  # what tiktoken encoded
    data = text.encode("utf-8")
    n = max_tokens
    end = len(enc.decode_bytes(tokens[:n]))
    # A token may end inside a character: drop tokens until the bytes end at a character.
    while n and data[end] & 0xC0 == 0x80:
        n -= 1
        end -= len(enc.decode_single_token_bytes(tokens[n]))
    chars = len(data[:end].decode("utf-8"))
    offset = unicode.raw_offset(raw, chars) if raw is not text else chars
    return Cut(list(tokens[:n]), offset)


def check_limit(max_tokens: int) -> None:
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise TypeError(f"max_tokens must be an int, not {type(max_tokens).__name__}")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be 0 or more, not {max_tokens}")


@functools.lru_cache(maxsize=16)
def _longest_token(enc: tiktoken.Encoding) -> int:
    """The most bytes one ordinary token spells (cl100k_base: 128)."""
    return max(map(len, tiktoken_parts.mergeable_ranks(enc)), default=1)
