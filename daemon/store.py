"""The daemon's store: one byte budget of confirmed blocks, declared prefixes and chains alike.

A declared prefix (GET) is a chain of one block: a root ``Entry`` whose bytes are the whole
prefix. Automatic reuse (AUTO) stores chains of fixed-size blocks: block ``i`` of a text is an
``Entry`` whose parent is block ``i - 1`` and which holds only the tokens between its parent's
stable cut and its own, so memory grows with the distinct text, not with the texts sharing it
(flashtoken/auto.py is the same design, in one process). A block keeps no copy of the text its
tokens spell: it is confirmed by decoding them (the tokens are the text, in about as many bytes),
plus the few bytes from its cut to its block's end. So a chain costs about 4 bytes a token.
Both kinds live in one dict, count against one ``max_bytes`` and leave in one least-recently-used
order, leaves first: a block is never evicted while blocks extending it remain (they could no
longer be reached).

Touched only from the daemon's loop thread (fills hand their results back to it), so it has no
lock: a lock would cost every GET and protect nothing the loop does not already serialise.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import xxhash

# Bytes an entry costs beyond its token and prefix bytes: the Entry object, its key (twice: the
# dict's and the entry's), its dict slot, its LRU heap pairs (stale ones included, up to four an
# entry before ``compact``) and the allocator's rounding. Measured: ~410 bytes of RSS a small
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


@dataclass(eq=False)
class Entry:
    """One block: ``tokens`` (little-endian uint32 bytes) are its tokens before ``cut``.

    ``prefix``, ``enc``, ``allowed``, ``ns`` and ``parent`` are kept to confirm a hit: a key
    only locates. ``ns`` is the namespace: a GET's ``namespace_tag``, a chain's seed (which
    the namespace, encoding, policy and block size make): compared, so that tenants are kept
    apart by what is stored, not by the hash alone. For a declared prefix ``prefix`` is its
    bytes and ``cut`` an offset into it in code points. For a chain block ``cut`` /
    ``cut_byte`` are offsets into the whole text, ``tokens`` start at the parent's cut, and
    ``prefix`` holds only the bytes from ``cut_byte`` to the block's end: the bytes before are
    those its tokens decode to.
    """

    __slots__ = (
        "prefix",
        "enc",
        "allowed",
        "tokens",
        "cut",
        "parent",
        "cut_byte",
        "children",
        "used",
        "alive",
        "key",
        "chain",
        "ns",
    )

    prefix: bytes
    enc: str
    allowed: tuple[str, ...]
    tokens: bytes
    cut: int
    parent: Entry | None
    cut_byte: int
    children: int
    used: int
    alive: bool
    key: bytes
    chain: bool
    ns: bytes

    def __init__(
        self,
        prefix: bytes,
        enc: str,
        allowed: tuple[str, ...],
        tokens: bytes,
        cut: int,
        parent: Entry | None = None,
        cut_byte: int = -1,
        ns: bytes = b"",
    ) -> None:
        self.prefix, self.enc, self.allowed, self.tokens, self.cut = (
            prefix,
            enc,
            allowed,
            tokens,
            cut,
        )
        self.parent, self.cut_byte, self.ns = parent, cut_byte, ns
        self.children, self.used, self.alive, self.key, self.chain = 0, 0, False, b"", False

    @property
    def size(self) -> int:
        return len(self.tokens) + len(self.prefix) + ENTRY_OVERHEAD

    def matches(self, prefix: bytes, enc: str, allowed: tuple[str, ...], ns: bytes = b"") -> bool:
        """A declared prefix's confirmation: a root holding exactly these bytes, policy and
        namespace."""
        # enc, allowed and ns first: cheap; the prefix comparison is a memcmp.
        return (
            self.parent is None
            and not self.chain
            and self.enc == enc
            and self.allowed == allowed
            and self.ns == ns
            and self.prefix == prefix
        )

    def extends(
        self,
        parent: Entry | None,
        enc: str,
        allowed: tuple[str, ...],
        data: bytes,
        origin: int,
        end: int,
        ns: bytes = b"",
    ) -> bool:
        """Whether this chain block may follow ``parent`` in a text whose bytes from ``origin``
        on are ``data``, its block ending at ``end``: the same parent, encoding and policy, its
        cut between the parent's and ``end``, and its stored bytes the text's after that cut.
        Its tokens are checked apart (decoded: see ``Store.walk``). ``ns``: the chain's seed."""
        start = parent.cut_byte if parent is not None else 0
        return (
            self.parent is parent
            and self.chain
            and self.enc == enc
            and self.allowed == allowed
            and self.ns == ns
            and start <= self.cut_byte <= end
            and self.prefix == data[self.cut_byte - origin : end - origin]
        )


class _Memo(NamedTuple):
    seed: bytes
    size: int  # bytes of the whole text the view keeps alive
    prefix: memoryview  # the bytes the path covers (a view of the text it was found for)
    path: list[Entry]
    state: Any  # the xxh3 state after the path's last block


