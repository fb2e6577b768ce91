"""Declared prefixes in the daemon: GET, and the fill of a prefix (a chain of one block).

A GET is answered from the host map (daemon/hostmap.py, where workers read declared prefixes
themselves) or the store (daemon/store.py: a root node, confirmed by its bytes), and never waits
for an encode on the loop. A miss that asks for a fill starts a flight (daemon/flights.py) that
encodes the prefix on the pool, the fleet tier first if there is one (daemon/fleet.py); the GET
that started it and every GET for the same prefix meanwhile wait for it, each within the
``wait_ms`` its client sent, so one encode serves them all.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from dataclasses import dataclass
from typing import Any

from flashtoken.prefix import split_prefix
from flashtoken.wire import (
    SERVER_ERROR,
    ErrorReply,
    GetHit,
    GetMiss,
    GetRequest,
    Request,
    make_key,
    tokens_to_frame,
)

from .encodings import Encodings, Loaded, check_loaded
from .fleet import FleetTier
from .fleetcodec import Found
from .flights import Answer, Flights, fill_error
from .hostmap import HostMap
from .store import PrefixScope, Store

log = logging.getLogger("flashtoken.daemon")


@dataclass(frozen=True)
class Wait:
    """A GET answered later: when the flight of ``key`` lands, or after ``budget_s``."""

    key: Any
    id: int
    budget_s: float


@dataclass(frozen=True)
class _Filled:
    """What a prefix's fill hands the loop: its split, or why there is none."""

    key: bytes
    request: GetRequest
    found: Found | None = None
    loaded: Loaded | None = None
    error: str | None = None


class Prefixes:
    """The GET handler and the fills of declared prefixes."""

    def __init__(
        self,
        store: Store,
        encodings: Encodings,
        flights: Flights,
        counters: dict[str, int],
        *,
        salt: bytes,
        debug_key_bytes: int | None,
    ) -> None:
        self.store = store
        self.encodings = encodings
        self.flights = flights
        self.counters = counters
        # Salts this daemon's keys: crafting texts whose keys collide needs it (it never leaves
        # the process), so no one can aim a collision at another's prefix to deny it its entry.
        self._salt = salt
        self._key_bytes = debug_key_bytes
        self.hostmap: HostMap | None = None  # set once the daemon has opened it (ipc:// only)
        self.fleet: FleetTier | None = None  # the fleet tier, if configured
        self.max_bytes = store.max_bytes  # one budget for the map and the in-memory store

    def on_get(self, request: Request) -> list[Any] | Wait:
        assert isinstance(request, GetRequest)
        self.encodings.check(request)
        if self.hostmap is not None:
            held = self.hostmap.get(request.ns, request.eid, request.allowed, request.prefix)
            if held is not None:  # stored since the worker looked, or a worker without the map
                self.store.count_hits(1)
                self.counters["tokens_served"] += len(held[1]) // 4
                return GetHit(request.id, *held).frames()
        # The key is the daemon's own, from the bytes it received: a client never names it.
        key = make_key(self._salt + request.ns, request.eid, request.allowed, request.prefix)
        if self._key_bytes is not None:
            key = key[: self._key_bytes]  # test-only: force collisions
        flight = (key, request.enc, request.allowed, _digest(request.prefix))
        failed = self.flights.failed(flight)
        if failed is not None:
            self.store.count_miss()
            return ErrorReply(
                request.id, SERVER_ERROR, f"this prefix cannot be encoded: {failed}"
            ).frames()
        scope = PrefixScope(request.enc, request.allowed, request.ns)
        node = self.store.get(key, request.prefix, scope)
        if node is not None:
            self.counters["tokens_served"] += len(node.tokens) // 4
            return GetHit(request.id, node.cut, node.tokens).frames()
        # peek: a key held by another prefix (a collision) is not refilled; see Store.
        if request.fill and self.store.peek(key) is None:
            size = len(request.prefix)
            self.flights.start(flight, size, self._landed, self._fill, key, request)
        filling = flight in self.flights
        if filling and request.fill:
            budget_s = request.wait_ms / 1000
            if self.fleet is not None:
                # A fleet lookup may take its own time: a late host's first request for a prefix
                # the fleet holds is then answered from it, not encoded by the worker.
                budget_s = max(budget_s, self.fleet.wait_s(len(request.prefix)))
            if budget_s > 0:
                return Wait(flight, request.id, budget_s)
        return GetMiss(request.id, filling).frames()

    def _fill(self, key: bytes, request: GetRequest) -> _Filled:
        """On a pool thread: encode the prefix; the result goes to the loop. Never raises."""
        try:
            loaded = self.encodings.get_or_load(request.enc)
            check_loaded(loaded, request)
            prefix = request.prefix.decode("utf-8")
            # The fleet tier first (its own timeout; a checked value or None), then tiktoken.
            fleet, scope = self.fleet, (loaded, request.allowed, request.prefix)
            found = fleet.lookup(request.ns, *scope, prefix) if fleet else None
            if found is None:
                split = split_prefix(
                    loaded.enc,
                    prefix,
                    allowed_special=frozenset(request.allowed),
                    backend=loaded.encoder,
                )
                found = Found(
                    tokens_to_frame(array("I", split.head)),
                    split.cut,
                    len(prefix[: split.cut].encode("utf-8")),
                )
                if fleet:
                    fleet.put(request.ns, *scope, found)  # queued: written behind
            return _Filled(key, request, found=found, loaded=loaded)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: B036 - pyo3's PanicException is a BaseException
            return _Filled(key, request, error=fill_error(exc))

    def _landed(self, result: _Filled) -> Answer:
        """On the loop: store a prefix's fill; the answer for the GETs that waited for it."""
        request = result.request
        if result.error is not None:
            self.flights.fill_failed(
                (result.key, request.enc, request.allowed, _digest(request.prefix)),
                result.error,
                f"a {len(request.prefix)}-byte {request.enc} prefix",
            )
            return None
        found = result.found
        assert found is not None and result.loaded is not None
        self.encodings.keep(request.enc, result.loaded)
        self.counters["fills"] += 1
        # A declared prefix lives in the host map, where workers read it: once, not also here.
        if self.hostmap is not None:
            self.hostmap.share(self.max_bytes, self.store.used_bytes)
        stored = self.hostmap is not None and self.hostmap.store(
            request.ns, request.eid, request.allowed, request.prefix, found.cut, found.tokens
        )
        if not stored:
            scope = PrefixScope(request.enc, request.allowed, request.ns)
            node = self.store.prefix_node(
                result.key, request.prefix, scope, found.cut, found.cut_byte, found.tokens
            )
            if not self.store.put(node):
                log.debug("fill of a %d-byte prefix not stored", len(request.prefix))
        cut, tokens = found.cut, found.tokens

        def answer(request_id: int) -> list[Any]:
            self.counters["tokens_served"] += len(tokens) // 4
            return GetHit(request_id, cut, tokens).frames()

        return answer


def _digest(prefix: bytes) -> bytes:
    # A digest of the prefix, not the prefix: the memory of failed fills stays small whatever
    # was sent, and names this prefix even where test-only truncated keys collide.
    return hashlib.blake2b(prefix, digest_size=16).digest()
