"""The daemon: one ROUTER socket, a poll loop, handlers named after the verbs, a fill pool.

This module serves declared prefixes (GET), STATS and PING; the chain ops (AUTO, TELL) and the
PUB socket's publications are daemon/chains.py's, a mixin of ``Server``.

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

import errno
import hashlib
import logging
import os
import signal
import stat
import sys
import threading
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tiktoken
import zmq

import flashtoken
from flashtoken.boundary import uncached_encodings
from flashtoken.errors import DaemonUnavailable, ProtocolError
from flashtoken.prefix import split_prefix
from flashtoken.wire import (
    CLIENT_ERROR,
    MAX_HEADER_BYTES,
    SERVER_ERROR,
    AutoRequest,
    ErrorReply,
    GetHit,
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
    make_key,
    parse_request,
    publish_address,
    request_id_of,
    tokens_to_frame,
)

from . import budget
from .budget import Outstanding
from .chains import ChainHandlers, ChainResult
from .encodings import Loaded, check_loaded, load
from .fills import FillPool
from .fleet import FleetConfigError, FleetTier, Found
from .hostmap import HostMap
from .limits import PeerLimit, peer_cap, raise_nofile
from .settings import FAILED_FILLS_KEPT, Config
from .store import Entry, Store

log = logging.getLogger("flashtoken.daemon")

# Longest path a unix socket address can hold (sun_path is 108 bytes on Linux, with its NUL).
_MAX_IPC_PATH_BYTES = 107
_POLL_MS = 1000
_RECV_BATCH = 256


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class _Deferred:
    """A GET answered when its fill is done, or at ``deadline`` (see on_get)."""

    key: bytes
    id: int
    deadline: float


@dataclass(frozen=True)
class _FillResult:
    key: Any
    request: GetRequest
    entry: Entry | None = None
    loaded: Loaded | None = None
    error: str | None = None


class Server(ChainHandlers):
    """The daemon. ``Server(config).serve()`` runs until ``stop()`` or SIGTERM / SIGINT."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.max_bytes, debug_key_bytes=config.debug_key_bytes)
        self._encodings: dict[str, Loaded] = {}
        self._filling: set[Any] = set()
        # Chain fills that failed (o200k's panic on ~1M spaces), so that they are not retried
        # on every request: keyed by (seed, blocks found, the first new block's bytes).
        self._failed_auto: OrderedDict[Any, str] = OrderedDict()
        self._parked: deque[TellRequest] = deque()  # TELLs whose parent is being filled
        self._parked_bytes = 0
        self._failed: OrderedDict[bytes, tuple[str, tuple[str, ...], bytes, str]] = OrderedDict()
        # GETs waiting for their fill: key -> [(identity, request id, deadline)].
        self._waiting: dict[bytes, list[tuple[bytes, int, float]]] = {}
        self.fleet: FleetTier | None = None  # the fleet tier (daemon/fleet.py), if configured
        self.hostmap: HostMap | None = None  # the host's shared map (ipc:// only)
        self._pool = FillPool(config.fill_threads, self._wake)
        self._pending_bytes: dict[Any, int] = {}  # bytes of the requests waiting for a fill
        self._replies = Outstanding(budget.REPLY_BYTES_PER_PEER, budget.REPLY_BYTES_TOTAL)
        self._publications = Outstanding(budget.PUBLISH_BYTES, budget.PUBLISH_BYTES)
        self._known_encodings: frozenset[str] = frozenset()
        self._limit = PeerLimit(peer_cap(1024))
        # Salts this daemon's keys: crafting texts whose keys collide needs it (it never leaves
        # the process), so no one can aim a collision at another's prefix to deny it its entry.
        self._salt = os.urandom(16)
        self._stopping = False
        self._started = time.monotonic()
        self._parent = os.getppid()
        self._lock_fd: int | None = None
        self._socket_path: str | None = None
        self._ctx: zmq.Context | None = None
        self._keys: auth.Keys | None = None  # tcp:// only: CURVE (flashtoken/wire/auth.py)
        self._zap: auth.ZapHandler | None = None
        self._router: zmq.Socket | None = None
        self._publisher: zmq.Socket | None = None
        self._publish_path: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # One handler per request class (flashtoken/wire/requests.py), named after its verb.
        self._handlers: dict[type[Request], Callable[[Any], list[Any] | _Deferred]] = {
            GetRequest: self.on_get,
            AutoRequest: self.on_auto,
            TellRequest: self.on_tell,
            TouchRequest: self.on_touch,
            StatsRequest: self.on_stats,
            PingRequest: self.on_ping,
        }
        self.counters = {
            "fills": 0,
            "auto_fills": 0,
            "fill_errors": 0,
            "protocol_errors": 0,
            "tokens_served": 0,
            "blocks_published": 0,
            "tells_unplaced": 0,
            "tells_refused": 0,
            "server_errors": 0,
            "fills_abandoned": 0,
            "fills_refused": 0,
            "waited_hits": 0,  # GET misses answered with their fill's tokens (see on_get)
            "waited_misses": 0,  # ... answered as misses after waiting
        }

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load the preloaded encodings, take the single-instance lock, bind.

        Raises StartupError with a message fit for the user.
        """
        for name in self.config.encodings:
            try:
                self._encodings[name] = load(name, self.config.backend)
            except Exception as exc:
                raise StartupError(f"cannot load encoding {name!r}: {exc}") from exc
        # Once, before the loop: asking tiktoken on the loop would wait on its registry lock,
        # which a fill loading an encoding holds for as long as its download takes.
        self._known_encodings = frozenset(tiktoken.list_encoding_names())
        try:
            self.fleet = FleetTier.from_config(self.config)
        except FleetConfigError as exc:
            raise StartupError(str(exc)) from exc
        address = self.config.bind
        path = ipc_path(address)
        if path is not None:
            if not (auth.ipc_available() and auth.fcntl_available()):
                raise StartupError(
                    f"cannot serve {address}: ipc:// (and its lock, fcntl) is not available"
                    f" here; bind {auth.DEFAULT_TCP_ADDRESS} (this platform's default),"
                    " authenticated with the keys of its tcp:// key file"
                )
            self._take_lock(path, address)
            # Test-only forced collisions exercise the in-memory store's checks: no map then.
            if self.config.debug_key_bytes is None:
                self.hostmap = self._open_map(path)
        self._limit = PeerLimit(peer_cap(raise_nofile()))
        self._ctx = zmq.Context()
        if address.startswith("tcp://"):
            # TCP has no owner: CURVE keys from a private file, the ZAP handler before any bind.
            try:
                self._keys = auth.make_keys(auth.key_file())
            except (DaemonUnavailable, OSError) as exc:
                self._close()
                raise StartupError(f"cannot use the tcp:// key file: {exc}") from exc
            self._zap = auth.ZapHandler(self._ctx, self._keys)
        router = self._router = self._ctx.socket(zmq.ROUTER)
        _bounded(router, self.config.hwm)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full queue is EAGAIN (counted), not silent
        # libzmq drops a peer that sends a frame larger than this, before we ever see it.
        router.setsockopt(zmq.MAXMSGSIZE, self.config.max_prefix_bytes + MAX_HEADER_BYTES)
        try:
            self._socket_path = _bind_private(router, address, self._keys)
        except zmq.ZMQError as exc:
            self._close()
            # On tcp:// the port is the single-instance lock: libzmq binds it exclusively.
            held = exc.errno == errno.EADDRINUSE
            raise StartupError(
                f"cannot bind {address}: {exc}"
                + ("; another flashtoken-daemon may be serving it" if held else "")
            ) from exc
        if self._keys is not None:
            log.info(
                "listening on %s with CURVE: only clients holding the keys in %s get in",
                address,
                auth.key_file(),
            )
        self._bind_publisher(address)
        self._poller = zmq.Poller()
        self._poller.register(router, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        for sock, path in ((router, self._socket_path), (self._publisher, self._publish_path)):
            if sock is not None:
                self._poller.register(self._limit.watch(sock, path), zmq.POLLIN)
        log.info(
            "flashtoken-daemon %s (pid %d) serving %s, max_bytes=%d, encodings=%s",
            flashtoken.__version__,
            os.getpid(),
            address,
            self.config.max_bytes,
            ",".join(self._encodings) or "-",
        )

    def _open_map(self, path: str) -> HostMap | None:
        import lmdb

        try:
            return HostMap(path, self.config.max_bytes)
        except (lmdb.Error, OSError) as exc:
            log.warning("no shared map (workers will ask for every prefix): %s", exc)
            return None

    def _take_lock(self, path: str, address: str) -> None:
        """One daemon per socket path: an exclusive flock on ``{path}.lock``, held for life.

        Two processes binding one ipc path would both succeed, and the second would silently
        take the path from the first. With the lock held, a socket file left at the path is
        stale (its owner is gone) and is removed.
        """
        if len(path.encode()) > _MAX_IPC_PATH_BYTES:
            raise StartupError(
                f"socket path {path!r} is longer than {_MAX_IPC_PATH_BYTES} bytes;"
                " choose a shorter --bind ipc:// path"
            )
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            raise StartupError(f"directory {directory} of {address} does not exist")
        # O_NOFOLLOW: in a shared directory, another user could have planted a symlink here to
        # make the daemon write its pid into a file of its own. And it must be ours.
        try:
            fd = os.open(
                path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
            )
        except OSError as exc:
            raise StartupError(
                f"cannot open the lock file {path}.lock ({exc.strerror}; a symlink is refused);"
                " remove it, or choose another --bind"
            ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            os.close(fd)
            raise StartupError(
                f"the lock file {path}.lock is not a private file of uid {os.geteuid()} (uid"
                f" {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); remove it, or choose"
                " another --bind"
            )
        try:
            import fcntl  # checked in start(): absent on Windows, where the port is the lock

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise StartupError(
                f"another flashtoken-daemon (pid {owner}) is serving {address};"
                " stop it first, or pass another --bind"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        for stale in (path, path + ".full"):  # .full: moved aside by daemon/limits.py
            try:
                st = os.lstat(stale)
            except FileNotFoundError:
                continue
            if st.st_uid != os.geteuid():
                raise StartupError(
                    f"{stale} belongs to uid {st.st_uid}, not to this daemon's; remove it, or"
                    " choose another --bind"
                )
            log.info("removing stale socket %s", stale)
            os.unlink(stale)

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

    def _bind_publisher(self, address: str) -> None:
        """The PUB socket that sends every chain block stored to the clients that follow
        chains (docs/PROTOCOL.md, "Publishing"): private like the main socket."""
        where = publish_address(address)
        if where is None:
            log.info("no publish address for %s: clients will not follow chains", address)
            return
        assert self._ctx is not None
        pub = self._publisher = self._ctx.socket(zmq.PUB)
        _bounded(pub, self.config.hwm)
        try:
            self._publish_path = _bind_private(pub, where, self._keys)
        except zmq.ZMQError as exc:
            self._close()
            raise StartupError(f"cannot bind the publish address {where}: {exc}") from exc

    def stop(self) -> None:
        """Ask the loop to stop; safe from a signal handler or another thread."""
        self._stopping = True
        self._wake()

    def _close(self) -> None:
        # A running encode cannot be interrupted; queued ones are dropped, and the threads are
        # daemon threads: stopping never waits on one.
        self._pool.close()
        self._pending_bytes.clear()
        self._limit.close()
        if self.fleet is not None:
            self.fleet.close()
        if self.hostmap is not None:
            self.hostmap.close()
        for sock in (self._router, self._publisher):
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
        if self._lock_fd is not None:
            # The lock file stays: unlinking it would let a new daemon lock a fresh inode while
            # a third still waits on the old one.
            os.close(self._lock_fd)
            self._lock_fd = None
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
        for key, result in self._pool.done():
            self._pending_bytes.pop(key, None)
            self._on_fill_done(result)
        for key, args in self._pool.overdue():
            self._pending_bytes.pop(key, None)
            self._abandon(key, args[1])
        self._replies.reap()
        self._publications.reap()
        if self._waiting:
            self._expire_waiting()
        if self.hostmap is not None:
            # One budget for declared prefixes (the map) and chains (in memory): the chains'
            # bytes are taken first, the map evicts to what is left.
            self.hostmap.share(self.config.max_bytes, self.store.bytes)
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
                identity, body, refused = self._recv(router)
            except zmq.Again:
                return
            if refused:
                self.counters["protocol_errors"] += 1
                reply: list[Any] | _Deferred = ErrorReply(
                    request_id_of(body), CLIENT_ERROR, refused
                ).frames()
            else:
                reply = self._handle(body)
            if isinstance(reply, _Deferred):
                self._waiting.setdefault(reply.key, []).append((identity, reply.id, reply.deadline))
                continue
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

    def _recv(self, router: zmq.Socket) -> tuple[bytes, list[Any], str | None]:
        """One request, its frames checked as they come: of a message with more frames or more
        bytes than a request can have, only the header is kept and the rest is read and dropped
        uncopied (``recv_multipart`` copied every frame of a 200-frame, 800 MiB message first).
        Returns the identity, the frames and why the message is refused (None: it is not).
        Raises zmq.Again when there is none."""
        identity = router.recv(zmq.NOBLOCK, copy=False)
        more = identity.more
        body: list[Any] = []
        frames, size, limit = 0, 0, self.config.max_prefix_bytes + MAX_HEADER_BYTES
        while more:
            frame = router.recv(copy=False)  # the rest of a message is there (atomic delivery)
            more = frame.more
            frames, size = frames + 1, size + len(frame)
            if frames <= 2 and size <= limit:
                body.append(frame.buffer)
        refused = None
        if frames > 2:
            refused = f"a request has 1 or 2 frames, not {frames}"
        elif size > limit:
            refused = f"a request of {size} bytes exceeds the limit of {limit}"
        return identity.bytes, body, refused

    def _handle(self, body: list[bytes]) -> list[Any] | _Deferred:
        request_id = 0
        try:
            request = parse_request(body, max_prefix_bytes=self.config.max_prefix_bytes)
            request_id = request.id
            reply: list[Any] | _Deferred = self._handlers[type(request)](request)  # []: no answer
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

    def on_get(self, request: Request) -> list[Any] | _Deferred:
        assert isinstance(request, GetRequest)
        self._check_encoding(request)
        if self.hostmap is not None:
            held = self.hostmap.get(request.ns, request.eid, request.allowed, request.prefix)
            if held is not None:  # stored since the worker looked, or a worker without the map
                self.store.count_hits(1)
                self.counters["tokens_served"] += len(held[1]) // 4
                return GetHit(request.id, *held).frames()
        # The key is the daemon's own, from the bytes it received: a client never names it.
        key = make_key(self._salt + request.ns, request.eid, request.allowed, request.prefix)
        if self.config.debug_key_bytes is not None:
            key = key[: self.config.debug_key_bytes]  # test-only: force collisions
        failed = self._failed.get(key)
        if failed is not None and failed[:3] == (
            request.enc,
            request.allowed,
            _digest(request.prefix),
        ):
            self.store.count_miss()
            return ErrorReply(
                request.id, SERVER_ERROR, f"this prefix cannot be encoded: {failed[3]}"
            ).frames()
        entry = self.store.get(key, request.prefix, request.enc, request.allowed, request.ns)
        if entry is not None:
            self.counters["tokens_served"] += len(entry.tokens) // 4
            return GetHit(request.id, entry.cut, entry.tokens).frames()
        filling = key in self._filling
        if (
            request.fill
            and not filling
            and self.store.peek(key) is None
            and len(self._filling) < self.config.max_pending_fills
        ):
            # peek: a key held by another prefix (a collision) is not refilled; see Store.
            filling = self._submit(key, self._fill, key, request)
        if filling and request.fill and self.fleet is not None:
            # The fill asks the fleet tier first: a late host's first request for a prefix the
            # fleet holds is answered from it, not encoded by the worker. Waited for at most what
            # encoding the prefix would cost the worker, so a fleet miss costs it at most twice.
            wait = self.fleet.wait_s(len(request.prefix))
            if wait > 0:
                return _Deferred(key, request.id, time.monotonic() + wait)
        return GetMiss(request.id, filling).frames()

    def _poll_ms(self) -> int:
        if not self._waiting:
            return _POLL_MS
        first = min(d for waiters in self._waiting.values() for _, _, d in waiters)
        return max(0, min(_POLL_MS, int((first - time.monotonic()) * 1000) + 1))

    def _answer_waiting(self, key: Any, entry: Entry | None) -> None:
        """Answer the GETs waiting for ``key``: a hit if its fill made ``entry``, else a miss
        (their workers encode locally, as they would have without waiting)."""
        for identity, request_id, _ in self._waiting.pop(key, ()):
            if entry is not None:
                self.counters["waited_hits"] += 1
                self.counters["tokens_served"] += len(entry.tokens) // 4
                self._send(identity, GetHit(request_id, entry.cut, entry.tokens).frames())
            else:
                self.counters["waited_misses"] += 1
                self._send(identity, GetMiss(request_id, False).frames())

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        for key in [k for k, ws in self._waiting.items() if any(d <= now for _, _, d in ws)]:
            keep = []
            for identity, request_id, deadline in self._waiting.pop(key):
                if deadline <= now:
                    self.counters["waited_misses"] += 1
                    self._send(identity, GetMiss(request_id, True).frames())
                else:
                    keep.append((identity, request_id, deadline))
            if keep:
                self._waiting[key] = keep

    def _check_encoding(self, request: GetRequest | AutoRequest | TellRequest) -> None:
        """A request's encoding must be one tiktoken knows and, once loaded here, the very
        same as the client's (its identity) with the allowed specials among its own."""
        loaded = self._encodings.get(request.enc)
        if loaded is None:
            if request.enc not in self._known_encodings:
                raise ProtocolError(
                    f"unknown encoding {request.enc!r}; this daemon knows"
                    f" {', '.join(sorted(self._known_encodings))}"
                )
        else:
            check_loaded(loaded, request)

    # -- fills --------------------------------------------------------------------------------

    def _submit(self, key: Any, fn: Any, *args: Any) -> bool:
        """Queue a fill on the pool; False if refused: too many fills stuck, or the requests
        waiting for fills hold ``PENDING_FILL_BYTES`` already."""
        request = args[1]
        size = len(
            request.prefix
            if isinstance(request, GetRequest)
            else request.text
            if isinstance(request, AutoRequest)
            else request.span
        )
        if sum(self._pending_bytes.values()) + size > budget.PENDING_FILL_BYTES or (
            not self._pool.submit(key, fn, *args)
        ):
            self.counters["fills_refused"] += 1
            return False
        self._filling.add(key)
        self._pending_bytes[key] = size
        return True

    def _abandon(self, key: Any, request: Any) -> None:
        """A fill ran past its budget: forget it, and do not try that text again."""
        self._filling.discard(key)
        self.counters["fills_abandoned"] += 1
        error = f"abandoned after {self._pool.budget:g} s (the fill time budget)"
        log.warning("fill of a %s text %s", request.enc, error)
        if isinstance(request, GetRequest):
            self._remember_failed(key, request, error)
        else:
            self._remember_failed_chain(key, error)
        if self._parked:
            self._unpark()

    def _remember_failed(self, key: bytes, request: GetRequest, error: str) -> None:
        # A digest of the prefix, not the prefix: the memo stays small whatever was sent.
        self._failed[key] = (request.enc, request.allowed, _digest(request.prefix), error)
        while len(self._failed) > FAILED_FILLS_KEPT:
            self._failed.popitem(last=False)

    def _fill(self, key: bytes, request: GetRequest) -> _FillResult:
        """On a pool thread: encode the prefix; the result goes to the loop. Never raises."""
        try:
            loaded = self._encodings.get(request.enc) or load(request.enc, self.config.backend)
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
                # cut_byte too: a declared prefix is a root block, usable as a chain's first block.
                found = Found(
                    tokens_to_frame(array("I", split.head)),
                    split.cut,
                    len(prefix[: split.cut].encode("utf-8")),
                )
                if fleet:
                    fleet.put(request.ns, *scope, found)  # queued: written behind
            entry = Entry(
                request.prefix,
                request.enc,
                request.allowed,
                found.tokens,
                found.cut,
                cut_byte=found.cut_byte,
                ns=request.ns,
            )
            return _FillResult(key, request, entry=entry, loaded=loaded)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: B036 - pyo3's PanicException is a BaseException
            return _FillResult(key, request, error=f"{type(exc).__name__}: {exc}"[:300])

    def _on_fill_done(self, result: _FillResult | ChainResult) -> None:
        self._filling.discard(result.key)
        if isinstance(result, ChainResult):
            self._on_chain_done(result)
            if self.hostmap is not None:
                self.hostmap.share(self.config.max_bytes, self.store.bytes)
            if self._parked:
                self._unpark()
            return
        request = result.request
        if result.error is not None:
            self.counters["fill_errors"] += 1
            log.warning(
                "fill of a %d-byte %s prefix failed: %s",
                len(request.prefix),
                request.enc,
                result.error,
            )
            self._remember_failed(result.key, request, result.error)
            self._answer_waiting(result.key, None)
            return
        assert result.entry is not None and result.loaded is not None
        self._encodings.setdefault(request.enc, result.loaded)
        self.counters["fills"] += 1
        entry = result.entry
        # A declared prefix lives in the host map, where workers read it: once, not also here.
        if self.hostmap is not None:
            self.hostmap.share(self.config.max_bytes, self.store.bytes)
        stored = self.hostmap is not None and self.hostmap.store(
            request.ns, request.eid, request.allowed, request.prefix, entry.cut, entry.tokens
        )
        if not stored and not self.store.put(result.key, entry):
            log.debug("fill of a %d-byte prefix not stored", len(request.prefix))
        self._answer_waiting(result.key, entry)

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
        out["fills_pending"] = len(self._filling)
        if self.fleet is not None:
            out.update(self.fleet.stats())
        if self.hostmap is not None:
            held = self.hostmap.stats()
            out.update(held)
            # memcached's totals cover both: declared prefixes (the map), chains (in memory).
            for name in ("curr_items", "bytes", "evictions"):
                out[name] += held["map_" + name]
            out["total_items"] = out.get("total_items", 0) + held["map_stores"]
        out["uncached_encodings"] = uncached_encodings()
        # What encodes each encoding's fills: --backend, or tiktoken where it failed its gate.
        out["backend_in_use"] = [f"{n}={e.encoder.backend}" for n, e in self._encodings.items()]
        out["fills_running"] = self._pool.running()
        out["replies_dropped"] = self._replies.dropped
        out["publications_dropped"] = self._publications.dropped
        out["reply_bytes_queued"] = self._replies.total
        out["fill_bytes_pending"] = sum(self._pending_bytes.values())
        out["parked_bytes"] = self._parked_bytes
        out.update(_memory())
        out.update(self._limit.stats())
        out["limit_rss_bytes"] = self.config.max_bytes + budget.overhead_bytes(
            self.config.fill_threads, self._limit.cap
        )
        out["encodings_loaded"] = sorted(self._encodings)
        return out


