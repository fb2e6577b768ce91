"""AutoPrefixCache: reuse the longest cached prefix of any text, with no prefix declared.

The UTF-8 bytes of each text are cut into fixed-size blocks. Block ``i`` is known by the xxh3-128
digest of all the bytes up to its end (the streaming digest, so the chain costs one pass over
the text) and stores only the tokens between its parent's stable cut and its own: memory grows
with the distinct text, not with the number of texts that share it. A lookup walks the blocks
from the start while they are cached, confirms each one by comparing its bytes (a digest locates
an entry, it never proves one), joins the tokens along the path, and encodes the rest of the text
in one tiktoken call. The blocks that were not cached are then recorded from that same call.

A declared prefix is the one-block case of this store, and the daemon keeps the same chains for
many processes (docs/ALGORITHM.md, "Automatic reuse").
"""

from __future__ import annotations

import bisect
import collections
import heapq
import itertools
import threading
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import tiktoken

from flashtoken.boundary import CutRule, cut_rule, stable_offset
from flashtoken.encodings import resolve_encoding
from flashtoken.prefix import EncodingLike, _encode, _require_str
from flashtoken.specials import SpecialArg, SpecialPolicy

DEFAULT_BLOCK_BYTES = 512
DEFAULT_MAX_BYTES = 64 * 2**20
_NODE_OVERHEAD = 160  # bytes a node costs beyond its block and token pointers (measured, rounded)


class _Node:
    """One block of one chain."""

    __slots__ = ("key", "parent", "block", "cut", "cut_byte", "tokens", "children", "used")

    def __init__(self, key, parent, block, cut, cut_byte, tokens, used):  # type: ignore[no-untyped-def]
        self.key: tuple[frozenset[str], int] = key
        self.parent: _Node | None = parent
        self.block: bytes = block  # this block's bytes, to confirm a digest match
        self.cut: int = cut  # stable cut, as an offset into the text (characters)
        self.cut_byte: int = cut_byte  # the same cut in UTF-8 bytes
        self.tokens: list[int] = tokens  # the tokens between the parent's cut and this one
        self.children = 0
        self.used = used  # when a lookup last ended here (a tick)


class _Memo(NamedTuple):
    """The last lookup of a policy: most texts extend the previous one (a growing chat)."""

    data: bytes
    path: list[_Node]
    state: object  # the xxh3 state after the path's last block
    evictions: int  # the eviction count then: unchanged means every node of path is still in


