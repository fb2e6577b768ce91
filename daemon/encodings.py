"""The encodings a daemon has loaded, and the check that a request's encoding is the same one.

A client names its encoding and sends its identity (``flashtoken.encodings.encoding_id``): a
client with another tiktoken version or a custom ``Encoding`` of the same name must never be
served this daemon's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tiktoken

from flashtoken.blocks import token_byte_lengths
from flashtoken.boundary import CutRule, cut_rule
from flashtoken.encodings import encoding_id, get_encoding
from flashtoken.errors import ProtocolError


@dataclass(frozen=True)
class Loaded:
    enc: tiktoken.Encoding
    eid: bytes
    specials: frozenset
    rule: CutRule  # stable cuts, as flashtoken.AutoPrefixCache finds them
    lengths: list  # token_byte_lengths(enc)


def load(name: str) -> Loaded:
    enc = get_encoding(name)
    return Loaded(
        enc,
        encoding_id(enc),
        frozenset(enc.special_tokens_set),
        cut_rule(enc),
        token_byte_lengths(enc),
    )


def check_loaded(loaded: Loaded, request: Any) -> None:
    """A request's encoding must be this very one, its allowed specials among its own."""
    if request.eid != loaded.eid:
        raise ProtocolError(
            f"the daemon's {request.enc} is not the client's (another tiktoken version or a custom"
            " Encoding): not served"
        )
    if not loaded.specials.issuperset(request.allowed):
        raise ProtocolError(f"'allowed' names strings that are no special token of {request.enc}")
