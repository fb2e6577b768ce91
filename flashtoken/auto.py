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
import os
import threading
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import tiktoken

from flashtoken import tiktoken_parts
from flashtoken.backends import Encoder, get_encoder
from flashtoken.boundary import CutRule, cut_rule, stable_offset
from flashtoken.encodings import resolve_encoding
from flashtoken.prefix import EncodingLike, token_list
from flashtoken.specials import ORDINARY, SpecialArg, SpecialPolicy, encode_with
from flashtoken.text import require_str

DEFAULT_BLOCK_BYTES = 512
DEFAULT_MAX_BYTES = 64 * 2**20
# Where this process takes blocks encoded elsewhere (``_adopt``): after the last blocks of its
# own lookups, and after blocks taken so. Not after an earlier block: a system prompt that starts
# every chat would make every process take every chat.
_FRONTIER_BLOCKS = 16

MAX_UNCUT_BLOCKS = 8
"""A chain ends where its last cut lies this many blocks behind the block's end.

Each block's cut is found by scanning the text from the previous cut as if the text ended at the
block's end (so it depends on those bytes alone). Inside one regex piece that does not end (a
run of spaces, of newlines, of one letter) the cut cannot advance, and every block would rescan
the whole run: 27 s for 500k newlines against 0.18 s for tiktoken. Capping the scan keeps block
cuts linear in the text; ordinary text cuts within a block or two, and the text after such a
run is encoded (exactly) but not cached."""
_FRONTIER_MAX = 8192
_NODE_OVERHEAD = 160  # bytes a node costs beyond its block and token pointers (measured, rounded)


class _Node:
    """One block of one chain."""

    __slots__ = ("key", "parent", "block", "cut", "cut_byte", "tokens", "children", "used")

    def __init__(self, key, parent, block, cut, cut_byte, tokens, used):
        self.key: tuple[frozenset[str], int] = key
        self.parent: _Node | None = parent
        self.block: bytes = block  # this block's bytes, to confirm a digest match
        self.cut: int = cut  # stable cut, as an offset into the text (characters)
        self.cut_byte: int = cut_byte  # the same cut in UTF-8 bytes
        self.tokens: list[int] = tokens  # the tokens between the parent's cut and this one
        self.children = 0
        self.used = used  # when a lookup last ended here (a tick)


