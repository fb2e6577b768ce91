"""Chains in the daemon: automatic prefix reuse (AUTO, TELL), chain fills, publishing.

A mixin of ``Server`` (daemon/server.py), which owns the loop, the sockets, the store and the
fill pool; these are its handlers for the chain ops. A chain block is found by its key and used
only once confirmed by its bytes (daemon/store.py). A fill encodes the text after a chain's last
cut on the pool and hands the new blocks to the loop, which stores them and publishes them on
the PUB socket to the clients that follow chains (client/follow.py; docs/PROTOCOL.md,
"Chains" and "Publishing").
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from array import array
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import xxhash
import zmq

from flashtoken.blocks import block_cuts
from flashtoken.specials import SpecialPolicy, encode_with
from flashtoken.wire import (
    AutoHit,
    AutoMiss,
    AutoRequest,
    Blocks,
    Request,
    TellRequest,
    Unplaced,
    tokens_from_frame,
    tokens_to_frame,
)

from .budget import PARKED_BYTES
from .encodings import Loaded, check_loaded, load
from .settings import FAILED_FILLS_KEPT
from .store import Entry

log = logging.getLogger("flashtoken.daemon")

_PARKED_TELLS = 256  # TELLs that wait for their parent's fill ...
# Blocks one chain fill records at most: the loop stores (and publishes) a fill's blocks in one
# go, so this bounds the loop's work per fill; a longer text is filled further by its next
# request. 2048 blocks of 512 bytes: 1 MiB of text.
MAX_FILL_BLOCKS = 2048


def _block_key(seed: bytes, blocks: int, block: bytes) -> tuple[bytes, int, bytes]:
    """The key of a chain fill (one at a time, failures remembered): a digest of the first new
    block, not its bytes (up to 1 MiB each, in a set and a memo of a thousand)."""
    return seed, blocks, hashlib.blake2b(block, digest_size=16).digest()


@dataclass(frozen=True)
class Chain:
    """A chain fill's result: new blocks ``first ..`` after the cut ``start``, their digests."""

    path: list  # the chain found for an AUTO request's text (the parent block for a TELL)
    first: int
    start: int  # the cut of block first - 1, in bytes (0 for the first block)
    span: bytes  # the text's bytes from start on
    entries: list
    digests: list
    state: Any  # the xxh3 state after the new blocks (AUTO), None (TELL)
    parent_digest: bytes | None  # of block first - 1: subscribers find their block by it
    refused: bool = False  # a TELL whose digests are not those of its bytes (from that block on)


@dataclass(frozen=True)
class ChainResult:
    """What a chain fill hands the loop: the new blocks, or why there are none."""

    key: Any
    request: AutoRequest | TellRequest
    chain: Chain | None = None
    loaded: Loaded | None = None
    error: str | None = None