class _Plan(NamedTuple):
    """What a lookup found: the path of cached blocks that start ``data`` and its cut."""

    data: bytes  # the text's UTF-8
    path: list[_Node]
    digests: list[int]  # of every full block of data
    state: object  # the xxh3 state after the last full block
    cut: int  # path[-1].cut (characters), 0 for an empty path
    cut_byte: int  # the same in bytes


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
) -> list[tuple[int, int, int]]:
    """The stable cuts of blocks ``first .. stop-1`` of ``data`` (``text`` as UTF-8).

    ``start`` / ``start_byte`` is the cut of block ``first - 1`` (0 for the first block) and
    ``tail`` the tokens tiktoken gives ``text[start:]`` within the whole text. Returns one
    ``(cut, cut_byte, n)`` per block, ``n`` the number of ``tail`` tokens before its cut; it
    stops early at a cut that is no token boundary of ``tail`` (only a wrong split could make
    one) and at the first token whose byte length is ambiguous. A block's cut is computed as if
    the text ended at the block's end, so it depends only on ``text[start:block end]``: the
    in-process cache and the daemon (daemon/server.py) share this function and so agree.
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
        block_end = (i + 1) * block
        aligned = block_end
        while aligned < len(data) and aligned > mark and data[aligned] & 0xC0 == 0x80:
            aligned -= 1  # a block may end inside a character; the cut stays before it
        chars += len(data[mark:aligned].decode("utf-8"))
        mark = aligned
        cut = stable_offset(rule, policy, text, start, chars)
        cut_byte = start_byte + len(text[start:cut].encode("utf-8"))
        n = bisect.bisect_left(ends, cut_byte - base) + 1 if cut_byte > base else 0
        if n and (n > len(ends) or ends[n - 1] != cut_byte - base):
            break  # not a token boundary: only a wrong split could do that; record no more
        out.append((cut, cut_byte, n))
        start, start_byte = cut, cut_byte
    return out


class AutoPrefixCache:
    """Encodes any text exactly as tiktoken does, reusing the longest cached prefix it has seen.

    >>> cache = AutoPrefixCache("cl100k_base", block_bytes=64)
    >>> history = "system: be brief.\\n" * 20
    >>> cache.encode_ordinary(history + "user: hi\\nassistant:") == cache.encoding.encode_ordinary(
    ...     history + "user: hi\\nassistant:")
    True
    >>> cache.encode_ordinary(history + "user: hello again\\nassistant:")[:3]
    [9125, 25, 387]
    >>> cache.stats()["reused_bytes"] > 0
    True

    ``max_bytes`` bounds the memory of the stored blocks (least recently used blocks go first,
    never a block before the blocks that extend it); ``block_bytes`` is the reuse granularity.
    Safe to share between threads.
    """

    def __init__(
        self,
        encoding: EncodingLike,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        backtrack_pieces: int | None = None,
    ) -> None:
        import xxhash  # here, not at the top: `import flashtoken` stays light

        if not isinstance(block_bytes, int) or block_bytes < 16:
            raise ValueError(f"block_bytes must be an int >= 16, not {block_bytes!r}")
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, not {max_bytes!r}")
        self._enc = resolve_encoding(encoding)
        self._rule = cut_rule(self._enc._pat_str, backtrack_pieces)
        self._hasher = xxhash.xxh3_128
        self._block = block_bytes
        self._max_bytes = max_bytes
        self._lengths = token_byte_lengths(self._enc)
        self._nodes: dict[tuple[frozenset[str], int], _Node] = {}
        # Eviction takes the least recently used *leaf*: a block is never evicted while blocks
        # extending it remain. Candidates sit in a heap of (used, key), invalidated lazily.
        self._leaves: list[tuple[int, tuple[frozenset[str], int]]] = []
        self._memos: dict[frozenset[str], _Memo] = {}
        self._tick = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self._counts = collections.Counter[str]()

    @property
    def encoding(self) -> tiktoken.Encoding:
        return self._enc

    def encode_ordinary(self, text: str) -> list[int]:
        """``encoding.encode_ordinary(text)``, reusing the longest cached prefix of ``text``."""
        _require_str(text, "text")
        return self._encode(text, SpecialPolicy(frozenset(), frozenset()))

    def encode(
        self,
        text: str,
        *,
        allowed_special: SpecialArg = frozenset(),
        disallowed_special: SpecialArg = "all",
    ) -> list[int]:
        """``encoding.encode(text, allowed_special=..., disallowed_special=...)``, reusing the
        longest prefix cached under the same allowed special tokens.

        Raises tiktoken's own ValueError if ``text`` holds a disallowed special token.
        """
        _require_str(text, "text")
        policy = SpecialPolicy.of(self._enc, allowed_special, disallowed_special)
        if policy.finds_disallowed(text):
            return self._enc.encode(
                text, allowed_special=allowed_special, disallowed_special=disallowed_special
            )
        return self._encode(text, policy)

    def stats(self) -> dict[str, int]:
        """Counters (``lookups``, ``reused_bytes``, ``encoded_bytes``, ``blocks_added``,
        ``evictions``) and the store's size (``curr_items``, ``bytes``, ``limit_maxbytes``)."""
        with self._lock:
            return {
                **{k: self._counts[k] for k in ("lookups", "reused_bytes", "encoded_bytes")},
                **{k: self._counts[k] for k in ("blocks_added", "evictions")},
                "curr_items": len(self._nodes),
                "bytes": self._bytes,
                "limit_maxbytes": self._max_bytes,
            }

    def _encode(self, text: str, policy: SpecialPolicy) -> list[int]:
        plan = self._plan(text, policy)
        if plan is None:  # lone surrogates: rare; tiktoken repairs them, we step aside
            return _encode(self._enc, text, policy)
        head = self._head(plan)
        tail = _encode(self._enc, text[plan.cut :], policy)
        self._finish(plan, policy, text, tail)
        head += tail  # not head + tail: one copy of the prefix's tokens, not two
        return head

    # The three steps of a lookup, apart, so that the daemon's client can ask the shared store
    # for the blocks after ``plan.path`` between them (flashtoken.client).

    def _plan(self, text: str, policy: SpecialPolicy) -> _Plan | None:
        """The longest cached path for ``text``; None if ``text`` is not UTF-8 (surrogates)."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            return None
        with self._lock:
            path, digests, state = self._longest_path(policy.allowed, data)
            if path:
                self._use(path[-1])
        last = path[-1] if path else None
        cut, cut_byte = (last.cut, last.cut_byte) if last else (0, 0)
        return _Plan(data, path, digests, state, cut, cut_byte)

    @staticmethod
    def _head(plan: _Plan) -> list[int]:
        """A new list of the tokens along ``plan.path`` (those of ``text[:plan.cut]``)."""
        head: list[int] = []
        for node in plan.path:
            head += node.tokens
        return head

    def _finish(self, plan: _Plan, policy: SpecialPolicy, text: str, tail: list[int]) -> None:
        """Record the blocks after ``plan.path``; ``tail`` are the tokens of ``text[plan.cut:]``."""
        self._record(policy, text, plan.data, plan.digests, plan.path, tail, plan.state)
        with self._lock:
            self._counts.update(
                lookups=1, reused_bytes=plan.cut_byte, encoded_bytes=len(plan.data) - plan.cut_byte
            )

    def _longest_path(
        self, allowed: frozenset[str], data: bytes
    ) -> tuple[list[_Node], list[int], object]:
        """The cached blocks that start ``data``, the digests of all its full blocks, and the
        digest state after the last of them.

        Starts from the previous lookup's path when ``data`` extends it, so a growing text pays
        per block only for its new blocks (and one memcmp for the rest).
        """
        size = self._block
        memo = self._memos.get(allowed)
        if (
            memo is not None
            and memo.evictions == self._counts["evictions"]
            and data.startswith(memoryview(memo.data)[: len(memo.path) * size])
        ):
            path = list(memo.path)
            state = memo.state.copy()  # type: ignore[attr-defined]
        else:
            path, state = [], self._hasher()
        digests = [node.key[1] for node in path]
        view = memoryview(data)
        matching = True
        for end in range((len(path) + 1) * size, len(data) + 1, size):
            state.update(view[end - size : end])
            digest = state.intdigest()
            digests.append(digest)
            if matching:
                node = self._nodes.get((allowed, digest))
                # Confirm: the same parent (so every earlier block matched) and the same bytes.
                parent = path[-1] if path else None
                if (
                    node is None
                    or node.parent is not parent
                    or node.block != view[end - size : end]
                ):
                    matching = False
                    continue
                path.append(node)
        return path, digests, state

    def _use(self, node: _Node) -> None:
        self._tick += 1
        node.used = self._tick
        if not node.children:
            heapq.heappush(self._leaves, (node.used, node.key))

    def _record(
        self,
        policy: SpecialPolicy,
        text: str,
        data: bytes,
        digests: list[int],
        path: list[_Node],
        tail: list[int],
        state: object,
    ) -> None:
        """Add the blocks after ``path``; ``tail`` are the tokens of the text after its cut.

        ``state`` is the digest state after the last full block: when every block gets stored,
        the next lookup can start from this one (the memo).
        """
        parent = path[-1] if path else None
        start, start_byte = (parent.cut, parent.cut_byte) if parent else (0, 0)
        cuts = block_cuts(
            self._rule,
            policy,
            self._lengths,
            text,
            data,
            self._block,
            len(path),
            len(digests),
            start,
            start_byte,
            tail,
        )
        added: list[_Node] = []
        taken = 0  # tokens of ``tail`` already given to a block
        for i, (cut, cut_byte, n) in enumerate(cuts, len(path)):
            block = data[i * self._block : (i + 1) * self._block]
            node = _Node(
                (policy.allowed, digests[i]), parent, block, cut, cut_byte, tail[taken:n], 0
            )
            added.append(node)
            parent, taken = node, n
        with self._lock:
            stored = 0
            for node in added:
                if node.key in self._nodes:  # a concurrent twin or a collision: keep the first
                    break
                if node.parent is not None and self._nodes.get(node.parent.key) is not node.parent:
                    break  # the parent was evicted meanwhile: this chain cannot be reached
                self._nodes[node.key] = node
                self._bytes += _size(node)
                self._counts["blocks_added"] += 1
                if node.parent is not None:
                    node.parent.children += 1
                self._use(node)
                stored += 1
            self._evict()
            if len(path) + stored == len(digests):
                self._memos[policy.allowed] = _Memo(
                    data, path + added, state, self._counts["evictions"]
                )

    def _evict(self) -> None:
        while self._bytes > self._max_bytes and self._leaves:
            used, key = heapq.heappop(self._leaves)
            node = self._nodes.get(key)
            if node is None or node.used != used or node.children:
                continue  # a stale heap entry
            del self._nodes[key]
            self._bytes -= _size(node)
            self._counts["evictions"] += 1
            parent = node.parent
            if parent is not None and self._nodes.get(parent.key) is parent:
                parent.children -= 1
                if not parent.children:
                    heapq.heappush(self._leaves, (parent.used, parent.key))
        if len(self._leaves) > 4 * len(self._nodes) + 64:  # drop the stale entries
            self._leaves = [(n.used, k) for k, n in self._nodes.items() if not n.children]
            heapq.heapify(self._leaves)


def _size(node: _Node) -> int:
    return len(node.block) + 8 * len(node.tokens) + _NODE_OVERHEAD


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
        for token, rank in enc._mergeable_ranks.items():
            lengths[rank] = len(token)
        for special, rank in enc._special_tokens.items():
            size = len(special.encode("utf-8"))
            lengths[rank] = size if lengths[rank] in (0, size) else AMBIGUOUS
        _lengths_cache[enc] = lengths
    return lengths