class Store:
    """``key -> Entry``; ``bytes`` never exceeds ``max_bytes``.

    A lookup whose key is present but whose entry holds other bytes (a hash collision, or a
    crafted one) is a miss counted in ``collisions_detected``. The entry already there is kept:
    replacing it would let anyone who can craft collisions evict another tenant's hot prefix at
    will. The colliding text is simply not cached until LRU retires the other one.

    >>> store = Store(max_bytes=4096)
    >>> store.put(b"k" * 16, Entry(b"hello", "cl100k_base", (), b"\\x01\\x00\\x00\\x00", 5))
    True
    >>> store.get(b"k" * 16, b"hello", "cl100k_base", ()).cut
    5
    >>> store.get(b"k" * 16, b"hellO", "cl100k_base", ()) is None, store.collisions_detected
    (True, 1)
    """

    def __init__(self, max_bytes: int, *, debug_key_bytes: int | None = None) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        # Test-only (the daemon's hidden --debug-key-bytes): chain keys become the first N bytes
        # of the digest alone, so that blocks of every text, encoding and policy collide.
        self._key_bytes = debug_key_bytes
        self._entries: dict[bytes, Entry] = {}
        # Eviction candidates: (used, key) of leaves, in a heap invalidated lazily (an entry
        # used again, given a child, or gone leaves a stale pair behind).
        self._leaves: list[tuple[int, bytes]] = []
        self._tick = 0
        self._memos: list[_Memo] = []  # most recent first
        self.bytes = 0
        self.blocks = 0  # entries that belong to a chain (AUTO), as opposed to declared prefixes
        self.cmd_get = self.get_hits = self.get_misses = 0
        self.collisions_detected = self.evictions = self.total_items = self.items_too_large = 0
        self.auto_lookups = self.auto_hits = self.auto_misses = self.auto_hit_bytes = 0
        self.total_blocks = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def keys(self) -> list[bytes]:
        """Keys, least recently used first."""
        return sorted(self._entries, key=lambda k: self._entries[k].used)

    def peek(self, key: bytes) -> Entry | None:
        """The entry under ``key`` without counting a get or touching the LRU order."""
        return self._entries.get(key)

    # -- declared prefixes (GET) ------------------------------------------------------------------

    def get(
        self, key: bytes, prefix: bytes, enc: str, allowed: tuple[str, ...], ns: bytes = b""
    ) -> Entry | None:
        """The confirmed entry for this prefix, or None; counts a get and a hit or a miss."""
        self.cmd_get += 1
        entry = self._entries.get(key)
        if entry is not None:
            if entry.matches(prefix, enc, allowed, ns):
                self._use(entry)
                self.get_hits += 1
                return entry
            self.collisions_detected += 1
        self.get_misses += 1
        return None

    def count_hits(self, hits: int) -> None:
        """Count gets served from the host map (by the daemon, or by workers reading it)."""
        self.cmd_get += hits
        self.get_hits += hits

    def count_miss(self) -> None:
        """Count a get answered without a lookup (the daemon refused the prefix's fill before)."""
        self.cmd_get += 1
        self.get_misses += 1

    def put(self, key: bytes, entry: Entry) -> bool:
        """Store a declared prefix's ``entry``, evicting the least recently used; False if not.

        Not stored: an entry larger than the whole budget, or one whose key holds another
        prefix's entry (see the class docstring), or a block other blocks extend.
        """
        if entry.size > self.max_bytes:
            self.items_too_large += 1
            return False
        old = self._entries.get(key)
        if old is not None:
            if not old.matches(entry.prefix, entry.enc, entry.allowed, entry.ns) or old.children:
                return False
            self._remove(old)
        return self._insert(key, entry)

    # -- chains (AUTO) --------------------------------------------------------------------------

    def walk(
        self,
        seed: bytes,
        data: bytes,
        block: int,
        enc: str,
        allowed: tuple[str, ...],
        decode: Callable[[bytes], bytes],
    ) -> tuple[list[Entry], Any]:
        """The confirmed chain of blocks that starts ``data``, and the xxh3 state after it.

        Block ``i`` is found under ``seed + xxh3_128(data[:(i+1)*block])`` and confirmed by its
        parent (so every earlier block matched), its encoding and policy, and the bytes: from
        the parent's cut to its own, those its tokens spell (``decode``: a token frame to
        bytes), then its stored tail. Starts from the longest remembered chain that ``data``
        extends, so a growing text pays a memcmp for its old blocks, a hash and a lookup for each
        new one, and one decode for all the new ones together (block by block only if that
        fails: a collision).
        """
        path: list[Entry] = []
        state = None
        for memo in self._memos:
            if (
                memo.seed == seed
                and len(memo.path) > len(path)
                and memo.path[-1].alive
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
            node = self._entries.get(self._key(seed, state.digest()))
            if node is not None:
                if node.extends(path[-1] if path else None, enc, allowed, data, 0, end, seed):
                    path.append(node)
                    continue
                self.collisions_detected += 1
            state = before
            break
        if len(path) > known:
            confirmed = self._confirm(data, path, known, decode)
            if confirmed < len(path):
                self.collisions_detected += 1
                del path[confirmed:]
                state = xxhash.xxh3_128(view[: confirmed * block])
        if path:
            self._use(path[-1])
            if len(path) > known:
                self.remember(seed, view, block, path, state)
        return path, state

    @staticmethod
    def _confirm(
        data: bytes, path: list[Entry], known: int, decode: Callable[[bytes], bytes]
    ) -> int:
        """How many blocks of ``path`` are confirmed, given its first ``known``: the tokens of
        the others must spell ``data`` up to each one's cut."""
        start = path[known - 1].cut_byte if known else 0
        if decode(b"".join([e.tokens for e in path[known:]])) == data[start : path[-1].cut_byte]:
            return len(path)
        for i in range(known, len(path)):  # which one fails
            if decode(path[i].tokens) != data[start : path[i].cut_byte]:
                return i
            start = path[i].cut_byte
        return len(path)  # unreachable: the joined tokens would have spelled the bytes

    def remember(
        self, seed: bytes, view: memoryview, block: int, path: list[Entry], state: Any
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

    def put_chain(self, seed: bytes, digests: list[bytes], entries: list[Entry]) -> list[Entry]:
        """Store the new blocks ``entries`` (each the parent of the next) under ``seed + digest``.

        Stops at the first block that cannot be stored: its key holds another block (a twin
        recorded meanwhile is followed instead), its parent has been evicted, or it does not fit.
        Returns the blocks now in the store along the chain, twins included.
        """
        stored: list[Entry] = []
        for digest, entry in zip(digests, entries, strict=False):
            key = self._key(seed, digest)
            parent = stored[-1] if stored else entry.parent
            entry.parent = parent
            if parent is not None and not parent.alive:
                break
            old = self._entries.get(key)
            if old is not None:
                if (
                    old.parent is parent
                    and old.chain
                    and old.cut_byte == entry.cut_byte
                    and old.prefix == entry.prefix
                    and old.tokens == entry.tokens
                    and old.enc == entry.enc
                    and old.allowed == entry.allowed
                    and old.ns == entry.ns
                ):
                    stored.append(old)  # recorded meanwhile by another fill: the same block
                    continue
                break
            if entry.size > self.max_bytes:
                self.items_too_large += 1
                break
            entry.chain = True
            if parent is not None:
                parent.children += 1  # reserved first: eviction to make room must spare it
            if not self._insert(key, entry):
                if parent is not None:
                    self._release(parent)
                break
            self.blocks += 1
            self.total_blocks += 1
            stored.append(entry)
        return stored

    def key(self, seed: bytes, digest: bytes) -> bytes:
        """The key of a chain block: its seed and digest (see ``walk``)."""
        return self._key(seed, digest)

    def _key(self, seed: bytes, digest: bytes) -> bytes:
        return seed + digest if self._key_bytes is None else digest[: self._key_bytes]

    # -- LRU and budget -------------------------------------------------------------------------

    def _use(self, entry: Entry) -> None:
        self._tick += 1
        entry.used = self._tick
        if not entry.children:
            heapq.heappush(self._leaves, (entry.used, entry.key))

    def _insert(self, key: bytes, entry: Entry) -> bool:
        size = entry.size
        while self.bytes + size > self.max_bytes:
            if not self._evict_one():
                return False
        entry.key, entry.alive = key, True
        self._entries[key] = entry
        self.bytes += size
        self.total_items += 1
        self._use(entry)
        return True

    def _evict_one(self) -> bool:
        while self._leaves:
            used, key = heapq.heappop(self._leaves)
            entry = self._entries.get(key)
            if entry is None or entry.used != used or entry.children:
                continue  # a stale pair
            self._remove(entry)
            self.evictions += 1
            return True
        return False

    def _remove(self, entry: Entry) -> None:
        del self._entries[entry.key]
        entry.alive = False
        self.bytes -= entry.size
        if entry.chain:
            self.blocks -= 1
        if entry.parent is not None:
            self._release(entry.parent)

    def _release(self, parent: Entry) -> None:
        parent.children -= 1
        if not parent.children and parent.alive:
            heapq.heappush(self._leaves, (parent.used, parent.key))

    def compact(self) -> None:
        """Drop stale heap pairs when they outnumber the entries (housekeeping)."""
        if len(self._leaves) > 4 * len(self._entries) + 64:
            self._leaves = [(e.used, k) for k, e in self._entries.items() if not e.children]
            heapq.heapify(self._leaves)

    def stats(self) -> dict[str, int]:
        return {
            "cmd_get": self.cmd_get,
            "get_hits": self.get_hits,
            "get_misses": self.get_misses,
            "auto_lookups": self.auto_lookups,
            "auto_hits": self.auto_hits,
            "auto_misses": self.auto_misses,
            "auto_hit_bytes": self.auto_hit_bytes,
            "collisions_detected": self.collisions_detected,
            "evictions": self.evictions,
            "curr_items": len(self._entries),
            "total_items": self.total_items,
            "blocks": self.blocks,
            "total_blocks": self.total_blocks,
            "items_too_large": self.items_too_large,
            "bytes": self.bytes,
            "limit_maxbytes": self.max_bytes,
        }
