"""Requests, client to daemon: GET, AUTO, TELL, TOUCH, STATS, PING (docs/PROTOCOL.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flashtoken.errors import ProtocolError

from .codec import (
    ENCODING_ID_BYTES,
    KEY_BYTES,
    MAGIC,
    MAX_BLOCK_BYTES,
    MAX_NAME_CHARS,
    MAX_PREFIX_BYTES,
    MAX_PUBLISHED_BLOCKS,
    MAX_REQUEST_ID,
    MAX_SPECIAL_CHARS,
    MAX_SPECIALS,
    MAX_TOUCH_KEYS,
    MIN_BLOCK_BYTES,
    OPS,
    VERSION,
    _bool,
    _bytes,
    _int,
    _pack,
    _str,
    unpack_header,
)


@dataclass(frozen=True)
class Request:
    op: str
    id: int


@dataclass(frozen=True)
class GetRequest(Request):
    ns: bytes
    enc: str
    eid: bytes
    allowed: tuple[str, ...]
    fill: bool
    prefix: bytes


def pack_get(
    request_id: int,
    ns: bytes,
    enc: str,
    eid: bytes,
    allowed: tuple[str, ...],
    fill: bool,
    prefix: bytes,
) -> list[bytes]:
    header = {
        "m": MAGIC,
        "v": VERSION,
        "op": "GET",
        "id": request_id,
        "ns": ns,
        "enc": enc,
        "eid": eid,
        "allowed": list(allowed),
        "fill": fill,
    }
    return [_pack(header), prefix]


@dataclass(frozen=True)
class AutoRequest(Request):
    seed: bytes
    enc: str
    eid: bytes
    allowed: tuple[str, ...]
    fill: bool
    block: int
    skip: int
    text: bytes


@dataclass(frozen=True)
class TellRequest(Request):
    seed: bytes
    enc: str
    eid: bytes
    allowed: tuple[str, ...]
    block: int
    first: int
    parent: bytes | None
    start: int
    digests: list[bytes]
    span: bytes


def pack_auto(
    request_id: int,
    seed: bytes,
    enc: str,
    eid: bytes,
    allowed: tuple[str, ...],
    fill: bool,
    block: int,
    skip: int,
    text: bytes,
) -> list[bytes]:
    header = {
        "m": MAGIC,
        "v": VERSION,
        "op": "AUTO",
        "id": request_id,
        "seed": seed,
        "enc": enc,
        "eid": eid,
        "allowed": list(allowed),
        "fill": fill,
        "block": block,
        "skip": skip,
    }
    return [_pack(header), text]


def pack_tell(
    request_id: int,
    seed: bytes,
    enc: str,
    eid: bytes,
    allowed: tuple[str, ...],
    block: int,
    first: int,
    parent: bytes | None,
    start: int,
    digests: list[bytes],
    span: bytes,
) -> list[bytes]:
    header = {
        "m": MAGIC,
        "v": VERSION,
        "op": "TELL",
        "id": request_id,
        "seed": seed,
        "enc": enc,
        "eid": eid,
        "allowed": list(allowed),
        "block": block,
        "first": first,
        "parent": parent,
        "start": start,
        "digests": digests,
    }
    return [_pack(header), span]


@dataclass(frozen=True)
class TouchRequest(Request):
    keys: bytes  # 16-byte map keys, concatenated


def pack_touch(keys: bytes) -> list[bytes]:
    """Hits a worker took from the host map itself, for the daemon's LRU order (no reply)."""
    return [_pack({"m": MAGIC, "v": VERSION, "op": "TOUCH", "id": 0}), keys]


def pack_simple(op: str, request_id: int) -> list[bytes]:
    """A request with no fields: STATS or PING."""
    return [_pack({"m": MAGIC, "v": VERSION, "op": op, "id": request_id})]


