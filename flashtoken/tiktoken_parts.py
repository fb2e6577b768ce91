"""The parts of a ``tiktoken.Encoding`` that tiktoken keeps private, read in this one place.

FlashToken needs what tiktoken does not expose publicly: the split pattern (stable cuts,
flashtoken/boundary.py), the special tokens with their ids and the mergeable ranks (the
encoding's identity, token lengths, the fast backends' vocabularies). ``_pat_str``,
``_special_tokens`` and ``_mergeable_ranks`` have been stable since tiktoken 0.1; should a
release rename one, this module is the one place to change, and until then every reader fails
with the same message saying what to do (rather than an AttributeError deep in a cut).
The values are tiktoken's own objects, not copies: never modify them.

>>> import flashtoken
>>> enc = flashtoken.get_encoding("cl100k_base")
>>> special_tokens(enc)["<|endoftext|>"], len(mergeable_ranks(enc))
(100257, 100256)
"""

from __future__ import annotations

from typing import Any

import tiktoken

__all__ = ["mergeable_ranks", "pattern", "special_tokens"]


def pattern(enc: tiktoken.Encoding) -> str:
    """The regex that splits text into pieces before BPE (``Encoding._pat_str``)."""
    return _read(enc, "_pat_str")


def special_tokens(enc: tiktoken.Encoding) -> dict[str, int]:
    """Each special token's text and id (``Encoding._special_tokens``)."""
    return _read(enc, "_special_tokens")


def mergeable_ranks(enc: tiktoken.Encoding) -> dict[bytes, int]:
    """Each ordinary token's bytes and rank, which is its id (``Encoding._mergeable_ranks``)."""
    return _read(enc, "_mergeable_ranks")


def _read(enc: tiktoken.Encoding, name: str) -> Any:
    try:
        return getattr(enc, name)
    except AttributeError:
        raise TypeError(
            f"{enc!r} has no {name}: flashtoken reads it from tiktoken.Encoding (tiktoken"
            f" {getattr(tiktoken, '__version__', '?')}); pass a tiktoken.Encoding, or install a"
            " tiktoken release that has it (0.7 or later)"
        ) from None
