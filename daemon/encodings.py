"""The encodings a daemon has loaded, and the check that a request's encoding is the same one.

A client names its encoding and sends its identity (``flashtoken.encodings.encoding_id``): a
client with another tiktoken version or a custom ``Encoding`` of the same name must never be
served this daemon's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tiktoken

from flashtoken.backends import Encoder, get_encoder
from flashtoken.blocks import token_byte_lengths
from flashtoken.boundary import CutRule, cut_rule
from flashtoken.encodings import encoding_id, get_encoding
from flashtoken.errors import ProtocolError
from flashtoken.wire import tokens_from_frame


@dataclass(frozen=True)
class Loaded:
    enc: tiktoken.Encoding
    eid: bytes
    specials: frozenset
    rule: CutRule  # stable cuts, as flashtoken.AutoPrefixCache finds them
    lengths: list  # token_byte_lengths(enc)
    # Encodes the fills (the daemon's --backend): tiktoken's own methods by default.
    encoder: Encoder


def load(name: str, backend: str = "tiktoken") -> Loaded:
    """``name`` loaded, with ``backend`` gated for it now (at start-up, not in a fill)."""
    enc = get_encoding(name)
    return Loaded(
        enc,
        encoding_id(enc),
        frozenset(enc.special_tokens_set),
        cut_rule(enc),
        token_byte_lengths(enc),
        get_encoder(enc, backend),
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


class Encodings:
    """The encodings this daemon has loaded (by name), and the names tiktoken knows.

    Written on the loop only (a fill loads on the pool and hands its ``Loaded`` back); read on
    the pool too (a dict read is atomic)."""

    def __init__(self, backend: str = "tiktoken") -> None:
        self.backend = backend  # the daemon's --backend: what encodes the fills
        self.loaded: dict[str, Loaded] = {}
        self.known: frozenset[str] = frozenset()

    def get(self, name: str) -> Loaded | None:
        return self.loaded.get(name)

    def get_or_load(self, name: str) -> Loaded:
        """On a pool thread only: loading may wait on tiktoken's registry lock (a download)."""
        return self.loaded.get(name) or load(name, self.backend)

    def keep(self, name: str, loaded: Loaded) -> None:
        """A fill loaded it: the loop keeps it (the first one, if two fills raced)."""
        self.loaded.setdefault(name, loaded)

    def decoder(self, name: str) -> Any:
        """A token frame of encoding ``name`` (one stored here) to the bytes it spells."""
        enc = self.loaded[name].enc
        return lambda frame: enc.decode_bytes(tokens_from_frame(frame))

    def check(self, request: Any) -> None:
        """A request's encoding must be one tiktoken knows and, once loaded here, the very
        same as the client's (its identity) with the allowed specials among its own.

        Raises ProtocolError (a CLIENT_ERROR reply)."""
        loaded = self.loaded.get(request.enc)
        if loaded is None:
            if request.enc not in self.known:
                raise ProtocolError(
                    f"unknown encoding {request.enc!r}; this daemon knows"
                    f" {', '.join(sorted(self.known))}"
                )
        else:
            check_loaded(loaded, request)
