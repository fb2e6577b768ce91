"""The chain store: blocks of text, each holding its tokens, found by key, kept within a budget.

One store serves automatic reuse in a process (``flashtoken.AutoPrefixCache``) and in the
daemon (daemon/store.py), and a declared prefix is its one-block case: a root node whose block is
the whole prefix. Block ``i`` of a text is a :class:`Node` whose parent is block ``i - 1`` and
which holds only the tokens between its parent's stable cut and its own (flashtoken/blocks.py), so
memory grows with the distinct text, not with the texts that share it.

The rule, written once here (:meth:`ChainStore.step`): **a block is used only if its parent
matched and its bytes match.** A key (a digest) only locates a node; it never proves one.

What differs between the users is chosen at construction, as objects, so that no call on the hot
path branches on it:

- how tokens are held (:class:`ListTokens`: shared ints, joined into lists, in a process; the
  daemon's little-endian uint32 frames, sent with no copy), and
- how a block is confirmed (:class:`BlockBytes`: a node keeps its block's bytes, compared by a
  memcmp; :class:`Decoded`: a node keeps only the bytes from its cut to its block's end, and its
  tokens, which spell the rest, are decoded: about 4 bytes a token in all, not 4 + the text).

Eviction takes the least recently used *leaf*: a block is never evicted while blocks extending
it remain (they could no longer be reached). So while a node is held, so is its whole path, and
``holds(path[-1])`` tells whether a remembered path is still usable.

Not thread-safe: the in-process cache calls it under its lock, the daemon from its loop only.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

from flashtoken.ids import token_list

__all__ = [
    "BlockBytes",
    "ChainStore",
    "Decoded",
    "FrameTokens",
    "ListTokens",
    "Node",
    "TokenStorage",
]


class Node:
    """One block of one chain (or a whole declared prefix: a root of one block)."""

    __slots__ = ("key", "parent", "scope", "kept", "cut", "cut_byte", "tokens", "children", "used")

    def __init__(
        self,
        key: Hashable,
        parent: Node | None,
        scope: Hashable,
        kept: bytes,
        cut: int,
        cut_byte: int,
        tokens: Any,
    ) -> None:
        self.key = key
        self.parent = parent
        # What besides the bytes a match must share (an encoding, a policy, a namespace): a key
        # may be truncated (tests force collisions) or crafted, the scope is compared.
        self.scope = scope
        self.kept = kept  # the bytes kept to confirm a match (see the confirmations)
        self.cut = cut  # the stable cut, in characters of the whole text (-1: not known)
        self.cut_byte = cut_byte  # the same cut in UTF-8 bytes
        self.tokens = tokens  # the tokens between the parent's cut and this one
        self.children = 0
        self.used = 0  # a tick: when a lookup last ended here


class TokenStorage(Protocol):
    """How a store holds a node's tokens."""

    def nbytes(self, tokens: Any) -> int: ...


class ListTokens:
    """Tokens as lists of shared int objects: 8 bytes a token (the in-process cache)."""

    @staticmethod
    def keep(tokens: Sequence[int]) -> list[int]:
        return token_list(tokens)

    @staticmethod
    def nbytes(tokens: list[int]) -> int:
        return 8 * len(tokens)


class FrameTokens:
    """Tokens as little-endian uint32 bytes, 4 a token (the daemon: each sent as a frame with
    no copy, and the frames of a path joined by one ``b"".join``)."""

    @staticmethod
    def nbytes(tokens: bytes) -> int:
        return len(tokens)


class BlockBytes:
    """A node keeps its whole block; a match compares the text's block with it (a memcmp)."""

    @staticmethod
    def kept(data: bytes, start: int, cut_byte: int, end: int) -> bytes:
        return data[start:end]

    @staticmethod
    def matches(node: Node, data: bytes, start: int, end: int, origin: int) -> bool:
        return node.kept == data[start - origin : end - origin]

    @staticmethod
    def confirm(data: bytes, path: list[Node], known: int, origin: int) -> int:
        return len(path)  # each block's bytes were compared already


