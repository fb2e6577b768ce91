"""Requests, client to daemon: GET, AUTO, TELL, TOUCH (docs/PROTOCOL.md, "Requests").

Each is declared once (flashtoken/wire/schema.py): ``GetRequest(...).frames()`` packs it and
``parse_request`` checks a received one into the same class. STATS and PING are the admin
requests (flashtoken/wire/admin.py). Whether ``enc`` can be loaded and ``allowed`` are its
special tokens is the daemon's to check; the shape is checked here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flashtoken.errors import ProtocolError

from .codec import (
    ENCODING_ID_BYTES,
    KEY_BYTES,
    MAX_BLOCK_BYTES,
    MAX_NAME_CHARS,
    MAX_PREFIX_BYTES,
    MAX_PUBLISHED_BLOCKS,
    MAX_TOUCH_KEYS,
    MAX_WAIT_MS,
    MIN_BLOCK_BYTES,
    unpack_header,
)
from .schema import (
    ALLOWED,
    BOOL,
    REQUEST_ID,
    TEXT,
    Bin,
    Digests,
    Int,
    Limits,
    Message,
    Parent,
    Raw,
    Str,
    frame,
    header,
)

__all__ = [
    "OPS",
    "REQUESTS",
    "AutoRequest",
    "GetRequest",
    "PingRequest",
    "Request",
    "StatsRequest",
    "TellRequest",
    "TouchRequest",
    "check_parent",
    "parse_request",
]

_ENC = Str(MAX_NAME_CHARS)
_EID = Bin(ENCODING_ID_BYTES)
_KEY = Bin(KEY_BYTES)
_BLOCK = Int(MIN_BLOCK_BYTES, MAX_BLOCK_BYTES)
_KEYS = Raw(
    unit=KEY_BYTES, most=MAX_TOUCH_KEYS * KEY_BYTES, what=f"<= {MAX_TOUCH_KEYS} 16-byte keys"
)


@dataclass(frozen=True)
class Request(Message):
    """Every request carries its ``id``, echoed in its reply (0: "unknown", never a client's)."""

    id: int = header(REQUEST_ID)

    @property
    def op(self) -> str:
        assert self.OP is not None
        return self.OP


@dataclass(frozen=True)
class GetRequest(Request):
    """A declared prefix: its stored split, and a fill (in the background) on a miss if asked."""

    OP = "GET"
    ns: bytes = header(_KEY)  # namespace_tag(namespace): the key is the daemon's own
    enc: str = header(_ENC)
    eid: bytes = header(_EID)  # flashtoken.encodings.encoding_id(enc)
    allowed: tuple[str, ...] = header(ALLOWED)
    fill: bool = header(BOOL)
    prefix: bytes = frame(TEXT)
    # ms this GET may wait for a fill of its prefix in flight (its own included) before it is
    # answered a miss: about what encoding the prefix would cost the worker. 0 (or absent):
    # answer at once.
    wait_ms: int = header(Int(0, MAX_WAIT_MS), optional=True, default=0)


@dataclass(frozen=True)
class AutoRequest(Request):
    """The longest chain of cached blocks that starts ``text``, after the ``skip`` blocks the
    client holds (automatic prefix reuse)."""

    OP = "AUTO"
    seed: bytes = header(_KEY)  # make_chain_seed(namespace, eid, allowed, block)
    enc: str = header(_ENC)
    eid: bytes = header(_EID)
    allowed: tuple[str, ...] = header(ALLOWED)
    fill: bool = header(BOOL)
    block: int = header(_BLOCK)
    skip: int = header(Int(0, MAX_PREFIX_BYTES // MIN_BLOCK_BYTES))
    text: bytes = frame(TEXT)

    def check(self) -> None:
        if self.skip > len(self.text) // self.block:
            raise ProtocolError(
                f"field 'skip' must be an int in [0, {len(self.text) // self.block}]"
            )


@dataclass(frozen=True)
class TellRequest(Request):
    """Blocks ``first ..`` a client encoded itself, for the daemon to fill and publish: ``span``
    holds the text's bytes from ``start`` (the cut of block ``first - 1``, whose digest is
    ``parent``) to past the last block. Answered only by ``Unplaced``."""

    OP = "TELL"
    seed: bytes = header(_KEY)
    enc: str = header(_ENC)
    eid: bytes = header(_EID)
    allowed: tuple[str, ...] = header(ALLOWED)
    block: int = header(_BLOCK)
    first: int = header(Int(0, MAX_PREFIX_BYTES * 64 // MIN_BLOCK_BYTES))
    parent: bytes | None = header(Parent())
    start: int = header(Int(0, MAX_PREFIX_BYTES * 64))
    digests: list[bytes] = header(Digests(MAX_PUBLISHED_BLOCKS))
    span: bytes = frame(TEXT)

    def check(self) -> None:
        if self.first > MAX_PREFIX_BYTES * 64 // self.block:
            raise ProtocolError(
                f"field 'first' must be an int in [0, {MAX_PREFIX_BYTES * 64 // self.block}]"
            )
        check_parent(self.parent, self.first)
        if self.start > self.first * self.block:
            raise ProtocolError(f"field 'start' must be an int in [0, {self.first * self.block}]")
        end = (self.first + len(self.digests)) * self.block - self.start
        if not end <= len(self.span) <= end + 3:  # + 3: to the end of a character
            raise ProtocolError("the span must run from 'start' to the end of the last block")


@dataclass(frozen=True)
class TouchRequest(Request):
    """Hits a worker took from the host map itself, for the daemon's LRU order; ``id`` 0, no
    reply. ``keys``: 16-byte map keys, concatenated."""

    OP = "TOUCH"
    keys: bytes = frame(
        Raw(
            unit=KEY_BYTES,
            most=MAX_TOUCH_KEYS * KEY_BYTES,
            what=f"at most {MAX_TOUCH_KEYS} 16-byte keys",
        )
    )


@dataclass(frozen=True)
class StatsRequest(Request):
    """The daemon's counters and settings (``StatsReply``)."""

    OP = "STATS"


@dataclass(frozen=True)
class PingRequest(Request):
    """Is the daemon there, and which (``Pong``)."""

    OP = "PING"


REQUESTS: dict[str, type[Request]] = {
    cls.OP: cls
    for cls in (GetRequest, AutoRequest, TellRequest, TouchRequest, StatsRequest, PingRequest)
}
OPS = tuple(REQUESTS)


def check_parent(parent: bytes | None, first: int) -> None:
    """A block's parent digest (TELL, published blocks) is nil exactly for block 0."""
    if (parent is None) != (first == 0):
        raise ProtocolError("field 'parent' must be a 16-byte digest when 'first' > 0, else nil")


def parse_request(frames: list[Any], *, max_prefix_bytes: int = MAX_PREFIX_BYTES) -> Request:
    """Validate a request's frames (without the ROUTER identity) into its ``Request`` class.

    Raises ProtocolError with a message fit for a CLIENT_ERROR reply.
    """
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(f"a request has 1 or 2 frames, not {len(frames)}")
    head = unpack_header(frames[0])
    op = head.get("op")
    cls = REQUESTS.get(op) if type(op) is str else None
    if cls is None:
        raise ProtocolError(f"unknown op; expected one of {', '.join(OPS)}")
    return cls.parse(head, frames[1:], Limits(max_prefix_bytes))
