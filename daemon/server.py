"""The daemon: one ROUTER socket, a poll loop, handlers named after the verbs, a fill pool.

``Server`` owns the loop, the sockets, the store and the fill pool, and dispatches each request
by its class through a table: STATS, PING and TOUCH here, GET to ``self.prefixes``
(daemon/prefixes.py), AUTO and TELL to ``self.chains`` (daemon/chains.py), objects composed of
what they use. Every fill is a flight (daemon/flights.py): one per key, the GETs that wait for it
answered when it lands.

Threading model. The loop thread owns the socket and the store: it receives every request,
answers GETs straight from the store (a dict lookup, a memcmp and a send: a GET never waits for
an encode) and sends every reply. A miss that asks for a fill submits the encode to a small pool
(daemon/fills.py; tiktoken releases the GIL while it encodes); the worker hands its result back
and writes one byte to a pipe the loop polls next to the socket, and the loop stores the
result. So the store needs no lock, and ZeroMQ's rule that a socket belongs to one thread holds.
A fill that runs past its time budget is abandoned (``fills_abandoned``). Nothing the loop does
waits on a library lock: encodings are loaded on the pool only (tiktoken's registry lock can be
held for as long as a download takes).
Rejected: an inproc PAIR socket per worker (a socket per thread, for what a pipe byte does), and
a lock around the store (every GET would pay for it, and replies would still have to be sent
from the loop thread).

Nothing a client sends can stop the loop: a malformed request gets a CLIENT_ERROR reply and
counts ``protocol_errors``; an unexpected exception in a handler gets a SERVER_ERROR reply; an
exception in a fill, ``BaseException`` included (o200k's ``PanicException`` on ~1M spaces), is
logged, counted in ``fill_errors``, remembered, and answered as SERVER_ERROR for that prefix.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import tiktoken
import zmq

import flashtoken
from flashtoken.boundary import uncached_encodings
from flashtoken.errors import ProtocolError
from flashtoken.wire import (
    CLIENT_ERROR,
    MAX_HEADER_BYTES,
    SERVER_ERROR,
    AutoRequest,
    ErrorReply,
    GetMiss,
    GetRequest,
    PingRequest,
    Pong,
    Request,
    StatsReply,
    StatsRequest,
    TellRequest,
    TouchRequest,
    auth,
    ipc_path,
    parse_request,
    request_id_of,
)

from . import budget
from .binding import (
    InstanceLock,
    StartupError,
    bind_private,
    bind_publisher,
    bounded,
    curve_server,
    memory,
    receive,
    take_lock,
)
from .budget import Outstanding
from .chains import Chains
from .encodings import Encodings, load
from .fills import FillPool
from .fleet import FleetConfigError, FleetTier
from .flights import Flights
from .hostmap import HostMap
from .limits import PeerLimit, peer_cap, raise_nofile
from .prefixes import Prefixes, Wait
from .settings import Config
from .store import Store

log = logging.getLogger("flashtoken.daemon")

_POLL_MS = 1000
_RECV_BATCH = 256


class Server:
    """The daemon. ``Server(config).serve()`` runs until ``stop()`` or SIGTERM / SIGINT."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.encodings = Encodings(config.backend)
        self.store = Store(
            config.max_bytes, self.encodings.decoder, debug_key_bytes=config.debug_key_bytes
        )
        self.fleet: FleetTier | None = None  # the fleet tier (daemon/fleet.py), if configured
        self.hostmap: HostMap | None = None  # the host's shared map (ipc:// only)
        self._pool = FillPool(config.fill_threads, self._wake)
        self._replies = Outstanding(budget.REPLY_BYTES_PER_PEER, budget.REPLY_BYTES_TOTAL)
        self._limit = PeerLimit(peer_cap(1024))
        self._stopping = False
        self._started = time.monotonic()
        self._parent = os.getppid()
        self._lock: InstanceLock | None = None
        self._socket_path: str | None = None
        self._ctx: zmq.Context | None = None
        self._keys: auth.Keys | None = None  # tcp:// only: CURVE (flashtoken/wire/auth.py)
        self._zap: auth.ZapHandler | None = None
        self._router: zmq.Socket | None = None
        self._publish_path: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.counters = {
            "fills": 0,
            "auto_fills": 0,
            "fill_errors": 0,
            "protocol_errors": 0,
            "tokens_served": 0,
            "blocks_published": 0,
            "tells_unplaced": 0,
            "tells_refused": 0,
            "tells_from_state": 0,  # TELLs checked from a kept digest state (daemon/chains.py)
            "server_errors": 0,
            "fills_abandoned": 0,
            "fills_refused": 0,
            "waited_hits": 0,  # GET misses answered with their fill's tokens (daemon/flights.py)
            "waited_misses": 0,  # ... answered as misses after waiting
        }
        self.flights = Flights(
            self._pool, self._send, self.counters, max_pending=config.max_pending_fills
        )
        self.prefixes = Prefixes(
            self.store,
            self.encodings,
            self.flights,
            self.counters,
            salt=os.urandom(16),
            debug_key_bytes=config.debug_key_bytes,
        )
        self.chains = Chains(
            self.store,
            self.encodings,
            self.flights,
            self.counters,
            Outstanding(budget.PUBLISH_BYTES, budget.PUBLISH_BYTES),
        )
        # One handler per request class (flashtoken/wire/requests.py), named after its verb.
        self._handlers: dict[type[Request], Callable[[Any], list[Any] | Wait]] = {
            GetRequest: self.prefixes.on_get,
            AutoRequest: self.chains.on_auto,
            TellRequest: self.chains.on_tell,
            TouchRequest: self.on_touch,
            StatsRequest: self.on_stats,
            PingRequest: self.on_ping,
        }

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load the preloaded encodings, take the single-instance lock, bind.

        Raises StartupError with a message fit for the user.
        """
        for name in self.config.encodings:
            try:
                self.encodings.keep(name, load(name, self.config.backend))
            except Exception as exc:
                raise StartupError(f"cannot load encoding {name!r}: {exc}") from exc
        # Once, before the loop: asking tiktoken on the loop would wait on its registry lock,
        # which a fill loading an encoding holds for as long as its download takes.
        self.encodings.known = frozenset(tiktoken.list_encoding_names())
        try:
            self.fleet = self.prefixes.fleet = FleetTier.from_config(self.config)
        except FleetConfigError as exc:
            raise StartupError(str(exc)) from exc
        address = self.config.bind
        path = ipc_path(address)
        if path is not None:
            self._lock = take_lock(path, address)
            # Test-only forced collisions exercise the in-memory store's checks: no map then.
            if self.config.debug_key_bytes is None:
                self.hostmap = self.prefixes.hostmap = self._open_map(path)
        self._limit = PeerLimit(peer_cap(raise_nofile()))
        self._ctx = zmq.Context()
        if address.startswith("tcp://"):
            try:
                self._keys, self._zap = curve_server(self._ctx)
            except StartupError:
                self._close()
                raise
        router = self._router = self._ctx.socket(zmq.ROUTER)
        bounded(router, self.config.hwm)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full queue is EAGAIN (counted), not silent
        # libzmq drops a peer that sends a frame larger than this, before we ever see it.
        router.setsockopt(zmq.MAXMSGSIZE, self.config.max_prefix_bytes + MAX_HEADER_BYTES)
        try:
            self._socket_path = bind_private(router, address, self._keys)
            self.chains.publisher, self._publish_path = bind_publisher(
                self._ctx, address, self.config.hwm, self._keys
            )
        except StartupError:
            self._close()
            raise
        self._poller = zmq.Poller()
        self._poller.register(router, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        for sock, path in (
            (router, self._socket_path),
            (self.chains.publisher, self._publish_path),
        ):
            if sock is not None:
                self._poller.register(self._limit.watch(sock, path), zmq.POLLIN)
        log.info(
            "flashtoken-daemon %s (pid %d) serving %s, max_bytes=%d, encodings=%s",
            flashtoken.__version__,
            os.getpid(),
            address,
            self.config.max_bytes,
            ",".join(self.encodings.loaded) or "-",
        )

    def _open_map(self, path: str) -> HostMap | None:
        import lmdb

        try:
            return HostMap(path, self.config.max_bytes)
        except (lmdb.Error, OSError) as exc:
            log.warning("no shared map (workers will ask for every prefix): %s", exc)
            return None

    def serve(self, *, install_signals: bool = True) -> None:
        """Start (if not started) and run the loop until stopped; always cleans up."""
        if self._router is None:
            self.start()
        # Fills run Python between their tiktoken calls (cuts, frames), holding the GIL; with
        # the default 5 ms switch interval a request could wait that long behind one. The loop
        # thread wants the GIL back within a fraction of a round trip.
        sys.setswitchinterval(0.0002)
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: self.stop())
        try:
            while not self._stopping:
                events = dict(self._poller.poll(self._poll_ms()))
                if self._router in events:
                    self._drain_router()
                if self._wake_r in events:
                    self._drain_wake()
                for monitor in self._limit.monitors:
                    if monitor in events:
                        self._limit.drain(monitor)
                self._housekeeping()
        finally:
            self._close()

    def stop(self) -> None:
        """Ask the loop to stop; safe from a signal handler or another thread."""
        self._stopping = True
        self._wake()

    def _close(self) -> None:
        # A running encode cannot be interrupted; queued ones are dropped, and the threads are
        # daemon threads: stopping never waits on one.
        self._pool.close()
        self.flights.clear()
        self._limit.close()
        if self.fleet is not None:
            self.fleet.close()
        if self.hostmap is not None:
            self.hostmap.close()
        for sock in (self._router, self.chains.publisher):
            if sock is not None:
                sock.close(linger=0)
        if self._zap is not None:
            self._zap.stop()  # its socket closed: the context's term would wait for it
        if self._ctx is not None:
            self._ctx.term()
        for path in (self._socket_path, self._publish_path):
            if path is not None:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        if self._lock is not None:
            # The lock file stays: unlinking it would let a new daemon lock a fresh inode while
            # a third still waits on the old one.
            self._lock.close()
            self._lock = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        log.info("flashtoken-daemon stopped")

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (the loop will wake anyway) or already closed

    def _drain_wake(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass

    def _housekeeping(self) -> None:
        landed = self.flights.land()
        for _, args in self.flights.abandon_overdue():
            landed += 1
            log.warning("fill of a %s text abandoned after %g s", args[1].enc, self._pool.budget)
        if landed and self.chains.parked:
            self.chains.unpark()  # their parents may have landed, or no fill is left to wait for
        self._replies.reap()
        self.chains.publications.reap()
        self.flights.expire()
        if self.hostmap is not None:
            # One budget for declared prefixes (the map) and chains (in memory): the chains'
            # bytes are taken first, the map evicts to what is left.
            self.hostmap.share(self.config.max_bytes, self.store.used_bytes)
            self.hostmap.housekeeping()
        self.store.compact()
        if self.config.exit_with_parent and os.getppid() != self._parent:
            log.info("parent process %d exited; stopping", self._parent)
            self._stopping = True

    # -- requests -----------------------------------------------------------------------------

    def _drain_router(self) -> None:
        router = self._router
        assert router is not None
        for _ in range(_RECV_BATCH):
            try:
                identity, body, refused = receive(router, self.config.max_prefix_bytes)
            except zmq.Again:
                return
            if refused:
                self.counters["protocol_errors"] += 1
                reply: list[Any] | Wait = ErrorReply(
                    request_id_of(body), CLIENT_ERROR, refused
                ).frames()
            else:
                reply = self._handle(body)
            if isinstance(reply, Wait):
                if self.flights.wait(reply.key, identity, reply.id, reply.budget_s):
                    continue
                reply = GetMiss(reply.id, False).frames()
            if not reply:
                continue  # a request that asked for no reply
            self._send(identity, reply)

    def _send(self, identity: bytes, reply: list[Any]) -> None:
        router = self._router
        assert router is not None
        size = sum(len(frame) for frame in reply)
        if not self._replies.admit(identity, size):
            return  # that client does not read its replies: it falls back, as on a timeout
        try:
            tracker = router.send_multipart([identity, *reply], zmq.NOBLOCK, copy=False, track=True)
            self._replies.sent(identity, size, tracker)
        except zmq.Again:  # that client's queue is full: it will time out and fall back
            self._replies.dropped += 1
        except zmq.ZMQError as exc:  # EHOSTUNREACH: that client is gone
            self._replies.dropped += 1
            log.debug("reply dropped: %s", exc)

    def _handle(self, body: list[bytes]) -> list[Any] | Wait:
        request_id = 0
        try:
            request = parse_request(body, max_prefix_bytes=self.config.max_prefix_bytes)
            request_id = request.id
            reply: list[Any] | Wait = self._handlers[type(request)](request)  # []: no answer
            return reply
        except ProtocolError as exc:
            self.counters["protocol_errors"] += 1
            log.debug("CLIENT_ERROR: %s", exc)
            return ErrorReply(request_id or request_id_of(body), CLIENT_ERROR, str(exc)).frames()
        except Exception as exc:  # a bug of ours: answer, log, keep serving
            self.counters["server_errors"] += 1
            log.exception("SERVER_ERROR while handling a request")
            return ErrorReply(request_id, SERVER_ERROR, f"{type(exc).__name__}: {exc}").frames()

    def on_ping(self, request: Request) -> list[Any]:
        return Pong(request.id, pid=os.getpid(), version=flashtoken.__version__).frames()

    def on_stats(self, request: Request) -> list[Any]:
        return StatsReply(request.id, stats=self.stats(), settings=self.config.report()).frames()

    def on_touch(self, request: Request) -> list[Any]:
        """Hits workers took from the map themselves: most recently used now, and counted."""
        assert isinstance(request, TouchRequest)
        if self.hostmap is not None:
            self.store.count_hits(self.hostmap.touch(request.keys))
        return []

    def _poll_ms(self) -> int:
        first = self.flights.next_deadline()
        if first is None:
            return _POLL_MS
        return max(0, min(_POLL_MS, int((first - time.monotonic()) * 1000) + 1))

    # -- stats --------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pid": os.getpid(),
            "uptime": int(time.monotonic() - self._started),
            "time": int(time.time()),
            "version": flashtoken.__version__,
            "tiktoken_version": tiktoken.__version__,
        }
        out.update(self.store.stats())
        out.update(self.counters)
        out["fills_pending"] = len(self.flights)
        if self.fleet is not None:
            out.update(self.fleet.stats())
        if self.hostmap is not None:
            held = self.hostmap.stats()
            out.update(held)
            # memcached's totals cover both: declared prefixes (the map), chains (in memory).
            for name in ("curr_items", "bytes", "evictions"):
                out[name] += held["map_" + name]
            out["total_items"] = out.get("total_items", 0) + held["map_stores"]
        # Cached tokens sent on the socket, and read from the map by workers (counted at TOUCH).
        out["socket_tokens_served"] = out["tokens_served"]
        out["tokens_served"] += out.setdefault("map_tokens_served", 0)
        out["uncached_encodings"] = uncached_encodings()
        # What encodes each encoding's fills: --backend, or tiktoken where it failed its gate.
        out["backend_in_use"] = [
            f"{n}={e.encoder.backend}" for n, e in self.encodings.loaded.items()
        ]
        out["fills_running"] = self._pool.running()
        out["replies_dropped"] = self._replies.dropped
        out["publications_dropped"] = self.chains.publications.dropped
        out["reply_bytes_queued"] = self._replies.total
        out["fill_bytes_pending"] = self.flights.pending_bytes
        out["parked_bytes"] = self.chains.parked_bytes
        out.update(memory())
        out.update(self._limit.stats())
        out["limit_rss_bytes"] = self.config.max_bytes + budget.overhead_bytes(
            self.config.fill_threads, self._limit.cap
        )
        out["encodings_loaded"] = sorted(self.encodings.loaded)
        return out