class ChainHandlers:
    """``Server``'s handlers for AUTO and TELL, its chain fills and their publication."""

    # Server's, used here: the store, the loaded encodings, the fill pool and its bookkeeping,
    # the publishing socket, the counters.
    store: Any
    config: Any
    counters: dict[str, int]
    _encodings: dict[str, Loaded]
    _filling: set[Any]
    _failed_auto: Any
    _parked: deque[TellRequest]
    _parked_bytes: int
    _publisher: zmq.Socket | None
    _publications: Any  # daemon/budget.py's Outstanding

    if TYPE_CHECKING:

        def _check_encoding(self, request: Any) -> None: ...
        def _submit(self, key: Any, fn: Any, *args: Any) -> bool: ...

    def on_auto(self, request: Request) -> list[Any]:
        """The longest confirmed chain of blocks that starts the text; its tokens after the
        client's ``skip`` blocks; a fill of the blocks after it (on the pool) if asked."""
        assert isinstance(request, AutoRequest)
        self._check_encoding(request)
        data, block, skip = request.text, request.block, request.skip
        loaded = self._encodings.get(request.enc)
        path: list[Entry] = []
        if loaded is not None:  # else nothing was stored for it yet
            enc = loaded.enc
            path, _ = self.store.walk(
                request.seed,
                data,
                block,
                request.enc,
                request.allowed,
                lambda frame: enc.decode_bytes(tokens_from_frame(frame)),
            )
        blocks = len(path)
        filling = False
        if request.fill and blocks < len(data) // block:
            key = _block_key(request.seed, blocks, data[blocks * block : (blocks + 1) * block])
            filling = key in self._filling
            if (
                not filling
                and key not in self._failed_auto
                and len(self._filling) < self.config.max_pending_fills
            ):
                filling = self._submit(key, self._fill_chain, key, request, path)
        start = path[skip - 1].cut_byte if 0 < skip <= blocks else 0
        if blocks > skip and path[-1].cut_byte > start:
            frame = b"".join([entry.tokens for entry in path[skip:]])
            self.store.count_auto(blocks - skip, path[-1].cut_byte - start)
            self.counters["tokens_served"] += len(frame) // 4
            return AutoHit(request.id, blocks, filling, start, path[-1].cut_byte, frame).frames()
        self.store.count_auto(0, 0)
        return AutoMiss(request.id, blocks, filling).frames()

    def on_tell(self, request: Request) -> list[Any]:
        """A client encoded a text itself: fill the blocks it names. Answered only when the
        parent block is not here (``placed: false``)."""
        assert isinstance(request, TellRequest)
        self._check_encoding(request)
        path: list[Entry] = []
        if request.parent is not None:
            parent = self.store.peek(self.store.key(request.seed, request.parent))
            if parent is None and self._filling:
                self._park(request)  # its parent may be on its way: a fill of an earlier TELL
                return []
            if (
                parent is None
                or not parent.chain
                or parent.enc != request.enc
                or parent.allowed != request.allowed
                or parent.ns != request.seed
                or parent.cut_byte != request.start
            ):
                # Evicted, or never here (a restart): the one answer a TELL gets, so that the
                # client tells the whole text next time.
                self.counters["tells_unplaced"] += 1
                return Unplaced(request.id).frames()
            path = [parent]
        request, path = self._skip_known(request, path)
        if not request.digests:
            return []  # every block is here already
        key = _block_key(request.seed, request.first, request.digests[0])
        if (
            key not in self._filling
            and key not in self._failed_auto
            and len(self._filling) < self.config.max_pending_fills
        ):
            self._submit(key, self._fill_chain, key, request, path)
        return []

    def _park(self, request: TellRequest) -> None:
        """Keep a TELL whose parent block is not stored yet until the fills in flight are done
        (a client that tells faster than the daemon fills); the oldest go first when many wait."""
        assert request.parent is not None
        self._parked.append(request)
        self._parked_bytes += len(request.span)
        while len(self._parked) > _PARKED_TELLS or self._parked_bytes > PARKED_BYTES:
            self._parked_bytes -= len(self._parked.popleft().span)
            self.counters["tells_unplaced"] += 1

    def _unpark(self) -> None:
        """After a fill: retry the parked TELLs (each is parked again, or dropped as unplaced
        once no fill is in flight)."""
        parked, self._parked, self._parked_bytes = self._parked, deque(), 0
        for request in parked:
            self.on_tell(request)

    def _skip_known(
        self, request: TellRequest, path: list[Entry]
    ) -> tuple[TellRequest, list[Entry]]:
        """The TELL without its first blocks that the store holds already (confirmed by their
        bytes, like a walk's), and its new parent: a worker that starts a text afresh names
        blocks that others have told before."""
        loaded = self._encodings.get(request.enc)
        if loaded is None:
            return request, path
        parent = path[-1] if path else None
        block, start, span = request.block, request.start, request.span
        known = 0
        for i, digest in enumerate(request.digests, request.first):
            entry = self.store.peek(self.store.key(request.seed, digest))
            at = parent.cut_byte if parent is not None else 0
            if (
                entry is None
                or not entry.extends(
                    parent, request.enc, request.allowed, span, start, (i + 1) * block, request.seed
                )
                or loaded.enc.decode_bytes(tokens_from_frame(entry.tokens))
                != span[at - start : entry.cut_byte - start]
            ):
                break
            parent, known = entry, known + 1
        if not known:
            return request, path
        assert parent is not None
        cut = parent.cut_byte
        told = dataclasses.replace(
            request,
            first=request.first + known,
            parent=request.digests[known - 1],
            start=cut,
            digests=request.digests[known:],
            span=span[cut - start :],
        )
        return told, [parent]

    def _fill_chain(
        self, key: Any, request: AutoRequest | TellRequest, path: list[Entry]
    ) -> ChainResult:
        """On a pool thread: encode the text after a chain's cut and cut the new blocks, as
        ``flashtoken.AutoPrefixCache`` does; hand them to the loop. Never raises.

        Only the bytes after the last known block's cut are encoded: the tokens before it are in
        the store already. For an AUTO request ``path`` is the chain found for its text, whose
        bytes give the new blocks' digests; for a TELL, ``path`` is the told parent block (or
        empty) and the digests are the client's: a digest only locates, and every block is
        confirmed by its own bytes. Reads of ``path`` are safe here: a block's cut never changes.
        At most ``MAX_FILL_BLOCKS`` blocks, and only the text up to the last of them is encoded
        (its cut is stable whatever follows, so its tokens are those of the whole text).
        """
        try:
            loaded = self._encodings.get(request.enc) or load(request.enc)
            check_loaded(loaded, request)
            block = request.block
            parent = path[-1] if path else None
            start = parent.cut_byte if parent is not None else 0
            if isinstance(request, AutoRequest):
                first, span = len(path), request.text[start:]
                stop = len(request.text) // block
            else:
                first, span = request.first, request.span
                stop = first + len(request.digests)
            stop = min(stop, first + MAX_FILL_BLOCKS)
            end = stop * block - start
            while end < len(span) and span[end] & 0xC0 == 0x80:
                end += 1  # to a character boundary: the text handed to tiktoken must decode
            span = span[:end]
            policy = SpecialPolicy(frozenset(request.allowed), frozenset())
            text = span.decode("utf-8")
            tail = encode_with(loaded.enc, text, policy)
            cuts = block_cuts(
                loaded.rule,
                policy,
                loaded.lengths,
                text,
                span,
                block,
                first,
                stop,
                0,
                0,
                tail,
                origin=start,
            )
            state = None
            if isinstance(request, AutoRequest):
                state = xxhash.xxh3_128()
                state.update(memoryview(request.text)[: first * block])
                parent_digest = state.digest() if path else None
                digests = []
                for i in range(first, first + len(cuts)):
                    state.update(memoryview(request.text)[i * block : (i + 1) * block])
                    digests.append(state.digest())
            else:
                parent_digest = request.parent
                digests = _told_digests(loaded, request, parent, span, len(cuts))
            refused = len(digests) < len(cuts)
            cuts = cuts[: len(digests)]
            entries: list[Entry] = []
            taken = 0
            for i, (_, cut, n) in enumerate(cuts, first):
                entries.append(
                    Entry(
                        span[cut : (i + 1) * block - start],  # the tokens spell the bytes before
                        request.enc,
                        request.allowed,
                        tokens_to_frame(array("I", tail[taken:n])),
                        start + cut,  # chain blocks use cut_byte only
                        entries[-1] if entries else parent,
                        start + cut,
                        request.seed,
                    )
                )
                taken = n
            chain = Chain(path, first, start, span, entries, digests, state, parent_digest, refused)
            return ChainResult(key, request, chain=chain, loaded=loaded)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: B036 - pyo3's PanicException is a BaseException
            return ChainResult(key, request, error=f"{type(exc).__name__}: {exc}"[:300])

    def _on_chain_done(self, result: ChainResult) -> None:
        request = result.request
        if result.error is not None:
            self.counters["fill_errors"] += 1
            log.warning(
                "fill of a %d-byte %s text failed: %s",
                len(request.text if isinstance(request, AutoRequest) else request.span),
                request.enc,
                result.error,
            )
            self._remember_failed_chain(result.key, result.error)
            return
        chain = result.chain
        assert chain is not None and result.loaded is not None
        self._encodings.setdefault(request.enc, result.loaded)
        self.counters["auto_fills"] += 1
        if chain.refused:
            self.counters["tells_refused"] += 1
        stored = self.store.put_chain(request.seed, chain.digests, chain.entries)
        if stored and len(stored) == len(chain.entries) and isinstance(request, AutoRequest):
            # The next request of a growing text starts its walk here.
            self.store.remember(
                request.seed,
                memoryview(request.text),
                request.block,
                chain.path + stored,
                chain.state,
            )
        if stored:
            self._publish(request, chain, stored)

    def _remember_failed_chain(self, key: Any, error: str) -> None:
        self._failed_auto[key] = error
        while len(self._failed_auto) > FAILED_FILLS_KEPT:
            self._failed_auto.popitem(last=False)

    def _publish(self, request: Any, chain: Chain, stored: list[Entry]) -> None:
        """Send the blocks just stored to the clients following this seed's chains."""
        if self._publisher is None:
            return
        span = chain.span
        end = (chain.first + len(stored)) * request.block - chain.start
        while end < len(span) and span[end] & 0xC0 == 0x80:
            end += 1  # to a character boundary: subscribers decode the span
        message = Blocks(
            request.seed,
            chain.first,
            chain.parent_digest,
            chain.start,
            chain.digests[: len(stored)],
            [entry.cut_byte for entry in stored],
            [len(entry.tokens) // 4 for entry in stored],
            span[:end],
            b"".join([entry.tokens for entry in stored]),
        ).frames()
        size = sum(len(frame) for frame in message)
        if not self._publications.admit(None, size):
            return  # subscribers hold the publication budget: they miss these (encode locally)
        try:
            tracker = self._publisher.send_multipart(message, zmq.NOBLOCK, copy=False, track=True)
            self._publications.sent(None, size, tracker)
            self.counters["blocks_published"] += len(stored)
        except zmq.ZMQError as exc:  # a slow subscriber's queue is full: it misses these
            log.debug("blocks not published: %s", exc)


def _told_digests(
    loaded: Loaded, request: TellRequest, parent: Entry | None, span: bytes, blocks: int
) -> list[bytes]:
    """The TELL's digests that are those of its bytes, up to the first that is not.

    A digest is a block's key: a client's is never trusted, or anyone could store other bytes
    under the key of a block of someone else's text and deny it its cache. The digest of block
    ``i`` covers the whole text up to its end, so the bytes before ``span`` are rebuilt from the
    parent chain (the tokens of each block spell its text): on the pool, once per TELL.
    """
    head = b""
    if parent is not None:
        frames = []
        node: Entry | None = parent
        while node is not None:
            frames.append(node.tokens)
            node = node.parent
        head = loaded.enc.decode_bytes(tokens_from_frame(b"".join(reversed(frames))))
        if len(head) != request.start:
            return []
    text = memoryview(head + span)
    block, first = request.block, request.first
    state = xxhash.xxh3_128(text[: first * block])
    out = []
    for i, told in enumerate(request.digests[:blocks], first):
        state.update(text[i * block : (i + 1) * block])
        if state.digest() != told:
            break
        out.append(told)
    return out
