"""AutoPrefixCache: reuse the longest cached prefix of any text, with no prefix declared.

The UTF-8 bytes of each text are cut into fixed-size blocks. Block ``i`` is known by the xxh3-128
digest of all the bytes up to its end (the streaming digest, so the chain costs one pass over
the text) and stores only the tokens between its parent's stable cut and its own: memory grows
with the distinct text, not with the number of texts that share it. A lookup walks the blocks
from the start while they are cached, confirms each one by comparing its bytes (a digest locates
an entry, it never proves one), joins the tokens along the path, and encodes the rest of the text
in one tiktoken call. The blocks that were not cached are then recorded from that same call.

The blocks live in a ``flashtoken.chains.ChainStore`` (shared ints, each block confirmed by its
bytes); the daemon keeps chains for many processes in the same store (other token storage and
confirmation), where a declared prefix is the one-block case (docs/ALGORITHM.md, "Automatic reuse").
"""

from __future__ import annotations

import collections
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import tiktoken

from flashtoken import parity
from flashtoken.adopt import (
    FRONTIER_BLOCKS,
    Frontier,
    Published,
    check_published,
    follows_from_root,
)
from flashtoken.backends import Encoder, get_encoder
from flashtoken.blocks import block_cuts, token_byte_lengths
from flashtoken.boundary import cut_rule
from flashtoken.chains import BlockBytes, ChainStore, ListTokens, Node
from flashtoken.encodings import resolve_encoding
from flashtoken.prefix import EncodingLike, token_list
from flashtoken.specials import ORDINARY, SpecialArg, SpecialPolicy, encode_with, forbidden_ids
from flashtoken.text import require_str
from flashtoken.unicode import has_surrogates

DEFAULT_BLOCK_BYTES = 512
DEFAULT_MAX_BYTES = 64 * 2**20
_NODE_OVERHEAD = 160  # bytes a node costs beyond its block and token pointers (measured, rounded)


class _Memo(NamedTuple):
    """The last path of a policy, its tokens joined: most texts extend the previous one (a
    growing chat) or share all but its last blocks (a rewritten tail), and then a lookup costs a
    memcmp and one list copy, not a step per block. Usable while its last node is stored (then,
    leaves going first, so is every node of the path)."""

    data: bytes
    path: list[Node]
    digests: list[int]  # of path's blocks
    ends: list[int]  # ends[i]: how many tokens path[: i + 1] holds
    head: list[int]  # path's tokens, joined (never handed out; may run on past ends[-1])
    state: object  # the xxh3 state after the path's last block