def parse_request(frames: list[bytes], *, max_prefix_bytes: int = MAX_PREFIX_BYTES) -> Request:
    """Validate a request's frames (without the ROUTER identity) into a ``Request``.

    Checks the shape only; whether ``enc`` can be loaded and ``allowed`` are its special tokens is
    the daemon's to check. Raises ProtocolError with a message fit for a CLIENT_ERROR reply.
    """
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(f"a request has 1 or 2 frames, not {len(frames)}")
    header = unpack_header(frames[0])
    op = header.get("op")
    if op not in OPS or type(op) is not str:
        raise ProtocolError(f"unknown op; expected one of {', '.join(OPS)}")
    request_id = _int(header, "id", 0, MAX_REQUEST_ID)
    if op == "TOUCH":
        keys = frames[1] if len(frames) == 2 else b""
        if len(frames) != 2 or len(keys) % KEY_BYTES or len(keys) > MAX_TOUCH_KEYS * KEY_BYTES:
            raise ProtocolError(f"TOUCH takes one frame of at most {MAX_TOUCH_KEYS} 16-byte keys")
        return TouchRequest(op, request_id, bytes(keys))
    if op not in ("GET", "AUTO", "TELL"):
        if len(frames) != 1:
            raise ProtocolError(f"{op} takes no frames after the header")
        return Request(op, request_id)
    if len(frames) != 2:
        raise ProtocolError(f"{op} takes exactly one frame after the header: the text")
    allowed = _allowed(header)
    text = frames[1]
    if len(text) > max_prefix_bytes:
        raise ProtocolError(f"text of {len(text)} bytes exceeds the limit of {max_prefix_bytes}")
    text = bytes(text)
    try:
        text.decode("utf-8")  # strict: lone surrogates and overlong forms are refused too
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"text is not valid UTF-8 at byte {exc.start}") from exc
    enc = _str(header, "enc", MAX_NAME_CHARS)
    eid = _bytes(header, "eid", ENCODING_ID_BYTES)
    if op == "TELL":
        return _parse_tell(header, request_id, enc, eid, allowed, text)
    fill = _bool(header, "fill")
    if op == "GET":
        return GetRequest(
            op,
            request_id,
            ns=_bytes(header, "ns", KEY_BYTES),
            enc=enc,
            eid=eid,
            allowed=allowed,
            fill=fill,
            prefix=text,
        )
    block = _int(header, "block", MIN_BLOCK_BYTES, MAX_BLOCK_BYTES)
    skip = _int(header, "skip", 0, len(text) // block)
    return AutoRequest(
        op,
        request_id,
        seed=_bytes(header, "seed", KEY_BYTES),
        enc=enc,
        eid=eid,
        allowed=allowed,
        fill=fill,
        block=block,
        skip=skip,
        text=text,
    )


def _parse_tell(
    header: dict[str, Any],
    request_id: int,
    enc: str,
    eid: bytes,
    allowed: tuple[str, ...],
    span: bytes,
) -> TellRequest:
    block = _int(header, "block", MIN_BLOCK_BYTES, MAX_BLOCK_BYTES)
    first = _int(header, "first", 0, MAX_PREFIX_BYTES * 64 // block)
    parent = _parent(header, first)
    start = _int(header, "start", 0, first * block)
    digests = _digests(header)
    end = (first + len(digests)) * block - start
    if not end <= len(span) <= end + 3:
        raise ProtocolError("the span must run from 'start' to the end of the last block")
    return TellRequest(
        "TELL",
        request_id,
        seed=_bytes(header, "seed", KEY_BYTES),
        enc=enc,
        eid=eid,
        allowed=allowed,
        block=block,
        first=first,
        parent=parent,
        start=start,
        digests=digests,
        span=span,
    )


def _parent(header: dict[str, Any], first: int) -> bytes | None:
    """The digest of block ``first - 1`` (TELL, published blocks): nil only for block 0."""
    parent = header.get("parent")
    if (parent is None) != (first == 0) or (
        parent is not None and (type(parent) is not bytes or len(parent) != KEY_BYTES)
    ):
        raise ProtocolError("field 'parent' must be a 16-byte digest when 'first' > 0, else nil")
    return parent


def _digests(header: dict[str, Any]) -> list[bytes]:
    """One 16-byte digest per block (TELL, published blocks)."""
    digests = header.get("digests")
    if (
        type(digests) is not list
        or not 0 < len(digests) <= MAX_PUBLISHED_BLOCKS
        or any(type(d) is not bytes or len(d) != KEY_BYTES for d in digests)
    ):
        raise ProtocolError(
            f"field 'digests' must list 1 to {MAX_PUBLISHED_BLOCKS} 16-byte digests"
        )
    return digests


def _allowed(header: dict[str, Any]) -> tuple[str, ...]:
    allowed = header.get("allowed")
    if type(allowed) is not list or len(allowed) > MAX_SPECIALS:
        raise ProtocolError(f"field 'allowed' must be a list of at most {MAX_SPECIALS} str")
    for item in allowed:
        if type(item) is not str or not 0 < len(item) <= MAX_SPECIAL_CHARS:
            raise ProtocolError("field 'allowed' must hold special-token strings")
    if any(a >= b for a, b in zip(allowed, allowed[1:], strict=False)):
        # One canonical form, so that equal policies compare equal in the store.
        raise ProtocolError("field 'allowed' must be sorted and without duplicates")
    return tuple(allowed)
