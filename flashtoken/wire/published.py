"""Published chain blocks: what the daemon's PUB socket sends (docs/PROTOCOL.md, "Publishing").

One message per fill: ``[seed, header, span, tokens]``, the seed first as the subscription
topic. Declared once like every message (flashtoken/wire/schema.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flashtoken.errors import ProtocolError

from .codec import KEY_BYTES, MAX_PREFIX_BYTES, MAX_PUBLISHED_BLOCKS, unpack_header
from .requests import check_parent
from .schema import TOKENS, Bin, Digests, Int, IntList, Message, Parent, Raw, frame, header

__all__ = ["Blocks", "parse_blocks"]


@dataclass(frozen=True)
class Blocks(Message):
    """Published chain blocks ``first ..`` of the chains of ``seed``, checked for shape only.

    ``span`` holds the text's bytes from ``start`` (the cut of block ``first - 1``, found by its
    digest ``parent``; None for the first block) to just past the last block; per block,
    ``digests`` its digest, ``cuts`` its cut in the whole text (bytes) and ``counts`` its number
    of ``tokens``. Whether they are right is the subscriber's to check
    (``AutoPrefixCache.adopt``).
    """

    seed: bytes = frame(Bin(KEY_BYTES), topic=True)
    first: int = header(Int(0, MAX_PREFIX_BYTES))
    parent: bytes | None = header(Parent())
    start: int = header(Int(0, MAX_PREFIX_BYTES * 64))
    digests: list[bytes] = header(Digests(MAX_PUBLISHED_BLOCKS))
    cuts: list[int] = header(IntList())
    counts: list[int] = header(IntList())
    span: bytes = frame(Raw())
    tokens: Any = frame(TOKENS)  # array('I') when parsed; the blocks' frames joined to send

    def check(self) -> None:
        check_parent(self.parent, self.first)
        if not len(self.digests) == len(self.cuts) == len(self.counts):
            raise ProtocolError("fields 'cuts' and 'counts' must be lists, one item per digest")
        if sum(self.counts) != len(self.tokens):
            raise ProtocolError("token frame does not hold the blocks' counts")

    @property
    def ends(self) -> list[tuple[int, int]]:
        """Per block, ``(cut_byte, n)``: its cut and how many of ``tokens`` come before it."""
        ends, n = [], 0
        for cut, count in zip(self.cuts, self.counts, strict=True):
            n += count
            ends.append((cut, n))
        return ends


def parse_blocks(frames: list[Any]) -> Blocks:
    """Validate a published message. Raises ProtocolError for anything malformed."""
    if len(frames) != 4:
        raise ProtocolError("a published message has 4 frames, the first a 16-byte seed")
    parsed: Blocks = Blocks.parse(unpack_header(frames[1]), [frames[0], *frames[2:]])
    return parsed
