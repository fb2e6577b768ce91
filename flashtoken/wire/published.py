"""Published chain blocks: what the daemon's PUB socket sends (docs/PROTOCOL.md, "Publishing")."""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from flashtoken.errors import ProtocolError

from .codec import (
    KEY_BYTES,
    MAGIC,
    MAX_PREFIX_BYTES,
    VERSION,
    _int,
    _pack,
    tokens_from_frame,
    unpack_header,
)
from .requests import _digests, _parent


@dataclass(frozen=True)
class Blocks:
    """Published chain blocks ``first ..`` of the chains of ``seed``, checked for shape only.

    ``span`` holds the text's bytes from ``start`` (the cut of block ``first - 1``, found by its
    digest ``parent``; None for the first block) to just past the last block; ``ends`` holds
    each block's ``(cut_byte, n)``: its cut in the whole text and how many of ``tokens`` come
    before it. Whether they are right is the subscriber's to check (``AutoPrefixCache._adopt``).
    """

    seed: bytes
    first: int
    parent: bytes | None
    start: int
    digests: list[bytes]
    ends: list[tuple[int, int]]
    span: bytes
    tokens: array


def pack_blocks(
    seed: bytes,
    first: int,
    parent: bytes | None,
    start: int,
    digests: list[bytes],
    cut_bytes: list[int],
    span: bytes,
    token_frames: list[bytes],
) -> list[bytes]:
    """One published message: the seed is the first frame, the subscription topic."""
    counts = [len(frame) // 4 for frame in token_frames]
    header = {
        "m": MAGIC,
        "v": VERSION,
        "first": first,
        "parent": parent,
        "start": start,
        "digests": digests,
        "cuts": cut_bytes,
        "counts": counts,
    }
    return [seed, _pack(header), span, b"".join(token_frames)]


def parse_blocks(frames: list[bytes]) -> Blocks:
    """Validate a published message. Raises ProtocolError for anything malformed."""
    if len(frames) != 4 or len(frames[0]) != KEY_BYTES:
        raise ProtocolError("a published message has 4 frames, the first a 16-byte seed")
    header = unpack_header(frames[1])
    first = _int(header, "first", 0, MAX_PREFIX_BYTES)
    parent = _parent(header, first)
    start = _int(header, "start", 0, MAX_PREFIX_BYTES * 64)
    digests, cuts, counts = _digests(header), header.get("cuts"), header.get("counts")
    if not (
        type(cuts) is list and type(counts) is list and len(digests) == len(cuts) == len(counts)
    ):
        raise ProtocolError("fields 'cuts' and 'counts' must be lists, one item per digest")
    if any(type(x) is not int or x < 0 for x in cuts + counts):
        raise ProtocolError("fields 'cuts' and 'counts' must hold ints >= 0")
    tokens = tokens_from_frame(frames[3])
    ends, n = [], 0
    for cut, count in zip(cuts, counts, strict=True):
        n += count
        ends.append((cut, n))
    if n != len(tokens):
        raise ProtocolError("token frame does not hold the blocks' counts")
    return Blocks(frames[0], first, parent, start, digests, ends, frames[2], tokens)
