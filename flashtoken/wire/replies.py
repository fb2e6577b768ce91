"""Replies, daemon to client (docs/PROTOCOL.md, "Replies")."""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

from flashtoken.errors import ProtocolError

from .codec import (
    CLIENT_ERROR,
    MAGIC,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_PREFIX_BYTES,
    MAX_REQUEST_ID,
    SERVER_ERROR,
    VERSION,
    _bool,
    _int,
    _pack,
    tokens_from_frame,
    unpack_header,
)


def _reply(request_id: int, ok: bool, **fields: Any) -> bytes:
    return _pack({"m": MAGIC, "v": VERSION, "id": request_id, "ok": ok, **fields})


def pack_hit(request_id: int, cut: int, tokens_frame: bytes) -> list[Any]:
    return [_reply(request_id, True, hit=True, cut=cut, n=len(tokens_frame) // 4), tokens_frame]


def pack_auto_reply(
    request_id: int,
    blocks: int,
    filling: bool,
    start: int = 0,
    cut_byte: int = 0,
    tokens_frame: bytes | None = None,
) -> list[Any]:
    """An AUTO reply: a hit when ``tokens_frame`` is given (the tokens of bytes start..cut_byte)."""
    if tokens_frame is None:
        return [_reply(request_id, True, hit=False, blocks=blocks, filling=filling)]
    head = _reply(
        request_id,
        True,
        hit=True,
        blocks=blocks,
        filling=filling,
        start=start,
        cut_byte=cut_byte,
        n=len(tokens_frame) // 4,
    )
    return [head, tokens_frame]


def pack_miss(request_id: int, filling: bool) -> list[Any]:
    return [_reply(request_id, True, hit=False, filling=filling)]


def pack_ok(request_id: int, **fields: Any) -> list[Any]:
    return [_reply(request_id, True, **fields)]


def pack_error(request_id: int, error: str, message: str) -> list[Any]:
    return [_reply(request_id, False, error=error, message=message[:MAX_ERROR_MESSAGE_CHARS])]


@dataclass(frozen=True)
class Reply:
    """A checked reply. ``fields`` is the header; ``tokens`` the token frame of a hit."""

    id: int
    ok: bool
    fields: dict[str, Any]
    tokens: array | None = None

    @property
    def error(self) -> str | None:
        return None if self.ok else self.fields["error"]


def parse_reply(frames: list[bytes]) -> Reply:
    """Validate a reply's frames. Raises ProtocolError for anything malformed.

    A GET or AUTO hit's tokens come back as ``array('I')`` whose length has been checked
    against ``n``; whether they are right for the text is the client's to check (client/core.py).
    """
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(f"a reply has 1 or 2 frames, not {len(frames)}")
    header = unpack_header(frames[0])
    request_id = _int(header, "id", 0, MAX_REQUEST_ID)
    ok = _bool(header, "ok")
    if not ok:
        error = header.get("error")
        if error not in (CLIENT_ERROR, SERVER_ERROR):
            raise ProtocolError("error reply without a CLIENT_ERROR / SERVER_ERROR type")
        message = header.get("message")
        if type(message) is not str:
            raise ProtocolError("error reply without a message")
        if len(frames) != 1:
            raise ProtocolError("error reply with frames")
        return Reply(request_id, False, header)
    tokens = None
    if "placed" in header and type(header["placed"]) is not bool:
        raise ProtocolError("field 'placed' must be a bool")
    if "hit" in header and type(header["hit"]) is not bool:
        raise ProtocolError("field 'hit' must be a bool")
    if "blocks" in header:  # an AUTO reply
        _int(header, "blocks", 0, MAX_PREFIX_BYTES)
        _bool(header, "filling")
        if header.get("hit") is not True and header.get("hit") is not False:
            raise ProtocolError("AUTO reply without a bool 'hit'")
    if header.get("hit") is True:
        if "blocks" in header:
            start = _int(header, "start", 0, MAX_PREFIX_BYTES * 64)
            if _int(header, "cut_byte", 0, MAX_PREFIX_BYTES * 64) <= start:
                raise ProtocolError("AUTO hit whose cut_byte is not after its start")
        else:
            _int(header, "cut", 0, MAX_PREFIX_BYTES * 64)
        n = _int(header, "n", 0, MAX_PREFIX_BYTES * 64)
        if len(frames) != 2 or len(frames[1]) != 4 * n:
            raise ProtocolError("hit reply whose token frame does not hold n tokens")
        tokens = tokens_from_frame(frames[1])
    elif len(frames) != 1:
        raise ProtocolError("unexpected frame in a reply")
    return Reply(request_id, True, header, tokens)
