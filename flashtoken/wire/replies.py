"""Replies, daemon to client, typed (docs/PROTOCOL.md, "Replies").

A reply names its request's op and says ``ok``; a GET or AUTO reply also says ``hit``. Those
three select its class, so a client never guesses what a reply answers from which fields it
happens to carry, and each class is declared once (flashtoken/wire/schema.py). A hit's tokens
come back as ``array('I')``, their count checked against ``n``; whether they are right for the
text is the client's to check (client/core.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from flashtoken.errors import ProtocolError

from .codec import (
    CLIENT_ERROR,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_NAME_CHARS,
    MAX_PREFIX_BYTES,
    SERVER_ERROR,
    unpack_header,
)
from .schema import BOOL, DEFAULT_LIMITS, REQUEST_ID, TOKENS, Int, Map, Message, Str, frame, header

__all__ = [
    "AutoHit",
    "AutoMiss",
    "ErrorReply",
    "GetHit",
    "GetMiss",
    "Pong",
    "Reply",
    "StatsReply",
    "Unplaced",
    "parse_reply",
]

_OFFSET = Int(0, MAX_PREFIX_BYTES * 64)


@dataclass(frozen=True)
class Reply(Message):
    """Every reply carries its request's ``id``; ``ok`` is False only for an ``ErrorReply``."""

    TAGS: ClassVar[tuple[str, ...]] = ("ok",)
    ok: ClassVar[bool] = True
    id: int = header(REQUEST_ID)


@dataclass(frozen=True)
class GetHit(Reply):
    """The tokens of the prefix's whole encoding before its stable ``cut`` (in code points)."""

    OP = "GET"
    TAGS = ("ok", "hit")
    COUNT = "n"
    hit: ClassVar[bool] = True
    cut: int = header(_OFFSET)
    tokens: Any = frame(TOKENS)  # array('I') when parsed; bytes or an array to send


@dataclass(frozen=True)
class GetMiss(Reply):
    """Not stored; ``filling``: a fill of this prefix is running."""

    OP = "GET"
    TAGS = ("ok", "hit")
    hit: ClassVar[bool] = False
    filling: bool = header(BOOL)


@dataclass(frozen=True)
class AutoMiss(Reply):
    """No block beyond the client's ``skip``: ``blocks`` is the length of the chain found,
    ``filling`` whether the blocks after it are being recorded."""

    OP = "AUTO"
    TAGS = ("ok", "hit")
    hit: ClassVar[bool] = False
    blocks: int = header(Int(0, MAX_PREFIX_BYTES))
    filling: bool = header(BOOL)


@dataclass(frozen=True)
class AutoHit(Reply):
    """The tokens of the text's bytes ``start .. cut_byte`` (blocks ``skip .. blocks - 1``)."""

    OP = "AUTO"
    TAGS = ("ok", "hit")
    COUNT = "n"
    hit: ClassVar[bool] = True
    blocks: int = header(Int(0, MAX_PREFIX_BYTES))
    filling: bool = header(BOOL)
    start: int = header(_OFFSET)
    cut_byte: int = header(_OFFSET)
    tokens: Any = frame(TOKENS)

    def check(self) -> None:
        if self.cut_byte <= self.start:
            raise ProtocolError("AUTO hit whose cut_byte is not after its start")


@dataclass(frozen=True)
class Unplaced(Reply):
    """The one reply a TELL gets: its parent block is not in the store (evicted, or a restart),
    so the client tells its next text from the first block."""

    OP = "TELL"
    placed: bool = header(BOOL, default=False)

    def check(self) -> None:
        if self.placed:
            raise ProtocolError("a TELL reply is only ever 'placed': false")


@dataclass(frozen=True)
class StatsReply(Reply):
    """The daemon's counters and its settings (docs/PROTOCOL.md, "Stats")."""

    OP = "STATS"
    stats: dict[str, Any] = header(Map())
    settings: dict[str, Any] = header(Map())


@dataclass(frozen=True)
class Pong(Reply):
    """The daemon's pid and flashtoken version."""

    OP = "PING"
    pong: bool = header(BOOL, default=True)
    pid: int = header(Int(0, 2**31), default=0)
    version: str = header(Str(MAX_NAME_CHARS), default="")


@dataclass(frozen=True)
class ErrorReply(Reply):
    """A request refused (CLIENT_ERROR: it broke a rule) or not served (SERVER_ERROR: e.g. its
    fill failed), as memcached names them. Carries no op: a request too malformed to have one
    is answered too (its ``id`` 0 when none could be read)."""

    ok: ClassVar[bool] = False
    error: str = header(Str(len(CLIENT_ERROR)))
    message: str = header(Str(MAX_ERROR_MESSAGE_CHARS, empty=True))

    def __post_init__(self) -> None:
        if len(self.message) > MAX_ERROR_MESSAGE_CHARS:  # a long exception text, cut to fit
            object.__setattr__(self, "message", self.message[:MAX_ERROR_MESSAGE_CHARS])

    def check(self) -> None:
        if self.error not in (CLIENT_ERROR, SERVER_ERROR):
            raise ProtocolError("error reply without a CLIENT_ERROR / SERVER_ERROR type")


_REPLIES: dict[tuple[Any, Any], type[Reply]] = {
    (cls.OP, getattr(cls, "hit", None)): cls
    for cls in (GetHit, GetMiss, AutoHit, AutoMiss, Unplaced, StatsReply, Pong)
}


def parse_reply(frames: list[Any]) -> Reply:
    """Validate a reply's frames into its class. Raises ProtocolError for anything malformed,
    including a reply to an op the client never sends (no class) or a ``hit`` not a bool."""
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(f"a reply has 1 or 2 frames, not {len(frames)}")
    head = unpack_header(frames[0])
    ok = BOOL.check("ok", head.get("ok"), DEFAULT_LIMITS)
    if not ok:
        return ErrorReply.parse(head, frames[1:])
    hit = head.get("hit")
    if hit is not None:
        BOOL.check("hit", hit, DEFAULT_LIMITS)
    cls = _REPLIES.get((head.get("op"), hit))
    if cls is None:
        raise ProtocolError(f"a reply of no known kind (op {head.get('op')!r}, hit {hit!r})")
    return cls.parse(head, frames[1:])