class Plan(NamedTuple):
    """What a lookup found: the path of cached blocks that start ``data`` and its cut."""

    data: bytes  # the text's UTF-8
    path: list[Node]
    digests: list[int]  # of every full block of data
    state: object  # the xxh3 state after the last full block
    cut: int  # path[-1].cut (characters), 0 for an empty path
    cut_byte: int  # the same in bytes
    memo: _Memo | None  # the memo path begins with ...
    shared: int  # ... for this many blocks


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
        self._lengths = token_byte_lengths(self._enc)
        self._lock = threading.Lock()
        self._counts = collections.Counter[str]()
        self._store = ChainStore(max_bytes, ListTokens(), BlockBytes(), overhead=_NODE_OVERHEAD)
        self._memos: dict[frozenset[str], _Memo] = {}
        self._frontier = Frontier()
        _live.add(self)

    def after_fork(self) -> None:
        """In a forked child (``os.register_at_fork``, before any code of the child runs).

        The parent's threads are gone, but a lock one of them held at the fork is still held:
        it is made anew, never waited on (a pid check at the start of a call would come too
        late, as the call takes the lock first). A lock held means a parent's thread was half
        way through an update, so the store is emptied too (it refills; an id never depends on
        what it held). Rejected: taking every lock before the fork (``before=``), which would
        make ``fork()`` wait on the parent's lookups and deadlock if the forking thread held one.
        """
        if self._lock.locked():  # else the lock is free and the store whole: nothing to do
            self._lock = threading.Lock()
            self._forget()

    def clear(self) -> None:
        """Forget every block (the daemon's client does, once a daemon's answer was wrong)."""
        with self._lock:
            self._forget()

    def _forget(self) -> None:
        self._store.clear()
        self._memos = {}
        self._frontier = Frontier()

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
            counts = self._counts
            return {
                **{k: counts[k] for k in ("lookups", "reused_bytes", "encoded_bytes")},
                **{k: counts[k] for k in ("blocks_added", "blocks_adopted", "blocks_refused")},
                "evictions": self._store.evictions,
                "curr_items": len(self._store),
                "bytes": self._store.bytes,
                "limit_maxbytes": self._store.max_bytes,
            }

    def _encode(self, text: str, policy: SpecialPolicy) -> list[int]:
        plan = self.lookup(text, policy)
        if plan is None:  # lone surrogates (tiktoken repairs them) or no proof: step aside
            return encode_with(self._encoder, text, policy)
        head = self.head(plan)
        tail = encode_with(self._encoder, text[plan.cut :], policy)
        self.record(plan, policy, text, tail)
        head += tail  # not head + tail: one copy of the prefix's tokens, not two
        return head

    # The three steps of a lookup, apart and public, so that the daemon's client can ask the
    # host's store for the blocks after ``plan.path`` between them (flashtoken.client).

    def lookup(self, text: str, policy: SpecialPolicy) -> Plan | None:
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
                self._store.use(plan.path[-1])
        return plan

    @staticmethod
    def head(plan: Plan) -> list[int]:
        """A new list of the tokens along ``plan.path`` (those of ``text[:plan.cut]``)."""
        memo, shared = plan.memo, plan.shared
        head = memo.head[: memo.ends[shared - 1]] if memo is not None and shared else []
        for node in plan.path[shared:]:
            head += node.tokens
        return head

    def record(self, plan: Plan, policy: SpecialPolicy, text: str, tail: list[int]) -> None:
        """Record the blocks after ``plan.path``; ``tail`` are the tokens of ``text[plan.cut:]``.
        When every block gets stored, the next lookup starts from this path (the memo)."""
        data, digests, path = plan.data, plan.digests, plan.path
        parent = path[-1] if path else None
        start, start_byte = (parent.cut, parent.cut_byte) if parent else (0, 0)
        size = self._block
        cuts = block_cuts(
            self._rule,
            policy,
            self._lengths,
            text,
            data,
            size,
            len(path),
            len(digests),
            start,
            start_byte,
            tail,
        )
        allowed, store = policy.allowed, self._store
        added: list[Node] = []
        taken = 0  # tokens of ``tail`` already given to a block
        for i, (cut, cut_byte, n) in enumerate(cuts, len(path)):
            # Shared int objects: 8 bytes a token, and a later join touches fewer cache lines.
            tokens = token_list(tail[taken:n])
            key = (allowed, digests[i])
            before = added[-1] if added else parent
            added.append(
                store.node(
                    key, before, allowed, data, i * size, (i + 1) * size, cut, cut_byte, tokens
                )
            )
            taken = n
        with self._lock:
            chain = store.add(parent, added)
            self._counts.update(
                lookups=1,
                reused_bytes=plan.cut_byte,
                encoded_bytes=len(data) - plan.cut_byte,
                blocks_added=sum(a is b for a, b in zip(chain, added, strict=False)),
            )
            if len(path) + len(chain) == len(digests) and (path or chain):
                self._memos[allowed] = self._next_memo(plan, chain)
            ends = chain[-FRONTIER_BLOCKS:]
            self._frontier.follow(path[max(0, len(path) - (FRONTIER_BLOCKS - len(ends))) :] + ends)

    def forbidden(self, allowed: frozenset[str]) -> frozenset[int]:
        """The ids of the special tokens not in ``allowed``: a chain must not hold one."""
        return forbidden_ids(self._enc, allowed)

    def _longest_path(self, allowed: frozenset[str], data: bytes) -> Plan:
        """The cached blocks that start ``data``, the digests of all its full blocks, and the
        digest state after the last of them (under the lock).

        Starts from the blocks ``data`` shares with the previous lookup's path, so a growing
        text pays per block only for its new blocks (and a few memcmps for the rest).
        """
        size, store = self._block, self._store
        view = memoryview(data)
        memo = self._memos.get(allowed)
        shared = 0
        if memo is not None and store.holds(memo.path[-1]):
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
                parent = path[-1] if path else None
                node = store.step(parent, (allowed, digest), allowed, data, end - size, end)
                if node is None:
                    matching = False
                else:
                    path.append(node)
        last = path[-1] if path else None
        cut, cut_byte = (last.cut, last.cut_byte) if last else (0, 0)
        return Plan(data, path, digests, state, cut, cut_byte, memo, shared)

    def _next_memo(self, plan: Plan, chain: list[Node]) -> _Memo:
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
        path = plan.path + chain
        return _Memo(plan.data, path, plan.digests[: len(path)], ends, head, plan.state)

    def adopt(
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
        publishes them: client/follow.py), checked as strictly as our own (flashtoken/adopt.py);
        returns how many were stored. Blocks of a chain that is not ours (no parent here) are
        ignored; blocks that fail a check count in ``blocks_refused``. Only blocks that extend
        this process's own recent chains are taken (its lookups' last blocks, and blocks taken
        so): not other chats that share a system prompt.
        """
        blocks = Published(policy, first, parent_digest, start_byte, digests, ends, span, tokens)
        store, allowed = self._store, policy.allowed
        with self._lock:
            if digests and (allowed, digests[-1]) in store.nodes:
                return 0  # held already (our own blocks, published back to us): nothing new
            parent: Node | None = None
            if parent_digest is not None:
                parent = store.nodes.get((allowed, parent_digest))
                if parent is None or parent.key not in self._frontier:
                    return 0  # a chain this process does not hold, or does not follow
            elif not follows_from_root(store, self._frontier, allowed, digests):
                return 0
        try:  # only now, for blocks this process takes: shared ints (8 bytes a token)
            held = token_list(tokens)
        except ValueError:  # an id no encoding has
            held = None
        added = None
        if held is not None:
            added = check_published(
                self._enc,
                self._rule,
                self._lengths,
                self._block,
                self.forbidden(allowed),
                store,
                blocks,
                parent,
                held,
            )
        with self._lock:
            if added is None:
                self._counts["blocks_refused"] += len(ends)
                return 0
            new = [a for a, b in zip(store.add(parent, added), added, strict=False) if a is b]
            self._counts["blocks_adopted"] += len(new)
            self._counts["blocks_added"] += len(new)
            self._frontier.follow(new)
        return len(new)

    # -- tiktoken's batch, numpy and decode calls (flashtoken/parity.py) ------------------------

    def encode_ordinary_batch(self, texts: Sequence[str], *, num_threads: int = 8) -> list[Ids]:
        return parity.encode_batch(self.encode_ordinary, texts, num_threads)

    def encode_batch(
        self, texts: Sequence[str], *, num_threads: int = 8, **specials: Any
    ) -> list[Ids]:
        """``encode`` on each text, on threads as tiktoken's batch (its keywords)."""
        return parity.encode_batch(lambda t: self.encode(t, **specials), texts, num_threads)

    def encode_to_numpy(self, text: str, **specials: Any) -> Any:
        """A uint32 ``numpy.ndarray``; tiktoken's UnicodeEncodeError for surrogates (its
        ``encode_to_numpy`` does not replace them)."""
        if has_surrogates(text):
            return self._enc.encode_to_numpy(text, **specials)
        return parity.to_numpy(self.encode(text, **specials))

    def decode(self, tokens: Sequence[int], errors: str = "replace") -> str:
        return self._enc.decode(tokens, errors=errors)


Ids = list[int]


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


# Every AutoPrefixCache of this process, for ``after_fork`` in a forked child.
_live: weakref.WeakSet[AutoPrefixCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_live):
        cache.after_fork()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
