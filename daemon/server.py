"""The daemon: one ROUTER socket, a poll loop, handlers named after the verbs, a fill pool.

Threading model. The loop thread owns the socket and the store: it receives every request,
answers GETs straight from the store (a dict lookup, a memcmp and a send: a GET never waits for
an encode) and sends every reply. A miss that asks for a fill submits the encode to a small
``ThreadPoolExecutor`` (tiktoken releases the GIL while it encodes); the worker puts its result on
a queue and writes one byte to a pipe the loop polls next to the socket, and the loop stores the
result. So the store needs no lock, and ZeroMQ's rule that a socket belongs to one thread holds.
Rejected: an inproc PAIR socket per worker (a socket per thread, for what a pipe byte does), and
a lock around the store (every GET would pay for it, and replies would still have to be sent
from the loop thread).

Nothing a client sends can stop the loop: a malformed request gets a CLIENT_ERROR reply and
counts ``protocol_errors``; an unexpected exception in a handler gets a SERVER_ERROR reply; an
exception in a fill, ``BaseException`` included (o200k's ``PanicException`` on ~1M spaces), is
logged, counted in ``fill_errors``, remembered, and answered as SERVER_ERROR for that prefix.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import logging
import os
import queue
import signal
import sys
import threading
import time
from array import array
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import tiktoken
import xxhash
import zmq

import flashtoken
from flashtoken.auto import block_cuts, token_byte_lengths
from flashtoken.boundary import CutRule, cut_rule
from flashtoken.encodings import encoding_id, get_encoding
from flashtoken.errors import ProtocolError
from flashtoken.prefix import _encode, split_prefix
from flashtoken.protocol import (
    CLIENT_ERROR,
    MAX_HEADER_BYTES,
    SERVER_ERROR,
    AutoRequest,
    GetRequest,
    Request,
    TellRequest,
    ipc_path,
    pack_auto_reply,
    pack_blocks,
    pack_error,
    pack_hit,
    pack_miss,
    pack_ok,
    parse_request,
    publish_address,
    request_id_of,
    tokens_from_frame,
    tokens_to_frame,
)
from flashtoken.specials import SpecialPolicy

from .settings import Config
from .store import Entry, Store

log = logging.getLogger("flashtoken.daemon")

# Longest path a unix socket address can hold (sun_path is 108 bytes on Linux, with its NUL).
_MAX_IPC_PATH_BYTES = 107
# Fills whose failure is remembered, so that a prefix that makes tiktoken panic is not encoded
# again on every GET.
_FAILED_FILLS_KEPT = 1024
_POLL_MS = 1000
_PARKED_TELLS = 256
_RECV_BATCH = 256


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class _Loaded:
    enc: tiktoken.Encoding
    eid: bytes
    specials: frozenset
    rule: CutRule  # stable cuts, as flashtoken.AutoPrefixCache finds them
    lengths: list  # token_byte_lengths(enc)


@dataclass(frozen=True)
class _Chain:
    """A chain fill's result: new blocks ``first ..`` after the cut ``start``, their digests."""

    path: list  # the chain found for an AUTO request's text (the parent block for a TELL)
    first: int
    start: int  # the cut of block first - 1, in bytes (0 for the first block)
    span: bytes  # the text's bytes from start on
    entries: list
    digests: list
    state: Any  # the xxh3 state after the new blocks (AUTO), None (TELL)
    parent_digest: bytes | None  # of block first - 1: subscribers find their block by it


@dataclass(frozen=True)
class _FillResult:
    key: Any
    request: Any  # GetRequest, AutoRequest or TellRequest
    entry: Entry | None = None
    chain: _Chain | None = None
    loaded: _Loaded | None = None
    error: str | None = None