class Decoded:
    """A node keeps only the bytes from its cut to its block's end; the bytes before its cut are
    those its tokens spell, checked by decoding them (``decode(scope)``: a node's tokens to
    bytes) once for all the new blocks of a walk, block by block only if that fails.

    Rejected: keeping every block's bytes as well (the tokens *are* the text, in about as many
    bytes: the daemon's chains would cost twice their memory)."""

    def __init__(
        self, decoder: Callable[[Hashable], Callable[[Any], bytes]], join: Callable
    ) -> None:
        self._decoder = decoder
        self._join = join

    @staticmethod
    def kept(data: bytes, start: int, cut_byte: int, end: int) -> bytes:
        return data[cut_byte:end]

    @staticmethod
    def matches(node: Node, data: bytes, start: int, end: int, origin: int) -> bool:
        parent_cut = node.parent.cut_byte if node.parent is not None else 0
        cut = node.cut_byte
        return parent_cut <= cut <= end and node.kept == data[cut - origin : end - origin]

    def confirm(self, data: bytes, path: list[Node], known: int, origin: int) -> int:
        """How many blocks of ``path`` are confirmed, given its first ``known``."""
        if known == len(path):
            return known
        decode = self._decoder(path[-1].scope)
        start = (path[known - 1].cut_byte if known else 0) - origin
        last = path[-1].cut_byte - origin
        if decode(self._join([n.tokens for n in path[known:]])) == data[start:last]:
            return len(path)
        for i in range(known, len(path)):  # which one fails
            if decode(path[i].tokens) != data[start : path[i].cut_byte - origin]:
                return i
            start = path[i].cut_byte - origin
        return len(path)  # unreachable: the joined tokens would have spelled the bytes


