"""Chains in the daemon: automatic prefix reuse (AUTO, TELL), chain fills, publishing.

``Chains`` holds the handlers for the chain ops, given what they use by the ``Server`` that owns
the loop (daemon/server.py): the store, the encodings, the flights (daemon/flights.py: one fill
per key, failed fills remembered) and, once bound, the PUB socket. A chain block is found by its
key and used only once confirmed by its bytes (flashtoken/chains.py). A fill encodes the text
after a chain's last cut on the pool and hands the new blocks to the loop, which stores them and
publishes them on the PUB socket to the clients that follow chains (client/follow.py;
docs/PROTOCOL.md, "Chains" and "Publishing").
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from array import array
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import xxhash
import zmq

from flashtoken.blocks import block_cuts
from flashtoken.chains import Node
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

from .budget import PARKED_BYTES, Outstanding
from .encodings import Encodings, Loaded, check_loaded
from .flights import Flights, fill_error
from .store import ChainScope, Store

log = logging.getLogger("flashtoken.daemon")

_PARKED_TELLS = 256  # TELLs that wait for their parent's fill ...
# Digest states kept for the next TELL of a growing text (``Chains.states``): one per chat that
# is growing, about 600 bytes each.
_TELL_STATES = 1024
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

    path: list[Node]  # the chain found for an AUTO request's text (the parent block for a TELL)
    first: int
    start: int  # the cut of block first - 1, in bytes (0 for the first block)
    span: bytes  # the text's bytes from start on
    entries: list[Node]
    digests: list[bytes]
    state: Any  # the xxh3 state after the new blocks (a TELL's: None if a digest was refused)
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


class Chains:
    """The handlers for AUTO and TELL, their chain fills and the fills' publication."""

    def __init__(
        self,
        store: Store,
        encodings: Encodings,
        flights: Flights,
        counters: dict[str, int],
        publications: Outstanding,
    ) -> None:
        self.store = store
        self.encodings = encodings
        self.flights = flights
        self.counters = counters
        self.publications = publications
        self.publisher: zmq.Socket | None = None  # set once bound (no publish address: None)
        self.parked: deque[TellRequest] = deque()  # TELLs whose parent is being filled
        self.parked_bytes = 0
        # The digest state after the last block a TELL's fill stored, by that block's key (with
        # the node and its number of blocks): the next TELL of the text names that block as its
        # parent, and its digests are checked from this state rather than by decoding the whole
        # chain back to its bytes (~0.7 ms for a 100 KB chat, on every turn).
        self.states: OrderedDict[Hashable, tuple[Node, int, Any]] = OrderedDict()

    def on_auto(self, request: Request) -> list[Any]:
        """The longest confirmed chain of blocks that starts the text; its tokens after the
        client's ``skip`` blocks; a fill of the blocks after it (on the pool) if asked."""
        assert isinstance(request, AutoRequest)
        self.encodings.check(request)
        data, block, skip = request.text, request.block, request.skip
        path: list[Node] = []
        if self.encodings.get(request.enc) is not None:  # else nothing was stored for it yet
            path, _ = self.store.walk(request.seed, data, block, _scope(request))
        blocks = len(path)
        filling = False
        if request.fill and blocks < len(data) // block:
            key = _block_key(request.seed, blocks, data[blocks * block : (blocks + 1) * block])
            self._start(key, request, path)
            filling = key in self.flights
        start = path[skip - 1].cut_byte if 0 < skip <= blocks else 0
        if blocks > skip and path[-1].cut_byte > start:
            frame = b"".join([node.tokens for node in path[skip:]])
            self.store.count_auto(blocks - skip, path[-1].cut_byte - start)
            self.counters["tokens_served"] += len(frame) // 4
            return AutoHit(request.id, blocks, filling, start, path[-1].cut_byte, frame).frames()
        self.store.count_auto(0, 0)
        return AutoMiss(request.id, blocks, filling).frames()

    def on_tell(self, request: Request) -> list[Any]:
        """A client encoded a text itself: fill the blocks it names. Answered only when the
        parent block is not here (``placed: false``)."""
        assert isinstance(request, TellRequest)
        self.encodings.check(request)
        path: list[Node] = []
        if request.parent is not None:
            parent = self.store.peek(self.store.key(request.seed, request.parent))
            if parent is None and len(self.flights):
                self._park(request)  # its parent may be on its way: a fill of an earlier TELL
                return []
            if (
                parent is None
                or parent.scope != _scope(request)
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
        state = None
        held = self.states.get(path[-1].key) if path else None
        if held is not None and held[0] is path[-1] and held[1] == request.first:
            state = held[2].copy()  # the pool's own copy: the one kept is never updated
            self.counters["tells_from_state"] += 1
        key = _block_key(request.seed, request.first, request.digests[0])
        self._start(key, request, path, state)
        return []

    def _start(
        self, key: Any, request: AutoRequest | TellRequest, path: list[Node], state: Any = None
    ) -> None:
        """A chain fill as the flight of ``key`` (none if one is in flight or failed before)."""
        size = len(request.text if isinstance(request, AutoRequest) else request.span)
        self.flights.start(key, size, self._landed, self._fill, key, request, path, state)

    def _park(self, request: TellRequest) -> None:
        """Keep a TELL whose parent block is not stored yet until the fills in flight are done
        (a client that tells faster than the daemon fills); the oldest go first when many wait."""
        assert request.parent is not None
        self.parked.append(request)
        self.parked_bytes += len(request.span)
        while len(self.parked) > _PARKED_TELLS or self.parked_bytes > PARKED_BYTES:
            self.parked_bytes -= len(self.parked.popleft().span)
            self.counters["tells_unplaced"] += 1

    def unpark(self) -> None:
        """After a fill: retry the parked TELLs (each is parked again, or dropped as unplaced
        once no fill is in flight)."""
        parked, self.parked, self.parked_bytes = self.parked, deque(), 0
        for request in parked:
            self.on_tell(request)

    def _skip_known(self, request: TellRequest, path: list[Node]) -> tuple[TellRequest, list[Node]]:
        """The TELL without its first blocks that the store holds already (confirmed by their
        bytes, like a walk's), and its new parent: a worker that starts a text afresh names
        blocks that others have told before."""
        if self.encodings.get(request.enc) is None:
            return request, path
        known = self.store.known_after(
            path[-1] if path else None,
            request.seed,
            request.digests,
            _scope(request),
            request.span,
            request.start,
            request.first,
            request.block,
        )
        if not known:
            return request, path
        parent, start, n = known[-1], request.start, len(known)
        told = dataclasses.replace(
            request,
            first=request.first + n,
            parent=request.digests[n - 1],
            start=parent.cut_byte,
            digests=request.digests[n:],
            span=request.span[parent.cut_byte - start :],
        )
        return told, [parent]

    def _fill(
        self, key: Any, request: AutoRequest | TellRequest, path: list[Node], state: Any
    ) -> ChainResult:
        """On a pool thread: encode the text after a chain's cut and cut the new blocks, as
        ``flashtoken.AutoPrefixCache`` does; hand them to the loop. Never raises.

        Only the bytes after the last known block's cut are encoded: the tokens before it are in
        the store already. For an AUTO request ``path`` is the chain found for its text, whose
        bytes give the new blocks' digests; for a TELL, ``path`` is the told parent block (or
        empty) and the digests are the client's: a digest only locates, and every block is
        confirmed by its own bytes; ``state`` is the digest state after the told parent, if the
        loop kept it (``states``). Reads of ``path`` are safe here: a block's cut never changes.
        At most ``MAX_FILL_BLOCKS`` blocks, and only the text up to the last of them is encoded
        (its cut is stable whatever follows, so its tokens are those of the whole text).
        """
        try:
            loaded = self.encodings.get_or_load(request.enc)
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
            tail = encode_with(loaded.encoder, text, policy)
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
                digests, state = _told_digests(loaded, request, parent, span, len(cuts), state)
            refused = len(digests) < len(cuts)
            cuts = cuts[: len(digests)]
            entries: list[Node] = []
            taken, scope, store = 0, _scope(request), self.store
            for i, (_, cut, n) in enumerate(cuts, first):
                entries.append(
                    store.chains.node(
                        store.key(request.seed, digests[i - first]),
                        entries[-1] if entries else parent,
                        scope,
                        span,
                        i * block,
                        (i + 1) * block,
                        -1,  # a chain block's cut in characters: never read in the daemon
                        start + cut,
                        tokens_to_frame(array("I", tail[taken:n])),
                        origin=start,
                    )
                )
                taken = n
            chain = Chain(path, first, start, span, entries, digests, state, parent_digest, refused)
            return ChainResult(key, request, chain=chain, loaded=loaded)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: B036 - pyo3's PanicException is a BaseException
            return ChainResult(key, request, error=fill_error(exc))

    def _landed(self, result: ChainResult) -> None:
        """On the loop: store a chain fill's blocks and publish them (no GET waits for one)."""
        request = result.request
        if result.error is not None:
            size = len(request.text if isinstance(request, AutoRequest) else request.span)
            what = f"a {size}-byte {request.enc} text"
            self.flights.fill_failed(result.key, result.error, what)
            return None
        chain = result.chain
        assert chain is not None and result.loaded is not None
        self.encodings.keep(request.enc, result.loaded)
        self.counters["auto_fills"] += 1
        if chain.refused:
            self.counters["tells_refused"] += 1
        parent = chain.path[-1] if chain.path else None
        stored = self.store.put_chain(parent, chain.entries)
        if stored and len(stored) == len(chain.entries):
            if isinstance(request, AutoRequest):
                # The next request of a growing text starts its walk here.
                self.store.remember(
                    request.seed,
                    memoryview(request.text),
                    request.block,
                    chain.path + stored,
                    chain.state,
                )
            if chain.state is not None:  # and its next TELL checks its digests from here
                self._keep_state(stored[-1], chain.first + len(stored), chain.state)
        if stored:
            self._publish(request, chain, stored)
        return None

    def _keep_state(self, node: Node, blocks: int, state: Any) -> None:
        """Keep the digest state after ``node`` (block ``blocks - 1``) for the next TELL."""
        self.states[node.key] = (node, blocks, state)
        self.states.move_to_end(node.key)
        while len(self.states) > _TELL_STATES:
            self.states.popitem(last=False)

    def _publish(self, request: Any, chain: Chain, stored: list[Node]) -> None:
        """Send the blocks just stored to the clients following this seed's chains."""
        if self.publisher is None:
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
        if not self.publications.admit(None, size):
            return  # subscribers hold the publication budget: they miss these (encode locally)
        try:
            tracker = self.publisher.send_multipart(message, zmq.NOBLOCK, copy=False, track=True)
            self.publications.sent(None, size, tracker)
            self.counters["blocks_published"] += len(stored)
        except zmq.ZMQError as exc:  # a slow subscriber's queue is full: it misses these
            log.debug("blocks not published: %s", exc)


def _scope(request: AutoRequest | TellRequest) -> ChainScope:
    return ChainScope(request.enc, request.allowed, request.seed)


def _told_digests(
    loaded: Loaded,
    request: TellRequest,
    parent: Node | None,
    span: bytes,
    blocks: int,
    state: Any,
) -> tuple[list[bytes], Any]:
    """The TELL's digests that are those of its bytes, up to the first that is not, and the
    digest state after the last of them (None if one was refused).

    A digest is a block's key: a client's is never trusted, or anyone could store other bytes
    under the key of a block of someone else's text and deny it its cache. The digest of block
    ``i`` covers the whole text up to its end: ``state`` is that of the text up to the parent's
    block end when the loop kept it (computed by an earlier fill from bytes it checked);
    otherwise the bytes before ``span`` are rebuilt from the parent chain (the tokens of each
    block spell its text), on the pool, once per TELL.
    """
    block, first = request.block, request.first
    if state is not None:
        # span starts at the parent's cut, which lies in the parent's block or before it.
        at = first * block - request.start
        return _check_digests(request, memoryview(span), at, state, blocks)
    head = b""
    if parent is not None:
        frames = []
        node: Node | None = parent
        while node is not None:
            frames.append(node.tokens)
            node = node.parent
        head = loaded.enc.decode_bytes(tokens_from_frame(b"".join(reversed(frames))))
        if len(head) != request.start:
            return [], None
    text = memoryview(head + span)
    state = xxhash.xxh3_128(text[: first * block])
    return _check_digests(request, text, first * block, state, blocks)


def _check_digests(
    request: TellRequest, text: memoryview, at: int, state: Any, blocks: int
) -> tuple[list[bytes], Any]:
    """The first ``blocks`` told digests that ``state`` (of the whole text before ``text[at:]``,
    where block ``request.first`` starts) gives the blocks from ``at``, up to the first that
    differs; and the state after them (None once one differs)."""
    block, out = request.block, list[bytes]()
    for told in request.digests[:blocks]:
        state.update(text[at : at + block])
        at += block
        if state.digest() != told:
            return out, None
        out.append(told)
    return out, state