class Server:
    """The daemon. ``Server(config).serve()`` runs until ``stop()`` or SIGTERM / SIGINT."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.max_bytes, debug_key_bytes=config.debug_key_bytes)
        self._encodings: dict[str, _Loaded] = {}
        self._filling: set[Any] = set()
        # Chain fills that failed (o200k's panic on ~1M spaces), so that they are not retried
        # on every request: keyed by (seed, blocks found, the first new block's bytes).
        self._failed_auto: OrderedDict[Any, str] = OrderedDict()
        self._parked: deque[TellRequest] = deque()  # TELLs whose parent is being filled
        self._failed: OrderedDict[bytes, tuple[str, tuple[str, ...], bytes, str]] = OrderedDict()
        self._results: queue.SimpleQueue[_FillResult] = queue.SimpleQueue()
        self._pool: ThreadPoolExecutor | None = None
        self._stopping = False
        self._started = time.monotonic()
        self._parent = os.getppid()
        self._lock_fd: int | None = None
        self._socket_path: str | None = None
        self._ctx: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._publisher: zmq.Socket | None = None
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
            "server_errors": 0,
        }

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load the preloaded encodings, take the single-instance lock, bind.

        Raises StartupError with a message fit for the user.
        """
        for name in self.config.encodings:
            try:
                self._encodings[name] = _load(name)
            except Exception as exc:
                raise StartupError(f"cannot load encoding {name!r}: {exc}") from exc
        address = self.config.bind
        path = ipc_path(address)
        if path is not None:
            self._take_lock(path, address)
        self._ctx = zmq.Context()
        router = self._router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.SNDHWM, self.config.hwm)
        router.setsockopt(zmq.RCVHWM, self.config.hwm)
        # libzmq drops a peer that sends a frame larger than this, before we ever see it.
        router.setsockopt(zmq.MAXMSGSIZE, self.config.max_prefix_bytes + MAX_HEADER_BYTES)
        try:
            if path is not None:
                # Created 0600 from the start (umask), not only after the chmod below.
                old = os.umask(0o177)
                try:
                    router.bind(address)
                finally:
                    os.umask(old)
                os.chmod(path, 0o600)
                self._socket_path = path
            else:
                router.bind(address)
                if address.startswith("tcp://"):
                    log.warning(
                        "listening on %s: TCP has no authentication; any local or remote"
                        " peer that can connect can use this daemon",
                        address,
                    )
        except zmq.ZMQError as exc:
            self._close()
            raise StartupError(f"cannot bind {address}: {exc}") from exc
        self._bind_publisher(address)
        self._poller = zmq.Poller()
        self._poller.register(router, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        log.info(
            "flashtoken-daemon %s (pid %d) serving %s, max_bytes=%d, encodings=%s",
            flashtoken.__version__,
            os.getpid(),
            address,
            self.config.max_bytes,
            ",".join(self._encodings) or "-",
        )

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
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
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
        if os.path.lexists(path):
            log.info("removing stale socket %s", path)
            os.unlink(path)

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
                events = dict(self._poller.poll(_POLL_MS))
                if self._router in events:
                    self._drain_router()
                if self._wake_r in events:
                    self._drain_wake()
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
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, self.config.hwm)
        path = ipc_path(where)
        try:
            if path is not None:
                old = os.umask(0o177)
                try:
                    pub.bind(where)
                finally:
                    os.umask(old)
                os.chmod(path, 0o600)
                self._publish_path = path
            else:
                pub.bind(where)
        except zmq.ZMQError as exc:
            self._close()
            raise StartupError(f"cannot bind the publish address {where}: {exc}") from exc

    def stop(self) -> None:
        """Ask the loop to stop; safe from a signal handler or another thread."""
        self._stopping = True
        self._wake()

    def _close(self) -> None:
        if self._pool is not None:
            # A running encode cannot be interrupted; queued ones are dropped.
            self._pool.shutdown(wait=False, cancel_futures=True)
        for sock in (self._router, self._publisher):
            if sock is not None:
                sock.close(linger=0)
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
        while True:
            try:
                result = self._results.get_nowait()
            except queue.Empty:
                break
            self._on_fill_done(result)
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
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, body = frames[0], frames[1:]
            reply = self._handle(body)
            if not reply:
                continue  # a request that asked for no reply
            try:
                router.send_multipart([identity, *reply], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass  # that client's queue is full: it will time out and fall back
            except zmq.ZMQError as exc:
                log.debug("reply dropped: %s", exc)

    def _handle(self, body: list[bytes]) -> list[Any]:
        request_id = 0
        try:
            request = parse_request(body, max_prefix_bytes=self.config.max_prefix_bytes)
            request_id = request.id
            handler = getattr(self, "on_" + request.op.lower())
            reply: list[Any] = handler(request)  # [] for a TELL that needs no answer
            return reply
        except ProtocolError as exc:
            self.counters["protocol_errors"] += 1
            log.debug("CLIENT_ERROR: %s", exc)
            return pack_error(request_id or request_id_of(body), CLIENT_ERROR, str(exc))
        except Exception as exc:  # a bug of ours: answer, log, keep serving
            self.counters["server_errors"] += 1
            log.exception("SERVER_ERROR while handling a request")
            return pack_error(request_id, SERVER_ERROR, f"{type(exc).__name__}: {exc}")

    def on_ping(self, request: Request) -> list[Any]:
        return pack_ok(request.id, pong=True, pid=os.getpid(), version=flashtoken.__version__)

    def on_stats(self, request: Request) -> list[Any]:
        return pack_ok(request.id, stats=self.stats(), settings=self.config.report())

    def on_get(self, request: Request) -> list[Any]:
        assert isinstance(request, GetRequest)
        self._check_encoding(request)
        key = request.key
        if self.config.debug_key_bytes is not None:
            key = key[: self.config.debug_key_bytes]  # test-only: force collisions
        failed = self._failed.get(key)
        if failed is not None and failed[:3] == (
            request.enc,
            request.allowed,
            _digest(request.prefix),
        ):
            self.store.count_miss()
            return pack_error(
                request.id, SERVER_ERROR, f"this prefix cannot be encoded: {failed[3]}"
            )
        entry = self.store.get(key, request.prefix, request.enc, request.allowed)
        if entry is not None:
            self.counters["tokens_served"] += len(entry.tokens) // 4
            return pack_hit(request.id, entry.cut, entry.tokens)
        filling = key in self._filling
        if (
            request.fill
            and not filling
            and self.store.peek(key) is None
            and len(self._filling) < self.config.max_pending_fills
        ):
            # peek: a key held by another prefix (a collision) is not refilled; see Store.
            self._submit_fill(key, request)
            filling = True
        return pack_miss(request.id, filling)

    def _check_encoding(self, request: GetRequest | AutoRequest | TellRequest) -> None:
        """A request's encoding must be one tiktoken knows and, once loaded here, the very
        same as the client's (its identity) with the allowed specials among its own."""
        loaded = self._encodings.get(request.enc)
        if loaded is None:
            if request.enc not in tiktoken.list_encoding_names():
                raise ProtocolError(f"unknown encoding {request.enc!r}")
        else:
            _check_loaded(loaded, request)

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
            key = (request.seed, blocks, data[blocks * block : (blocks + 1) * block])
            filling = key in self._filling
            if (
                not filling
                and key not in self._failed_auto
                and len(self._filling) < self.config.max_pending_fills
            ):
                self._submit(key, self._fill_chain, key, request, path)
                filling = True
        start = path[skip - 1].cut_byte if 0 < skip <= blocks else 0
        if blocks > skip and path[-1].cut_byte > start:
            frame = b"".join([entry.tokens for entry in path[skip:]])
            self.store.count_auto(blocks - skip, path[-1].cut_byte - start)
            self.counters["tokens_served"] += len(frame) // 4
            return pack_auto_reply(request.id, blocks, filling, start, path[-1].cut_byte, frame)
        self.store.count_auto(0, 0)
        return pack_auto_reply(request.id, blocks, filling)

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
                or parent.cut_byte != request.start
            ):
                # Evicted, or never here (a restart): the one answer a TELL gets, so that the
                # client tells the whole text next time.
                self.counters["tells_unplaced"] += 1
                return pack_ok(request.id, placed=False)
            path = [parent]
        request, path = self._skip_known(request, path)
        if not request.digests:
            return []  # every block is here already
        key = (request.seed, request.first, request.digests[0])
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
        while len(self._parked) > _PARKED_TELLS:
            self._parked.popleft()
            self.counters["tells_unplaced"] += 1

    def _unpark(self) -> None:
        """After a fill: retry the parked TELLs (each is parked again, or dropped as unplaced
        once no fill is in flight)."""
        parked, self._parked = self._parked, deque()
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
                or entry.parent is not parent
                or not entry.chain
                or not at <= entry.cut_byte <= (i + 1) * block
                or entry.prefix != span[entry.cut_byte - start : (i + 1) * block - start]
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

    # -- fills --------------------------------------------------------------------------------

    def _submit_fill(self, key: bytes, request: GetRequest) -> None:
        self._submit(key, self._fill, key, request)

    def _submit(self, key: Any, fn: Any, *args: Any) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.fill_threads, "flashtoken-fill")
        self._filling.add(key)
        self._pool.submit(fn, *args)

    def _fill(self, key: bytes, request: GetRequest) -> None:
        """On a pool thread: encode the prefix, hand the result to the loop. Never raises."""
        try:
            loaded = self._encodings.get(request.enc) or _load(request.enc)
            _check_loaded(loaded, request)
            prefix = request.prefix.decode("utf-8")
            split = split_prefix(loaded.enc, prefix, allowed_special=frozenset(request.allowed))
            # cut_byte too: a declared prefix is a root block, usable as a chain's first block.
            entry = Entry(
                request.prefix,
                request.enc,
                request.allowed,
                tokens_to_frame(array("I", split.head)),
                split.cut,
                cut_byte=len(prefix[: split.cut].encode("utf-8")),
            )
            result = _FillResult(key, request, entry=entry, loaded=loaded)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: B036 - pyo3's PanicException is a BaseException
            result = _FillResult(key, request, error=f"{type(exc).__name__}: {exc}"[:300])
        self._results.put(result)
        self._wake()

    def _fill_chain(self, key: Any, request: AutoRequest | TellRequest, path: list[Entry]) -> None:
        """On a pool thread: encode the text after a chain's cut and cut the new blocks, as
        ``flashtoken.AutoPrefixCache`` does; hand them to the loop. Never raises.

        Only the bytes after the last known block's cut are encoded: the tokens before it are in
        the store already. For an AUTO request ``path`` is the chain found for its text, whose
        bytes give the new blocks' digests; for a TELL, ``path`` is the told parent block (or
        empty) and the digests are the client's: a digest only locates, and every block is
        confirmed by its own bytes. Reads of ``path`` are safe here: a block's cut never changes.
        """
        try:
            loaded = self._encodings.get(request.enc) or _load(request.enc)
            _check_loaded(loaded, request)
            block = request.block
            parent = path[-1] if path else None
            start = parent.cut_byte if parent is not None else 0
            if isinstance(request, AutoRequest):
                first, span = len(path), request.text[start:]
                stop = len(request.text) // block
            else:
                first, span = request.first, request.span
                stop = first + len(request.digests)
            policy = SpecialPolicy(frozenset(request.allowed), frozenset())
            text = span.decode("utf-8")
            tail = _encode(loaded.enc, text, policy)
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
                parent_digest, digests = request.parent, request.digests[: len(cuts)]
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
                    )
                )
                taken = n
            chain = _Chain(path, first, start, span, entries, digests, state, parent_digest)
            result = _FillResult(key, request, chain=chain, loaded=loaded)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: B036 - pyo3's PanicException is a BaseException
            result = _FillResult(key, request, error=f"{type(exc).__name__}: {exc}"[:300])
        self._results.put(result)
        self._wake()

    def _on_fill_done(self, result: _FillResult) -> None:
        self._filling.discard(result.key)
        request = result.request
        if isinstance(request, (AutoRequest, TellRequest)):
            self._on_chain_done(result, request)
            if self._parked:
                self._unpark()
            return
        assert isinstance(request, GetRequest)
        if result.error is not None:
            self.counters["fill_errors"] += 1
            log.warning(
                "fill of a %d-byte %s prefix failed: %s",
                len(request.prefix),
                request.enc,
                result.error,
            )
            self._failed[result.key] = (
                request.enc,
                request.allowed,
                _digest(request.prefix),
                result.error,
            )
            while len(self._failed) > _FAILED_FILLS_KEPT:
                self._failed.popitem(last=False)
            return
        assert result.entry is not None and result.loaded is not None
        self._encodings.setdefault(request.enc, result.loaded)
        self.counters["fills"] += 1
        if not self.store.put(result.key, result.entry):
            log.debug("fill of a %d-byte prefix not stored", len(request.prefix))

    def _on_chain_done(self, result: _FillResult, request: AutoRequest | TellRequest) -> None:
        if result.error is not None:
            self.counters["fill_errors"] += 1
            log.warning(
                "fill of a %d-byte %s text failed: %s",
                len(request.text if isinstance(request, AutoRequest) else request.span),
                request.enc,
                result.error,
            )
            self._failed_auto[result.key] = result.error
            while len(self._failed_auto) > _FAILED_FILLS_KEPT:
                self._failed_auto.popitem(last=False)
            return
        chain = result.chain
        assert chain is not None and result.loaded is not None
        self._encodings.setdefault(request.enc, result.loaded)
        self.counters["auto_fills"] += 1
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

    def _publish(self, request: Any, chain: _Chain, stored: list[Entry]) -> None:
        """Send the blocks just stored to the clients following this seed's chains."""
        if self._publisher is None:
            return
        span = chain.span
        end = (chain.first + len(stored)) * request.block - chain.start
        while end < len(span) and span[end] & 0xC0 == 0x80:
            end += 1  # to a character boundary: subscribers decode the span
        try:
            self._publisher.send_multipart(
                pack_blocks(
                    request.seed,
                    chain.first,
                    chain.parent_digest,
                    chain.start,
                    chain.digests[: len(stored)],
                    [entry.cut_byte for entry in stored],
                    span[:end],
                    [entry.tokens for entry in stored],
                ),
                zmq.NOBLOCK,
                copy=False,
            )
            self.counters["blocks_published"] += len(stored)
        except zmq.ZMQError as exc:  # a slow subscriber's queue is full: it misses these
            log.debug("blocks not published: %s", exc)

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
        out["encodings_loaded"] = sorted(self._encodings)
        return out


def _load(name: str) -> _Loaded:
    enc = get_encoding(name)
    return _Loaded(
        enc,
        encoding_id(enc),
        frozenset(enc.special_tokens_set),
        cut_rule(enc._pat_str),
        token_byte_lengths(enc),
    )


def _check_loaded(loaded: _Loaded, request: Any) -> None:
    if request.eid != loaded.eid:
        raise ProtocolError(
            f"the daemon's {request.enc} is not the client's (another tiktoken version or a custom"
            " Encoding): not served"
        )
    if not loaded.specials.issuperset(request.allowed):
        raise ProtocolError(f"'allowed' names strings that are no special token of {request.enc}")


def _digest(prefix: bytes) -> bytes:
    return hashlib.blake2b(prefix, digest_size=16).digest()
