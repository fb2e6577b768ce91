"""Whether a fleet value's ids spell its prefix: the last check before a value is trusted.

``spells(table, frame, data)`` answers ``decode_bytes(ids) == data`` for a frame of ordinary
tokens without making a Python int per id: the frame is read as a numpy uint32 array and
compared with the prefix word by word. Each token's first 8 bytes are held as one uint64
(zero-padded); the prefix is viewed as a uint64 at every byte offset (an unaligned, overlapping
view, no copy), so one gather at the tokens' offsets, a mask by length and one comparison check
every token's first 8 bytes at once. The bytes past the eighth (tokens longer than 8 bytes, a
few percent of English text's) are gathered from a flat copy of the vocabulary and compared in
one more pass. For a 32 KiB prefix this takes about half what ``tolist()`` and tiktoken's
``decode_bytes`` take together, and no Python loop runs over the ids.

Only ordinary tokens are looked at here: an id that is a special token or no token at all has a
length that no prefix can sum to (``_NOT_ORDINARY``), so ``spells`` answers None ("cannot say")
and the caller takes the slow path (``decode_bytes`` and the special-token policy). A byte-wise
polynomial hash was rejected: a hash modulo 2**64 with a public base has known collisions, and
this check must be exact.
"""

from __future__ import annotations

import threading
from typing import Any

import tiktoken

from flashtoken import tiktoken_parts

# An impossible token length: a sum of lengths holding k >= 1 of these is at least 2**32, more
# than any prefix's length (a u32 in the value), and at most 2**62 (a value holds < 2**30 ids):
# no int64 overflow.
_NOT_ORDINARY = 1 << 32
_WORD = 8

_tables: dict[bytes, SpellingTable] = {}
_tables_lock = threading.Lock()


class SpellingTable:
    """The vocabulary of one encoding as numpy arrays (a few MB, built in ~40 ms, once)."""

    def __init__(self, enc: tiktoken.Encoding) -> None:
        import numpy as np

        ranks = tiktoken_parts.mergeable_ranks(enc)
        specials = tiktoken_parts.special_tokens(enc)
        self.n = max([*ranks.values(), *specials.values()]) + 1
        spelling = [b""] * self.n
        for token, rank in ranks.items():
            spelling[rank] = token
        lengths = np.fromiter(map(len, spelling), np.int64, self.n)
        ordinary = np.zeros(self.n, bool)
        ordinary[np.fromiter(ranks.values(), np.int64, len(ranks))] = True
        ordinary[np.fromiter(specials.values(), np.int64, len(specials))] = False
        self.lengths = np.where(ordinary, lengths, _NOT_ORDINARY)
        self.blob = np.frombuffer(b"".join(spelling), np.uint8)
        self.offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        heads = b"".join(t[:_WORD].ljust(_WORD, b"\0") for t in spelling)
        self.heads = np.frombuffer(heads, "<u8")
        # masks[k]: the low k bytes of a little-endian word (k = 0..8).
        self.masks = np.array([(1 << (8 * k)) - 1 for k in range(_WORD)] + [2**64 - 1], "<u8")


def table_for(eid: bytes, enc: tiktoken.Encoding) -> SpellingTable:
    """The table of the encoding whose identity is ``eid`` (built on first use, then shared)."""
    table = _tables.get(eid)
    if table is None:
        with _tables_lock:  # two fill threads would build it twice, for nothing
            table = _tables.get(eid)
            if table is None:
                table = _tables[eid] = SpellingTable(enc)
    return table


def spells(table: SpellingTable, frame: Any, data: bytes) -> bool | None:
    """Whether the little-endian uint32 ids in ``frame`` spell exactly ``data``.

    None when an id is not an ordinary token of the encoding (a special token or an unknown
    id): the caller decides those with ``decode_bytes``. ``frame`` is bytes or a memoryview
    whose length is a multiple of 4.
    """
    import numpy as np

    ids = np.frombuffer(frame, "<u4")
    if not ids.size:
        return not data
    if int(ids.max()) >= table.n:
        return None
    ids = ids.astype(np.intp)  # an index of the platform's width: gathers are faster
    lengths = table.lengths.take(ids)
    ends = np.cumsum(lengths)
    if int(ends[-1]) != len(data):
        # Either an id that is not ordinary (its length is _NOT_ORDINARY) or a wrong spelling.
        return None if int(lengths.max()) >= _NOT_ORDINARY else False
    starts = ends - lengths
    # The prefix as a uint64 at every byte offset (padded so the last word is whole).
    padded = data + bytes(_WORD)
    words = np.ndarray((len(data),), "<u8", padded, 0, (1,))
    heads = words.take(starts) & table.masks.take(np.minimum(lengths, _WORD))
    if not np.array_equal(heads, table.heads.take(ids)):
        return False
    long = np.flatnonzero(lengths > _WORD)
    if not long.size:
        return True
    # The bytes past the eighth of the long tokens: gathered from the vocabulary, in one pass.
    rest = lengths.take(long) - _WORD
    within = np.arange(int(rest.sum())) - np.repeat(np.cumsum(rest) - rest, rest)
    vocab = np.repeat(table.offsets.take(ids.take(long)) + _WORD, rest) + within
    prefix = np.repeat(starts.take(long) + _WORD, rest) + within
    raw = np.frombuffer(data, np.uint8)
    return bool(np.array_equal(table.blob.take(vocab), raw.take(prefix)))
