"""The one check of a span of tokens the daemon served, for a declared prefix and a chain alike.

A span is used only if its tokens decode to exactly the bytes the client asked about, and none
is a special token the call's policy does not allow. The first makes a colliding, stale or
corrupted entry harmless (its tokens spell another text); the second matters because a special
token's id decodes to its text, so a span could spell the text with an id the policy forbids.
What the client cannot check, that the spelling is tiktoken's own tokenization, it takes on
trust from the daemon (which runs ``flashtoken.split_prefix``; only the socket owner reaches it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tiktoken

from flashtoken.prefix import token_list
from flashtoken.specials import SpecialPolicy, forbidden_ids

__all__ = ["SpanCheck"]


class SpanCheck:
    """``spelled(tokens, data, text, allowed)``: the tokens as a list if they are a valid span."""

    def __init__(self, enc: tiktoken.Encoding) -> None:
        self.enc = enc
        self._may_hold: dict[frozenset[str], Callable[[str], bool]] = {}

    def spelled(
        self, tokens: Any, data: bytes, text: str, allowed: frozenset[str]
    ) -> list[int] | None:
        """``tokens`` as a list of ints if they decode to ``data`` (whose text is ``text``) and
        hold no special token outside ``allowed``; else None."""
        try:
            found = token_list(tokens)  # shared int objects: ~8 bytes a token in the L1, not ~40
            # Raises KeyError for an id outside the vocabulary (or in one of its holes).
            if self.enc.decode_bytes(found) != data:
                return None
        except Exception:
            return None
        if self._may_hold_forbidden(allowed, text):
            if not forbidden_ids(self.enc, allowed).isdisjoint(found):
                return None
        return found

    def _may_hold_forbidden(self, allowed: frozenset[str], text: str) -> bool:
        """Whether ``text`` holds the text of a special token not allowed: only then could a
        span that spells it carry that token's id (a regex search, ~10x cheaper than looking
        for the ids in a long span). For OpenAI's encodings it looks for "<"-led names."""
        search = self._may_hold.get(allowed)
        if search is None:
            search = self._may_hold[allowed] = SpecialPolicy(
                frozenset(), frozenset(self.enc.special_tokens_set - allowed)
            ).finds_disallowed
        return search(text)
