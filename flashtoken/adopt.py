"""Blocks encoded by another process, checked before a process's chain store takes them.

The daemon publishes the chain blocks it stores (client/follow.py); a worker takes those that
extend its own recent chains (``AutoPrefixCache.adopt``). A published block is held to the same
rules as one the worker encoded itself: its parent block is the worker's and agrees with the
published bytes, every cut is the one ``block_cuts`` computes from those bytes, the tokens spell
them, and none is a special token the policy does not allow. So a wrong, stale or colliding
publisher can cost a block, never a token.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import tiktoken

from flashtoken.blocks import block_cuts
from flashtoken.boundary import CutRule
from flashtoken.chains import ChainStore, Node
from flashtoken.specials import SpecialPolicy

# Where a process takes blocks encoded elsewhere: after the last blocks of its own lookups, and
# after blocks taken so. Not after an earlier block: a system prompt that starts every chat
# would make every process take every chat.
FRONTIER_BLOCKS = 16
_FRONTIER_MAX = 8192


class Frontier:
    """The keys of the blocks a process follows (bounded, least recently followed out first)."""

    def __init__(self) -> None:
        self._keys: collections.OrderedDict[Hashable, None] = collections.OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    def follow(self, nodes: list[Node]) -> None:
        keys = self._keys
        for node in nodes:
            keys[node.key] = None
            keys.move_to_end(node.key)
        while len(keys) > _FRONTIER_MAX:
            keys.popitem(last=False)


@dataclass(frozen=True)
class Published:
    """Blocks ``first ..`` of a chain as another process published them.

    ``span`` is the text's bytes from the parent's cut ``start_byte`` to past the last block's
    end (to a character boundary); ``ends`` holds each block's ``(cut_byte, n)``, ``n`` how many
    ``tokens`` come before its cut."""

    policy: SpecialPolicy
    first: int
    parent_digest: int | None
    start_byte: int
    digests: list[int]
    ends: list[tuple[int, int]]
    span: bytes
    tokens: Sequence[int]


def follows_from_root(
    store: ChainStore, frontier: Frontier, allowed: frozenset[str], digests: list[int]
) -> bool:
    """Whether a chain published from its first block extends one this process follows: its
    first blocks are here, and the last of them is on the frontier."""
    last = None
    for digest in digests:
        node = store.nodes.get((allowed, digest))
        if node is None or node.parent is not last:
            break
        last = node
    else:
        return False  # every block is here already
    return last is not None and last.key in frontier


def check_published(
    enc: tiktoken.Encoding,
    rule: CutRule,
    lengths: list[int],
    size: int,
    forbidden: frozenset[int],
    store: ChainStore,
    blocks: Published,
    parent: Node | None,
    tokens: list[int],
) -> list[Node] | None:
    """The nodes of the published ``blocks`` after ``parent`` (``tokens``: theirs, as shared
    ints), not stored yet; None if any check fails."""
    first, start_byte, span, ends = blocks.first, blocks.start_byte, blocks.span, blocks.ends
    if not ends or len(ends) != len(blocks.digests) or (parent is None) != (first == 0):
        return None
    if parent is None:
        if start_byte:
            return None
    elif not _parent_agrees(parent, first, start_byte, size, span):
        return None
    last_end = (first + len(ends)) * size - start_byte
    if not last_end <= len(span) <= last_end + 3:
        return None
    try:
        text = span.decode("utf-8")
        spelled = enc.decode_bytes(tokens)
    except (UnicodeDecodeError, KeyError, OverflowError, TypeError, ValueError):
        return None
    policy = blocks.policy
    cuts = block_cuts(
        rule,
        policy,
        lengths,
        text,
        span,
        size,
        first,
        first + len(ends),
        0,
        0,
        tokens,
        origin=start_byte,
    )
    claimed = [(cut_byte - start_byte, n) for cut_byte, n in ends]
    if [(cut_byte, n) for _, cut_byte, n in cuts] != claimed or claimed[-1][1] != len(tokens):
        return None
    if spelled != span[: claimed[-1][0]] or not forbidden.isdisjoint(tokens):
        return None
    start = parent.cut if parent is not None else 0
    added: list[Node] = []
    taken = 0
    for i, (cut, cut_byte, n) in enumerate(cuts, first):
        added.append(
            store.node(
                (policy.allowed, blocks.digests[i - first]),
                added[-1] if added else parent,
                policy.allowed,
                span,
                i * size,
                (i + 1) * size,
                start + cut,
                start_byte + cut_byte,
                tokens[taken:n],
                origin=start_byte,
            )
        )
        taken = n
    return added


def _parent_agrees(parent: Node, first: int, start_byte: int, size: int, span: bytes) -> bool:
    """The bytes between the parent's cut and its block's end are the published ones (a long
    piece can put the cut blocks back: each block it reaches into is compared)."""
    if parent.cut_byte != start_byte or start_byte > first * size:
        return False
    node: Node | None = parent
    for i in range(first - 1, -1, -1):
        if (i + 1) * size <= start_byte:
            break
        if node is None:
            return False
        lo = max(start_byte, i * size)
        if node.kept[lo - i * size :] != span[lo - start_byte : (i + 1) * size - start_byte]:
            return False
        node = node.parent
    return True
