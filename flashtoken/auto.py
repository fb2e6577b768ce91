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
import itertools
import threading
import weakref
from typing import NamedTuple, Optional

import tiktoken

from flashtoken.boundary import cut_rule, stable_offset
from flashtoken.encodings import resolve_encoding
from flashtoken.prefix import EncodingLike, _encode, _require_str
from flashtoken.specials import SpecialArg, SpecialPolicy

DEFAULT_BLOCK_BYTES = 512
DEFAULT_MAX_BYTES = 64 * 2**20
_NODE_OVERHEAD = 160  # bytes a node costs beyond its block and token pointers (measured, rounded)


class _Node(NamedTuple):
    parent: Optional[_Node]
    block: bytes  # this block's bytes, to confirm a digest match
    cut: int  # stable cut, as an offset into the text (characters)
    cut_byte: int  # the same cut in UTF-8 bytes
    tokens: list[int]  # the tokens between the parent's cut and this one


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
        self._nodes: collections.OrderedDict[tuple[frozenset[str], int], _Node] = (
            collections.OrderedDict()
        )
        self._bytes = 0
        self._lock = threading.Lock()
        self._counts = collections.Counter[str]()
        self._policies: dict[tuple[object, object], SpecialPolicy] = {}

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
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: rare; tiktoken repairs them, we step aside
            return _encode(self._enc, text, policy)
        digests = self._digests(data)
        with self._lock:
            path = self._longest_path(policy.allowed, data, digests)
        head: list[int] = []
        for node in path:
            head += node.tokens
        cut, cut_byte = (path[-1].cut, path[-1].cut_byte) if path else (0, 0)
        tail = _encode(self._enc, text[cut:], policy)
        self._record(policy, text, data, digests, path, tail)
        with self._lock:
            self._counts.update(lookups=1, reused_bytes=cut_byte, encoded_bytes=len(data) - cut_byte)
        return head + tail

    def _digests(self, data: bytes) -> list[int]:
        """The digest of the bytes up to the end of each full block."""
        state = self._hasher()
        out = []
        view = memoryview(data)
        for end in range(self._block, len(data) + 1, self._block):
            state.update(view[end - self._block : end])
            out.append(state.intdigest())
        return out

    def _longest_path(
        self, allowed: frozenset[str], data: bytes, digests: list[int]
    ) -> list[_Node]:
        path: list[_Node] = []
        parent = None
        for i, digest in enumerate(digests):
            node = self._nodes.get((allowed, digest))
            # Confirm: the same parent (so every earlier block matched) and the same bytes.
            if node is None or node.parent is not parent:
                break
            if node.block != data[i * self._block : (i + 1) * self._block]:
                break
            path.append(node)
            parent = node
        self._touch(allowed, digests[: len(path)])
        return path

    def _touch(self, allowed: frozenset[str], digests: list[int]) -> None:
        """Mark a path most recently used, ancestors after descendants: eviction, which takes
        the least recently used first, then never takes a block before the blocks under it."""
        for digest in reversed(digests):
            self._nodes.move_to_end((allowed, digest))

    def _record(
        self,
        policy: SpecialPolicy,
        text: str,
        data: bytes,
        digests: list[int],
        path: list[_Node],
        tail: list[int],
    ) -> None:
        """Add the blocks after ``path``; ``tail`` are the tokens of the text after its cut."""
        if len(path) == len(digests):
            return
        parent = path[-1] if path else None
        start, start_byte = (parent.cut, parent.cut_byte) if parent else (0, 0)
        base = start_byte
        # Where each token of ``tail`` ends, in bytes from ``base``, up to the first token whose
        # length is ambiguous (no block is recorded past it).
        lengths = list(map(self._lengths.__getitem__, tail))
        if AMBIGUOUS in lengths:
            del lengths[lengths.index(AMBIGUOUS) :]
        ends = list(itertools.accumulate(lengths))
        taken = 0  # tokens of ``tail`` already given to a block
        chars, mark = start, start_byte  # complete characters in data[:mark]
        added: list[tuple[int, _Node]] = []
        for i in range(len(path), len(digests)):
            block_end = (i + 1) * self._block
            aligned = block_end
            while aligned < len(data) and aligned > mark and data[aligned] & 0xC0 == 0x80:
                aligned -= 1  # a block may end inside a character; the cut stays before it
            chars += len(data[mark:aligned].decode("utf-8"))
            mark = aligned
            cut = stable_offset(self._rule, policy, text, start, chars)
            cut_byte = start_byte + len(text[start:cut].encode("utf-8"))
            n = bisect.bisect_left(ends, cut_byte - base) + 1 if cut_byte > base else 0
            if n and (n > len(ends) or ends[n - 1] != cut_byte - base):
                break  # not a token boundary: only a wrong split could do that; record no more
            node = _Node(parent, data[i * self._block : block_end], cut, cut_byte, tail[taken:n])
            added.append((digests[i], node))
            parent, start, start_byte, taken = node, cut, cut_byte, n
        with self._lock:
            for digest, node in reversed(added):
                key = (policy.allowed, digest)
                if key not in self._nodes:  # a concurrent twin or a collision: keep the first
                    self._nodes[key] = node
                    self._bytes += _size(node)
                    self._counts["blocks_added"] += 1
                self._nodes.move_to_end(key)
            self._touch(policy.allowed, digests[: len(path)])
            self._evict()

    def _evict(self) -> None:
        while self._bytes > self._max_bytes and self._nodes:
            _, node = self._nodes.popitem(last=False)
            self._bytes -= _size(node)
            self._counts["evictions"] += 1


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