def _bounded(sock: zmq.Socket, hwm: int) -> None:
    """A daemon socket's queues, bounded (daemon/budget.py): in messages per peer, in bytes by
    tracking zero-copy frames, and a peer that stops reading is dropped by ZMTP heartbeats (its
    I/O thread no longer answers once its queue is full), which frees what was queued for it."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, min(hwm, budget.SEND_HWM))
    sock.setsockopt(zmq.RCVHWM, min(hwm, budget.RECEIVE_HWM))
    sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10_000)
    sock.copy_threshold = budget.TRACKED_FRAME_BYTES  # larger frames are zero-copy, tracked
    # Connections the kernel queues before libzmq accepts them: past the door (daemon/limits.py)
    # these still get in, so few.
    sock.setsockopt(zmq.BACKLOG, 16)


def _memory() -> dict[str, int]:
    """This process's resident memory now and at its peak (Linux; 0 elsewhere)."""
    out = {"rss_bytes": 0, "rss_max_bytes": 0}
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    out["rss_bytes"] = int(line.split()[1]) * 1024
                elif line.startswith(b"VmHWM:"):
                    out["rss_max_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _bind_private(sock: zmq.Socket, address: str, keys: auth.Keys | None) -> str | None:
    """Bind ``sock``; an ipc socket file is 0600 from the start (umask), not only after the
    chmod; a tcp:// socket is a CURVE server with ``keys``. Returns the ipc socket's path
    (None for another transport)."""
    path = ipc_path(address)
    if path is None:
        auth.secure_server(sock, address, keys)
        sock.bind(address)
        return None
    old = os.umask(0o177)
    try:
        sock.bind(address)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return path


def _digest(prefix: bytes) -> bytes:
    return hashlib.blake2b(prefix, digest_size=16).digest()
