"""The daemon's store: one chain store (flashtoken/chains.py) for declared prefixes and chains.

A declared prefix (GET) is a chain of one block: a root node whose block is the whole prefix.
Automatic reuse (AUTO, TELL) stores chains of fixed-size blocks: block ``i`` of a text is a node
whose parent is block ``i - 1`` and which holds only the tokens between its parent's stable cut
and its own, so memory grows with the distinct text, not with the texts sharing it
(``flashtoken.AutoPrefixCache`` is the same store in one process, with other token storage and
confirmation). Here a node keeps no copy of the text its tokens spell: it is confirmed by
decoding them, plus the few bytes from its cut to its block's end, so a chain costs about 4 bytes
a token. Both kinds count against one ``max_bytes`` and leave in one least-recently-used order,
leaves first; a kind is only its scope (:class:`PrefixScope`, :class:`ChainScope`), compared on
every match, so a prefix's node can never be taken for a chain's block or the reverse.

Touched only from the daemon's loop thread (fills hand their results back to it), so it has no
lock: a lock would cost every GET and protect nothing the loop does not already serialise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import xxhash

from flashtoken.chains import ChainStore, Decoded, FrameTokens, Node

# Bytes a node costs beyond its token and kept bytes: the Node object, its key (twice: the
# dict's and the node's), its dict slot, its LRU heap pairs (stale ones included, up to four a
# node before ``compact``) and the allocator's rounding. Measured: ~410 bytes of RSS a small
# entry; 512 leaves room for the stale heap pairs. (It was 256, and small entries then cost 2.9x
# the budget in RSS: issue 11.) Fixed, so that accounting is deterministic.
ENTRY_OVERHEAD = 512

# Recent chains remembered, to walk a growing text in O(new blocks): working memory outside
# ``bytes`` (a memo holds a view of the text it was found for), so bounded on its own.
_MEMOS = 16
_MEMO_BYTES = 32 * 1024 * 1024
# New blocks one walk steps through at most (a hash and a lookup each, on the loop thread): the
# rest of a longer text is a miss this time. Without it one AUTO request of 4 MiB in 16-byte
# blocks held the loop for half a second, and lookups of that text 16 bytes shorter (no memo
# matches them) did so again and again (issue 11).
MAX_WALK_BLOCKS = 4096

Decoders = Callable[[str], Callable[[bytes], bytes]]


@dataclass(frozen=True)
class PrefixScope:
    """What a declared prefix's node must share with a GET besides its bytes (``ns``: the
    namespace tag): tenants are kept apart by what is stored, not by the hash alone."""

    enc: str
    allowed: tuple[str, ...]
    ns: bytes


@dataclass(frozen=True)
class ChainScope:
    """The same for a chain block (``seed``: the namespace, encoding, policy and block size)."""

    enc: str
    allowed: tuple[str, ...]
    seed: bytes


class _Memo(NamedTuple):
    seed: bytes
    size: int  # bytes of the whole text the view keeps alive
    prefix: memoryview  # the bytes the path covers (a view of the text it was found for)
    path: list[Node]
    state: Any  # the xxh3 state after the path's last block


class Store:
    """``key -> Node``; ``bytes`` never exceeds ``max_bytes``.

    ``decoders(enc)``: the function that turns a token frame of encoding ``enc`` to its bytes
    (the confirmation of every match). A lookup whose key is present but whose node holds other
    bytes (a hash collision, or a crafted one) is a miss counted in ``collisions_detected``. The
    node already there is kept: replacing it would let anyone who can craft collisions evict
    another tenant's hot prefix at will. The colliding text is simply not cached until LRU
    retires the other one.
    """

    def __init__(
        self, max_bytes: int, decoders: Decoders, *, debug_key_bytes: int | None = None
    ) -> None:
        self.chains = ChainStore(
            max_bytes,
            FrameTokens(),
            Decoded(lambda scope: decoders(scope.enc), b"".join),  # type: ignore[attr-defined]
            overhead=ENTRY_OVERHEAD,
            on_remove=self._removed,
        )
        # Test-only (the daemon's hidden --debug-key-bytes): chain keys become the first N bytes
        # of the digest alone, so that blocks of every text, encoding and policy collide.
        self._key_bytes = debug_key_bytes
        self._memos: list[_Memo] = []  # most recent first
        self.blocks = 0  # nodes that belong to a chain (AUTO), as opposed to declared prefixes
        self.total_blocks = 0
        self.cmd_get = self.get_hits = self.get_misses = 0
        self.auto_lookups = self.auto_hits = self.auto_misses = self.auto_hit_bytes = 0

    @property
    def max_bytes(self) -> int:
        return self.chains.max_bytes

    @property
    def used_bytes(self) -> int:
        """``bytes`` in the stats: what the stored nodes count against ``max_bytes``."""
        return self.chains.bytes

    def __len__(self) -> int:
        return len(self.chains)

    def __contains__(self, key: bytes) -> bool:
        return key in self.chains.nodes

    def keys(self) -> list[bytes]:
        """Keys, least recently used first."""
        nodes = self.chains.nodes
        return sorted(nodes, key=lambda k: nodes[k].used)  # type: ignore[arg-type]

    def peek(self, key: bytes) -> Node | None:
        """The node under ``key`` without counting a get or touching the LRU order."""
        return self.chains.nodes.get(key)

    def _removed(self, node: Node) -> None:
        if type(node.scope) is ChainScope:
            self.blocks -= 1

    # -- declared prefixes (GET): chains of one block ------------------------------------------

    def get(self, key: bytes, prefix: bytes, scope: PrefixScope) -> Node | None:
        """The confirmed node for this prefix, or None; counts a get and a hit or a miss."""
        self.cmd_get += 1
        node = self.chains.step(None, key, scope, prefix, 0, len(prefix))
        if node is not None and self.chains.confirm(prefix, [node], 0) == 1:
            self.chains.use(node)
            self.get_hits += 1
            return node
        self.get_misses += 1
        return None

    def prefix_node(
        self, key: bytes, prefix: bytes, scope: PrefixScope, cut: int, cut_byte: int, tokens: bytes
    ) -> Node:
        """A declared prefix's node: its head ``tokens`` spell ``prefix[:cut_byte]``."""
        return self.chains.node(key, None, scope, prefix, 0, len(prefix), cut, cut_byte, tokens)

    def put(self, node: Node) -> bool:
        """Store a declared prefix's node, evicting the least recently used; whether it is held.

        Not stored: a node larger than the whole budget, or one whose key holds another node
        (see the class docstring)."""
        return self.chains.add_root(node)

    def count_hits(self, hits: int) -> None:
        """Count gets served from the host map (by the daemon, or by workers reading it)."""
        self.cmd_get += hits
        self.get_hits += hits

    def count_miss(self) -> None:
        """Count a get answered without a lookup (the daemon refused the prefix's fill before)."""
        self.cmd_get += 1
        self.get_misses += 1

    # -- chains (AUTO, TELL) -----------------------------------------------------------------

    def walk(
        self, seed: bytes, data: bytes, block: int, scope: ChainScope
    ) -> tuple[list[Node], Any]:
        """The confirmed chain of blocks that starts ``data``, and the xxh3 state after it.

        Block ``i`` is found under ``seed + xxh3_128(data[:(i+1)*block])`` and used by the rule
        of every chain (``ChainStore.step``). Starts from the longest remembered chain that
        ``data`` extends, so a growing text pays a memcmp for its old blocks, a hash and a
        lookup for each new one, and one decode for all the new ones together.
        """
        path: list[Node] = []
        state = None
        for memo in self._memos:
            if (
                memo.seed == seed
                and len(memo.path) > len(path)
                and self.chains.holds(memo.path[-1])  # and so, leaves going first, all of it
                and data.startswith(memo.prefix)
            ):
                path, state = memo.path, memo.state
        path = list(path)
        state = xxhash.xxh3_128() if state is None else state.copy()
        known = len(path)
        view = memoryview(data)
        last = min(len(data), (known + MAX_WALK_BLOCKS) * block)
        for end in range((len(path) + 1) * block, last + 1, block):
            before = state.copy()
            state.update(view[end - block : end])
            parent = path[-1] if path else None
            key = self.key(seed, state.digest())
            node = self.chains.step(parent, key, scope, data, end - block, end)
            if node is None:
                state = before
                break
            path.append(node)
        if len(path) > known:
            confirmed = self.chains.confirm(data, path, known)
            if confirmed < len(path):
                del path[confirmed:]
                state = xxhash.xxh3_128(view[: confirmed * block])
        if path:
            self.chains.use(path[-1])
            if len(path) > known:
                self.remember(seed, view, block, path, state)
        return path, state

    def known_after(
        self,
        parent: Node | None,
        seed: bytes,
        digests: list[bytes],
        scope: ChainScope,
        span: bytes,
        start: int,
        first: int,
        block: int,
    ) -> list[Node]:
        """The told blocks ``first ..`` (``digests``) the store holds already after ``parent``,
        confirmed like a walk's; ``span``: the text's bytes from ``start`` on."""
        path = [parent] if parent is not None else []
        for i, digest in enumerate(digests, first):
            node = self.chains.step(
                path[-1] if path else None,
                self.key(seed, digest),
                scope,
                span,
                i * block,
                (i + 1) * block,
                start,
            )
            if node is None:
                break
            path.append(node)
        known = 1 if parent is not None else 0
        confirmed = self.chains.confirm(span, path, known, start)
        return path[known:confirmed]

    def remember(
        self, seed: bytes, view: memoryview, block: int, path: list[Node], state: Any
    ) -> None:
        """Remember ``path`` (found or recorded for ``view``) as a start for the next walk;
        ``state`` is the xxh3 state after its last block."""
        self._memos.insert(
            0, _Memo(seed, view.nbytes, view[: len(path) * block], path, state.copy())
        )
        del self._memos[_MEMOS:]
        total = 0
        for i, memo in enumerate(self._memos):
            total += memo.size
            if total > _MEMO_BYTES:
                del self._memos[i:]
                break

    def count_auto(self, served: int, hit_bytes: int) -> None:
        self.auto_lookups += 1
        if served:
            self.auto_hits += 1
            self.auto_hit_bytes += hit_bytes
        else:
            self.auto_misses += 1

    def put_chain(self, parent: Node | None, nodes: list[Node]) -> list[Node]:
        """Store the new blocks ``nodes`` (each the parent of the next) after ``parent``.

        Stops at the first block that cannot be stored (``ChainStore.add``); returns the blocks
        now in the store along the chain, twins recorded meanwhile by another fill included."""
        stored = self.chains.add(parent, nodes)
        new = sum(a is b for a, b in zip(stored, nodes, strict=False))
        self.blocks += new
        self.total_blocks += new
        return stored

    def key(self, seed: bytes, digest: bytes) -> bytes:
        """The key of a chain block: its seed and digest (see ``walk``)."""
        return seed + digest if self._key_bytes is None else digest[: self._key_bytes]

    def compact(self) -> None:
        """Housekeeping: drop stale LRU heap pairs."""
        self.chains.compact()

    def stats(self) -> dict[str, int]:
        chains = self.chains
        return {
            "cmd_get": self.cmd_get,
            "get_hits": self.get_hits,
            "get_misses": self.get_misses,
            "auto_lookups": self.auto_lookups,
            "auto_hits": self.auto_hits,
            "auto_misses": self.auto_misses,
            "auto_hit_bytes": self.auto_hit_bytes,
            "collisions_detected": chains.collisions,
            "evictions": chains.evictions,
            "curr_items": len(chains),
            "total_items": chains.total_items,
            "blocks": self.blocks,
            "total_blocks": self.total_blocks,
            "items_too_large": chains.too_large,
            "bytes": chains.bytes,
            "limit_maxbytes": chains.max_bytes,
        }
