"""Blocks: where each fixed-size block of a text has its stable cut, and what a token spans.

A chain (flashtoken/chains.py) stores, for block ``i`` of a text's UTF-8, only the tokens between
block ``i - 1``'s stable cut and its own. These cuts are computed here, once, for every user of
chains: the in-process ``AutoPrefixCache``, the daemon's fills and the checks of blocks encoded
by another process (``AutoPrefixCache.adopt``). All three must agree on every cut, or a block one
of them stored would not be the block another looks for.
"""

from __future__ import annotations

import bisect
import itertools
import weakref
from collections.abc import Sequence

import tiktoken

from flashtoken import tiktoken_parts
from flashtoken.boundary import CutRule, stable_offset
from flashtoken.specials import SpecialPolicy

__all__ = ["AMBIGUOUS", "MAX_UNCUT_BLOCKS", "block_cuts", "token_byte_lengths"]

MAX_UNCUT_BLOCKS = 8
"""A chain ends where its last cut lies this many blocks behind the block's end.

Each block's cut is found by scanning the text from the previous cut as if the text ended at the
block's end (so it depends on those bytes alone). Inside one regex piece that does not end (a
run of spaces, of newlines, of one letter) the cut cannot advance, and every block would rescan
the whole run: 27 s for 500k newlines against 0.18 s for tiktoken. Capping the scan keeps block
cuts linear in the text; ordinary text cuts within a block or two, and the text after such a
run is encoded (exactly) but not cached."""

_lengths_cache: weakref.WeakKeyDictionary[tiktoken.Encoding, list[int]] = (
    weakref.WeakKeyDictionary()
)

AMBIGUOUS = -1


def token_byte_lengths(enc: tiktoken.Encoding) -> list[int]:
    """How many bytes of text each token id stands for (0 for unused ids).

    ``AMBIGUOUS`` for an id that two special tokens of different lengths share: o200k_harmony
    gives ``<|endofprompt|>`` and ``<|reserved_200018|>`` both id 200018, so the id alone does
    not say how much text it covers.
    """
    lengths = _lengths_cache.get(enc)
    if lengths is None:
        lengths = [0] * enc.n_vocab
        for token, rank in tiktoken_parts.mergeable_ranks(enc).items():
            lengths[rank] = len(token)
        for special, rank in tiktoken_parts.special_tokens(enc).items():
            size = len(special.encode("utf-8"))
            lengths[rank] = size if lengths[rank] in (0, size) else AMBIGUOUS
        _lengths_cache[enc] = lengths
    return lengths


def block_cuts(
    rule: CutRule,
    policy: SpecialPolicy,
    lengths: list[int],
    text: str,
    data: bytes,
    block: int,
    first: int,
    stop: int,
    start: int,
    start_byte: int,
    tail: Sequence[int],
    origin: int = 0,
) -> list[tuple[int, int, int]]:
    """The stable cuts of blocks ``first .. stop-1`` of ``data`` (``text`` as UTF-8).

    ``start`` / ``start_byte`` is the cut of block ``first - 1`` (0 for the first block) and
    ``tail`` the tokens tiktoken gives ``text[start:]`` within the whole text. Returns one
    ``(cut, cut_byte, n)`` per block, ``n`` the number of ``tail`` tokens before its cut; it
    stops early at a cut that is no token boundary of ``tail`` (only a wrong split could make
    one), at the first token whose byte length is ambiguous and where the cut lags
    :data:`MAX_UNCUT_BLOCKS` behind. A block's cut is computed as if
    the text ended at the block's end, so it depends only on ``text[start:block end]``: the
    in-process cache and the daemon (daemon/chains.py) share this function and so agree.

    ``origin`` is where ``data`` starts in the whole text, in bytes (a stable cut, so ``text``
    starts there too): blocks computed elsewhere are checked from the bytes after their parent's
    cut alone (``AutoPrefixCache.adopt``). Offsets in and out are relative to it.
    """
    base = start_byte
    # Where each token of ``tail`` ends, in bytes from ``base``, up to the first token whose
    # length is ambiguous (no block is recorded past it).
    lens = list(map(lengths.__getitem__, tail))
    if AMBIGUOUS in lens:
        del lens[lens.index(AMBIGUOUS) :]
    ends = list(itertools.accumulate(lens))
    chars, mark = start, start_byte  # complete characters in data[:mark]
    out: list[tuple[int, int, int]] = []
    for i in range(first, stop):
        block_end = (i + 1) * block - origin
        aligned = block_end
        while aligned < len(data) and aligned > mark and data[aligned] & 0xC0 == 0x80:
            aligned -= 1  # a block may end inside a character; the cut stays before it
        chars += len(data[mark:aligned].decode("utf-8"))
        mark = aligned
        if chars - start > MAX_UNCUT_BLOCKS * block:
            break  # a run no cut can enter (a megabyte of spaces): rescanning it is quadratic
        cut = stable_offset(rule, policy, text, start, chars)
        cut_byte = start_byte + len(text[start:cut].encode("utf-8"))
        n = bisect.bisect_left(ends, cut_byte - base) + 1 if cut_byte > base else 0
        if n and (n > len(ends) or ends[n - 1] != cut_byte - base):
            break  # not a token boundary: only a wrong split could do that; record no more
        out.append((cut, cut_byte, n))
        start, start_byte = cut, cut_byte
    return out