class ChainStore:
    """``key -> Node``, leaf-first LRU within ``max_bytes`` (``bytes`` never exceeds it).

    ``overhead``: the bytes a node costs beyond its kept bytes and tokens (fixed, so that the
    accounting is deterministic).

    >>> store = ChainStore(1024, ListTokens(), BlockBytes(), overhead=100)
    >>> root = store.add(None, [store.node("k1", None, "s", b"hello", 0, 5, 5, 5, [15339])])
    >>> store.step(None, "k1", "s", b"hello world", 0, 5) is root[0], store.bytes
    (True, 113)
    >>> store.step(None, "k1", "s", b"hellO world", 0, 5), store.collisions
    (None, 1)
    """

    def __init__(
        self,
        max_bytes: int,
        tokens: TokenStorage,
        confirm: Any,
        *,
        overhead: int,
        on_remove: Callable[[Node], None] | None = None,
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.storage = tokens
        self.confirmation = confirm
        self.overhead = overhead
        self._on_remove = on_remove  # told of every node that leaves (a count kept outside)
        self.clear()

    def clear(self) -> None:
        """Forget every node (counters too)."""
        self.nodes: dict[Hashable, Node] = {}
        # Eviction candidates: (used, key) of leaves, in a heap invalidated lazily (a node
        # used again, given a child, or gone leaves a stale entry behind).
        self._leaves: list[tuple[int, Hashable]] = []
        self._tick = 0
        self.bytes = 0
        self.evictions = self.collisions = self.too_large = self.total_items = 0

    def __len__(self) -> int:
        return len(self.nodes)

    def size(self, node: Node) -> int:
        return len(node.kept) + self.storage.nbytes(node.tokens) + self.overhead

    def node(
        self,
        key: Hashable,
        parent: Node | None,
        scope: Hashable,
        data: bytes,
        start: int,
        end: int,
        cut: int,
        cut_byte: int,
        tokens: Any,
        origin: int = 0,
    ) -> Node:
        """A new node (not stored yet: see ``add``) for the block from ``start`` to ``end`` of a
        text whose bytes from ``origin`` on are ``data``, its cut at ``cut`` / ``cut_byte``."""
        kept = self.confirmation.kept(data, start - origin, cut_byte - origin, end - origin)
        return Node(key, parent, scope, kept, cut, cut_byte, tokens)

    # -- lookups -------------------------------------------------------------------------------

    def holds(self, node: Node) -> bool:
        """Whether ``node`` is stored (and so, leaves going first, its whole path)."""
        return self.nodes.get(node.key) is node

    def step(
        self,
        parent: Node | None,
        key: Hashable,
        scope: Hashable,
        data: bytes,
        start: int,
        end: int,
        origin: int = 0,
    ) -> Node | None:
        """The node that continues ``parent`` with the block from ``start`` to ``end`` of a text
        whose bytes from ``origin`` on are ``data``; None if there is none.

        The rule of every chain: used only if its parent is the block matched before (so every
        earlier block matched), its scope is the lookup's, and its bytes match. A node under the
        key that fails the rule is a collision (counted, and kept: replacing it would let anyone
        who crafts collisions evict another tenant's entry at will)."""
        node = self.nodes.get(key)
        if node is None:
            return None
        if node.parent is parent and node.scope == scope:
            if self.confirmation.matches(node, data, start, end, origin):
                return node
        self.collisions += 1
        return None

    def confirm(self, data: bytes, path: list[Node], known: int, origin: int = 0) -> int:
        """How many blocks of ``path`` (found by ``step``) the confirmation accepts, its first
        ``known`` confirmed before; a block refused is counted as a collision."""
        confirmed = self.confirmation.confirm(data, path, known, origin)
        if confirmed < len(path):
            self.collisions += 1
        return confirmed

    def use(self, node: Node) -> None:
        """``node`` is now the most recently used (a lookup ended there)."""
        self._tick += 1
        node.used = self._tick
        if not node.children:
            heapq.heappush(self._leaves, (node.used, node.key))

    # -- adding --------------------------------------------------------------------------------

    def add(self, parent: Node | None, added: list[Node]) -> list[Node]:
        """Store ``added`` (each the parent of the next) after ``parent``; returns the nodes now
        stored along the chain, in order.

        A node whose twin is held (the same block, recorded meanwhile by another fill or
        thread) is followed instead. Stops at a collision (the node there is kept), at a parent
        that is not stored (evicted meanwhile: the rest could not be reached) and at a node that
        does not fit the budget."""
        chain: list[Node] = []
        for node in added:
            if parent is not None and not self.holds(parent):
                break
            twin = self.nodes.get(node.key)
            if twin is not None:
                if (
                    twin.parent is parent
                    and twin.scope == node.scope
                    and twin.cut_byte == node.cut_byte
                    and twin.kept == node.kept
                    and twin.tokens == node.tokens
                ):
                    chain.append(twin)
                    parent = twin
                    continue
                break  # a collision: keep the first
            node.parent = parent
            if not self._insert(node):
                break
            chain.append(node)
            parent = node
        return chain

    def add_root(self, node: Node) -> bool:
        """Store ``node`` as a chain of one block (a declared prefix); whether it is held."""
        return self.add(None, [node]) != []

    def _insert(self, node: Node) -> bool:
        size = self.size(node)
        if size > self.max_bytes:
            self.too_large += 1
            return False
        parent = node.parent
        if parent is not None:
            parent.children += 1  # first: eviction to make room must spare the parent
        while self.bytes + size > self.max_bytes:
            if not self._evict_one():
                if parent is not None:
                    self._release(parent)
                return False
        self.nodes[node.key] = node
        self.bytes += size
        self.total_items += 1
        self.use(node)
        return True

    # -- eviction ------------------------------------------------------------------------------

    def _evict_one(self) -> bool:
        while self._leaves:
            used, key = heapq.heappop(self._leaves)
            node = self.nodes.get(key)
            if node is None or node.used != used or node.children:
                continue  # a stale entry
            self._remove(node)
            self.evictions += 1
            return True
        return False

    def _remove(self, node: Node) -> None:
        del self.nodes[node.key]
        self.bytes -= self.size(node)
        if self._on_remove is not None:
            self._on_remove(node)
        if node.parent is not None and self.holds(node.parent):
            self._release(node.parent)

    def _release(self, parent: Node) -> None:
        parent.children -= 1
        if not parent.children:
            heapq.heappush(self._leaves, (parent.used, parent.key))

    def compact(self) -> None:
        """Drop the stale heap entries once they outnumber the nodes."""
        if len(self._leaves) > 4 * len(self.nodes) + 64:
            self._leaves = [(n.used, k) for k, n in self.nodes.items() if not n.children]
            heapq.heapify(self._leaves)