class _Memo(NamedTuple):
    """The last path of a policy, its tokens joined: most texts extend the previous one (a
    growing chat) or share all but its last blocks (a rewritten tail), and then a lookup costs a
    memcmp and one list copy, not a step per block."""

    data: bytes
    path: list[_Node]
    digests: list[int]  # of path's blocks
    ends: list[int]  # ends[i]: how many tokens path[: i + 1] holds
    head: list[int]  # path's tokens, joined (never handed out; may run on past ends[-1])
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
    memo: _Memo | None  # the memo path begins with ...
    shared: int  # ... for this many blocks


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
    in-process cache and the daemon (daemon/server.py) share this function and so agree.

    ``origin`` is where ``data`` starts in the whole text, in bytes (a stable cut, so ``text``
    starts there too): blocks computed elsewhere are checked from the bytes after their parent's
    cut alone (``AutoPrefixCache._adopt``). Offsets in and out are relative to it.
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
    never a block before the blocks that extend it); ``block_bytes`` is the reuse granularity;
    ``backend`` encodes the part not found cached (see :class:`FixedPrefixTokenCache`).
    Safe to share between threads.
    """

    def __init__(
        self,
        encoding: EncodingLike,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        backtrack_pieces: int | None = None,
        backend: str | Encoder = "tiktoken",
    ) -> None:
        import xxhash  # here, not at the top: `import flashtoken` stays light

        if not isinstance(block_bytes, int) or block_bytes < 16:
            raise ValueError(f"block_bytes must be an int >= 16, not {block_bytes!r}")
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, not {max_bytes!r}")
        self._enc = resolve_encoding(encoding)
        self._encoder = get_encoder(self._enc, backend)  # encodes what is not found cached
        self._rule = cut_rule(self._enc, backtrack_pieces)
        self._hasher = xxhash.xxh3_128
        self._block = block_bytes
        self._max_bytes = max_bytes
        self._lengths = token_byte_lengths(self._enc)
        self._lock = threading.Lock()
        self._counts = collections.Counter[str]()
        self._forbidden_ids: dict[frozenset[str], frozenset[int]] = {}
        self._empty()
        _live.add(self)

    def _empty(self) -> None:
        self._nodes: dict[tuple[frozenset[str], int], _Node] = {}
        # Eviction takes the least recently used *leaf*: a block is never evicted while blocks
        # extending it remain. Candidates sit in a heap of (used, key), invalidated lazily.
        self._leaves: list[tuple[int, tuple[frozenset[str], int]]] = []
        self._memos: dict[frozenset[str], _Memo] = {}
        self._tick = 0
        self._bytes = 0
        self._frontier: collections.OrderedDict[tuple[frozenset[str], int], None] = (
            collections.OrderedDict()
        )

    def _after_fork(self) -> None:
        """In a forked child (``os.register_at_fork``, before any code of the child runs).

        The parent's threads are gone, but a lock one of them held at the fork is still held:
        it is made anew, never waited on (a pid check at the start of a call would come too
        late, as the call takes the lock first). A lock held means a parent's thread was half
        way through an update, so the store is emptied too (it refills; an id never depends on
        what it held). Rejected: taking every lock before the fork (``before=``), which would
        make ``fork()`` wait on the parent's lookups and deadlock if the forking thread held one.
        """
        held = self._lock.locked()
        self._lock = threading.Lock()
        if held:
            self._empty()

    @property
    def encoding(self) -> tiktoken.Encoding:
        return self._enc

    def encode_ordinary(self, text: str) -> list[int]:
        """``encoding.encode_ordinary(text)``, reusing the longest cached prefix of ``text``."""
        require_str(text, "text")
        return self._encode(text, ORDINARY)

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
        require_str(text, "text")
        policy = SpecialPolicy.parse(self._enc, allowed_special, disallowed_special)
        if policy is None or policy.finds_disallowed(text):
            return self._enc.encode(
                text,
                allowed_special=allowed_special,  # type: ignore[arg-type]
                disallowed_special=disallowed_special,
            )
        return self._encode(text, policy)

    def stats(self) -> dict[str, int]:
        """Counters (``lookups``, ``reused_bytes``, ``encoded_bytes``, ``blocks_added``,
        ``blocks_adopted`` (of those, blocks another process encoded), ``blocks_refused``
        (published blocks that failed a check), ``evictions``) and the store's size
        (``curr_items``, ``bytes``, ``limit_maxbytes``)."""
        with self._lock:
            return {
                **{k: self._counts[k] for k in ("lookups", "reused_bytes", "encoded_bytes")},
                **{
                    k: self._counts[k] for k in ("blocks_added", "blocks_adopted", "blocks_refused")
                },
                "evictions": self._counts["evictions"],
                "curr_items": len(self._nodes),
                "bytes": self._bytes,
                "limit_maxbytes": self._max_bytes,
            }

    def _encode(self, text: str, policy: SpecialPolicy) -> list[int]:
        plan = self._plan(text, policy)
        if plan is None:  # lone surrogates (tiktoken repairs them) or no proof: step aside
            return encode_with(self._encoder, text, policy)
        head = self._head(plan)
        tail = encode_with(self._encoder, text[plan.cut :], policy)
        self._finish(plan, policy, text, tail)
        head += tail  # not head + tail: one copy of the prefix's tokens, not two
        return head

    # The three steps of a lookup, apart, so that the daemon's client can ask the shared store
    # for the blocks after ``plan.path`` between them (flashtoken.client).

    def _plan(self, text: str, policy: SpecialPolicy) -> _Plan | None:
        """The longest cached path for ``text``; None if ``text`` is not UTF-8 (surrogates) or
        the encoding's pattern has no proof (then nothing is cached: encode the whole text)."""
        if not self._rule.proven:
            return None
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            return None
        with self._lock:
            plan = self._longest_path(policy.allowed, data)
            if plan.path:
                self._use(plan.path[-1])
        return plan

    @staticmethod
    def _head(plan: _Plan) -> list[int]:
        """A new list of the tokens along ``plan.path`` (those of ``text[:plan.cut]``)."""
        memo, shared = plan.memo, plan.shared
        head = memo.head[: memo.ends[shared - 1]] if memo is not None and shared else []
        for node in plan.path[shared:]:
            head += node.tokens
        return head

    def _finish(self, plan: _Plan, policy: SpecialPolicy, text: str, tail: list[int]) -> None:
        """Record the blocks after ``plan.path``; ``tail`` are the tokens of ``text[plan.cut:]``."""
        self._record(policy, text, plan, tail)
        with self._lock:
            self._counts.update(
                lookups=1, reused_bytes=plan.cut_byte, encoded_bytes=len(plan.data) - plan.cut_byte
            )

    def _longest_path(self, allowed: frozenset[str], data: bytes) -> _Plan:
        """The cached blocks that start ``data``, the digests of all its full blocks, and the
        digest state after the last of them.

        Starts from the blocks ``data`` shares with the previous lookup's path, so a growing
        text pays per block only for its new blocks (and a few memcmps for the rest).
        """
        size = self._block
        view = memoryview(data)
        memo = self._memos.get(allowed)
        shared = 0
        if memo is not None and memo.evictions == self._counts["evictions"]:
            shared = _shared_blocks(data, memoryview(memo.data), len(memo.path), size)
        if memo is not None and shared:
            path, digests = memo.path[:shared], memo.digests[:shared]
            if shared == len(memo.path):
                state = memo.state.copy()  # type: ignore[attr-defined]
            else:
                state = self._hasher(view[: shared * size])
        else:
            path, digests, state = [], [], self._hasher()
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
                    or node.block != data[end - size : end]
                ):
                    matching = False
                    continue
                path.append(node)
        last = path[-1] if path else None
        cut, cut_byte = (last.cut, last.cut_byte) if last else (0, 0)
        return _Plan(data, path, digests, state, cut, cut_byte, memo, shared)

    def _use(self, node: _Node) -> None:
        self._tick += 1
        node.used = self._tick
        if not node.children:
            heapq.heappush(self._leaves, (node.used, node.key))

    def _record(self, policy: SpecialPolicy, text: str, plan: _Plan, tail: list[int]) -> None:
        """Add the blocks after ``plan.path``; ``tail`` are the tokens of the text after its
        cut. When every block gets stored, the next lookup starts from this path (the memo).
        """
        data, digests, path = plan.data, plan.digests, plan.path
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
            # Shared int objects: 8 bytes a token, and a later join touches fewer cache lines.
            tokens = token_list(tail[taken:n])
            node = _Node((policy.allowed, digests[i]), parent, block, cut, cut_byte, tokens, 0)
            added.append(node)
            parent, taken = node, n
        with self._lock:
            chain = self._store(added)
            if len(path) + len(chain) == len(digests):
                self._memos[policy.allowed] = self._next_memo(plan, chain)
            ends = chain[-_FRONTIER_BLOCKS:]
            self._follow(path[max(0, len(path) - (_FRONTIER_BLOCKS - len(ends))) :] + ends)

    def _follow(self, nodes: list[_Node]) -> None:
        """Take blocks encoded elsewhere after these (under the lock; bounded, LRU)."""
        frontier = self._frontier
        for node in nodes:
            frontier[node.key] = None
            frontier.move_to_end(node.key)
        while len(frontier) > _FRONTIER_MAX:
            frontier.popitem(last=False)

    def _next_memo(self, plan: _Plan, chain: list[_Node]) -> _Memo:
        """The memo for ``plan.path + chain`` (under the lock). Its joined tokens extend the
        previous memo's list in place when that list ends where this path leaves it (a growing
        chat): a lookup never pays for joining what the last one joined already."""
        memo, shared = plan.memo, plan.shared
        if memo is not None and shared:
            base = memo.ends[shared - 1]
            head = memo.head if len(memo.head) == base else memo.head[:base]
            ends = memo.ends[:shared]
        else:
            head, ends = [], []
        for node in plan.path[shared:] + chain:
            head += node.tokens  # in place: earlier plans slice only up to their own end
            ends.append(len(head))
        return _Memo(
            plan.data,
            plan.path + chain,
            plan.digests[: len(plan.path) + len(chain)],
            ends,
            head,
            plan.state,
            self._counts["evictions"],
        )

    def _store(self, added: list[_Node]) -> list[_Node]:
        """Insert new nodes (each the parent of the next) under the lock; returns the chain's
        nodes now stored, in order. A node held already (the same block, recorded meanwhile by
        another thread) is followed instead; stops at a collision and at a parent evicted
        meanwhile (the rest could not be reached)."""
        chain: list[_Node] = []
        parent = added[0].parent if added else None
        for node in added:
            if parent is not None and self._nodes.get(parent.key) is not parent:
                break
            twin = self._nodes.get(node.key)
            if twin is not None:
                if (
                    twin.parent is parent
                    and twin.cut_byte == node.cut_byte
                    and twin.block == node.block
                ):
                    chain.append(twin)
                    parent = twin
                    continue
                break  # a collision: keep the first
            node.parent = parent
            self._nodes[node.key] = node
            self._bytes += _size(node)
            self._counts["blocks_added"] += 1
            if parent is not None:
                parent.children += 1
            self._use(node)
            chain.append(node)
            parent = node
        self._evict()
        return chain

    def _adopt(
        self,
        policy: SpecialPolicy,
        first: int,
        parent_digest: int | None,
        start_byte: int,
        digests: list[int],
        ends: list[tuple[int, int]],
        span: bytes,
        tokens: Sequence[int],
    ) -> int:
        """Take blocks ``first ..`` of a chain that another process encoded (the daemon
        publishes them: client/follow.py), checked as strictly as our own; returns how many
        were stored. Blocks of a chain that is not ours (no parent here) are ignored; blocks
        that fail a check count in ``blocks_refused``.

        ``span`` is the text's bytes from the parent's cut ``start_byte`` to past the last
        block's end (to a character boundary); ``ends`` holds each block's ``(cut_byte, n)``,
        ``n`` how many ``tokens`` come before its cut. Stored only if the parent block is ours
        and its bytes agree with ``span``, every cut is the one ``block_cuts`` computes from
        ``span``, the tokens spell ``span`` up to the last cut, and none is a special token the
        policy does not allow. So a wrong, stale or colliding publisher can cost a block, never
        a token. Only blocks that extend this process's own recent chains are taken (its
        lookups' last blocks, and blocks taken so): not other chats that share a system prompt.
        """
        with self._lock:
            if digests and (policy.allowed, digests[-1]) in self._nodes:
                return 0  # held already (our own blocks, published back to us): nothing new
            if parent_digest is not None:
                parent = self._nodes.get((policy.allowed, parent_digest))
                if parent is None or parent.key not in self._frontier:
                    return 0  # a chain this process does not hold, or does not follow
            elif not self._follows_from_root(policy.allowed, digests):
                return 0
            else:
                parent = None
        try:  # only now, for blocks this process takes: shared ints (8 bytes a token)
            held = token_list(tokens)
        except ValueError:  # an id no encoding has
            held = None
        added = (
            None
            if held is None
            else self._check_adopted(policy, first, parent, start_byte, digests, ends, span, held)
        )
        with self._lock:
            if added is None:
                self._counts["blocks_refused"] += len(ends)
                return 0
            if parent is not None and self._nodes.get(parent.key) is not parent:
                return 0  # evicted meanwhile
            new = [a for a, b in zip(self._store(added), added, strict=False) if a is b]
            self._counts["blocks_adopted"] += len(new)
            self._follow(new)
        return len(new)

    def _follows_from_root(self, allowed: frozenset[str], digests: list[int]) -> bool:
        """Whether a chain published from its first block extends one this process follows:
        its first blocks are ours, and the last of them is on the frontier (under the lock)."""
        last = None
        for digest in digests:
            node = self._nodes.get((allowed, digest))
            if node is None or node.parent is not last:
                break
            last = node
        else:
            return False  # every block is here already
        return last is not None and last.key in self._frontier

    def _check_adopted(
        self,
        policy: SpecialPolicy,
        first: int,
        parent: _Node | None,
        start_byte: int,
        digests: list[int],
        ends: list[tuple[int, int]],
        span: bytes,
        tokens: list[int],
    ) -> list[_Node] | None:
        """The nodes of ``_adopt``'s blocks, or None if any check fails."""
        size = self._block
        if not ends or len(ends) != len(digests) or (parent is None) != (first == 0):
            return None
        if parent is None:
            if start_byte:
                return None
        else:
            # The bytes between the parent's cut and its block's end must be our chain's own
            # (a long piece can put the cut blocks back: compare each block it reaches into).
            if parent.cut_byte != start_byte or start_byte > first * size:
                return None
            node: _Node | None = parent
            for i in range(first - 1, -1, -1):
                if (i + 1) * size <= start_byte:
                    break
                if node is None:
                    return None
                lo = max(start_byte, i * size)
                if (
                    node.block[lo - i * size :]
                    != span[lo - start_byte : (i + 1) * size - start_byte]
                ):
                    return None
                node = node.parent
        last_end = (first + len(ends)) * size - start_byte
        if not last_end <= len(span) <= last_end + 3:
            return None
        try:
            text = span.decode("utf-8")
            spelled = self._enc.decode_bytes(tokens)
        except (UnicodeDecodeError, KeyError, OverflowError, TypeError, ValueError):
            return None
        cuts = block_cuts(
            self._rule,
            policy,
            self._lengths,
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
        if spelled != span[: claimed[-1][0]]:
            return None
        if not self._forbidden(policy.allowed).isdisjoint(tokens):
            return None
        start = parent.cut if parent is not None else 0
        added: list[_Node] = []
        taken = 0
        for i, (cut, cut_byte, n) in enumerate(cuts, first):
            node = _Node(
                (policy.allowed, digests[i - first]),
                added[-1] if added else parent,
                span[i * size - start_byte : (i + 1) * size - start_byte],
                start + cut,
                start_byte + cut_byte,
                tokens[taken:n],
                0,
            )
            added.append(node)
            taken = n
        return added

    def _forbidden(self, allowed: frozenset[str]) -> frozenset[int]:
        """The ids of the special tokens not in ``allowed``: a chain must not hold one."""
        forbidden = self._forbidden_ids.get(allowed)
        if forbidden is None:
            forbidden = self._forbidden_ids[allowed] = frozenset(
                i for s, i in tiktoken_parts.special_tokens(self._enc).items() if s not in allowed
            )
        return forbidden

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


def _shared_blocks(data: bytes, other: memoryview, blocks: int, size: int) -> int:
    """How many of the first ``blocks`` blocks of ``other`` start ``data`` (a binary search
    of memcmps: a few for a rewritten tail, one for a text that extends ``other``)."""
    # bytes.startswith(view) is a memcmp; comparing two memoryviews is ~60x slower.
    if data.startswith(other[: blocks * size]):
        return blocks
    low, high = 0, blocks - 1  # data shares low blocks, not high + 1
    while low < high:
        mid = (low + high + 1) // 2
        if data.startswith(other[: mid * size]):
            low = mid
        else:
            high = mid - 1
    return low


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
        for token, rank in tiktoken_parts.mergeable_ranks(enc).items():
            lengths[rank] = len(token)
        for special, rank in tiktoken_parts.special_tokens(enc).items():
            size = len(special.encode("utf-8"))
            lengths[rank] = size if lengths[rank] in (0, size) else AMBIGUOUS
        _lengths_cache[enc] = lengths
    return lengths


# Every AutoPrefixCache of this process, for ``_after_fork`` in a forked child.
_live: weakref.WeakSet[AutoPrefixCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_live):
        cache._after_fork()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
