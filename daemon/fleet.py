"""The fleet tier: the daemons of many hosts share what they encode through one Valkey (or Redis).

On a local miss, the daemon's fill thread asks the tier before it encodes (``lookup``), and writes
what it encoded there afterwards (``put``: queued, written by one thread, off every request's
path). Workers never talk to Valkey; each daemon holds one bounded connection pool, which the
writer thread fills before its first write (``_warm``), so that the first lookup does not pay
for a connect. The values, their keys and their checks are daemon/fleetcodec.py's; a value that
fails a check is deleted and counted in ``fleet_rejected``.

Faults. Every call has its own timeout (``fleet_timeout_ms``, connect included, no retries); a
circuit breaker (the client's ``Breaker``) stops asking a tier that keeps failing and probes it
after a cool-down. A lookup that fails is a miss: the fill encodes, as it would without a tier.
So Valkey down, slow, restarted, flushed, answering errors or garbage, a wrong password or a
partition cost a fill at most one timeout, and never change an id (docs/FLEET.md).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flashtoken.client.breaker import Breaker

from flashtoken.encodings import encoding_id, get_encoding

from .encodings import Loaded
from .fleetcodec import FleetConfigError, Found, check_value, fleet_key, pack_value, read_secrets
from .fleetspell import table_for

log = logging.getLogger("flashtoken.daemon.fleet")

# The writer sends at most this much in one pipeline: one round trip for many fills, without a
# single huge request that a slow link would time out.
_BATCH_BYTES = 4 * 1024 * 1024
_BATCH_ITEMS = 64
# Consecutive failures that open the breaker, its first and longest cool-down (seconds).
_BREAKER = (3, 0.25, 5.0)
# What tiktoken takes to encode a byte, about (cl100k/o200k: 32 KiB in 2-5 ms on a shared core):
# a GET waits for the fleet at most about what its worker would spend encoding the prefix.
_ENCODE_S_PER_BYTE = 100e-9
# Each queued write costs its key and value plus about this much (deque slot, tuple, bytes).
_QUEUE_OVERHEAD = 128

__all__ = ["FleetConfigError", "FleetTier", "FleetUnavailable", "Found", "redact_url"]


class FleetUnavailable(Exception):
    """The tier did not answer in time, refused us, or spoke garbage (mapped in ``_mapped``)."""


def redact_url(url: str | None) -> str | None:
    """``url`` without its password (for logs and STATS)."""
    if not url or "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    auth, _, host = rest.rpartition("@")
    user = auth.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if ":" in auth else url


class FleetTier:
    """One host's client of the fleet tier: thread-safe, for the daemon's fill threads.

    ``lookup`` blocks its caller for at most one ``timeout_ms`` (never the poll loop: it runs in
    a fill); ``put`` only queues. Writes wait in a queue of at most ``queue_bytes`` (a write
    that would exceed it is dropped and counted: the tier is an optimisation, memory is not).
    """

    def __init__(
        self,
        url: str,
        secrets: list[bytes],
        *,
        key_prefix: str = "flashtoken:",
        timeout_ms: int = 50,
        queue_bytes: int = 64 * 1024 * 1024,
        pool_size: int = 3,
        wait_ms: float = 5,
        encodings: tuple[str, ...] = (),
    ) -> None:
        if not secrets:
            raise FleetConfigError("the fleet tier needs a secret (--fleet-secret-file)")
        self.url = url
        self.secrets = secrets
        self.key_prefix = key_prefix.encode()
        self.timeout = timeout_ms / 1000
        self.queue_bytes = queue_bytes
        self.wait = wait_ms / 1000
        self._redis = _connect(url, self.timeout, pool_size)
        self._pool_size = pool_size
        self._lock = threading.Lock()
        self._breaker = Breaker(*_BREAKER)
        self._queue: deque[tuple[bytes, bytes | None]] = deque()
        self._queued = 0
        self._wakeup = threading.Condition(self._lock)
        self._closing = False
        self._last_error = ""
        self.counters = dict.fromkeys(
            (
                "fleet_hits",
                "fleet_misses",
                "fleet_errors",
                "fleet_rejected",
                "fleet_skipped",
                "fleet_writes",
                "fleet_writes_dropped",
            ),
            0,
        )
        self._writer = threading.Thread(
            target=self._write_loop, args=(encodings,), name="flashtoken-fleet", daemon=True
        )
        self._writer.start()

    @classmethod
    def from_config(cls, config: Any) -> FleetTier | None:
        """The tier a daemon's ``Config`` asks for, or None without ``fleet_url``.

        Raises FleetConfigError for a URL without a secret file, an unreadable or weak secret,
        or a URL redis-py cannot parse.
        """
        if not config.fleet_url:
            if config.fleet_secret_file:
                raise FleetConfigError("--fleet-secret-file given without --fleet-url")
            return None
        if not config.fleet_secret_file:
            raise FleetConfigError(
                "--fleet-url needs --fleet-secret-file: a file holding the secret every host of"
                " the fleet signs and checks values with"
            )
        return cls(
            config.fleet_url,
            read_secrets(config.fleet_secret_file),
            key_prefix=config.fleet_key_prefix,
            timeout_ms=config.fleet_timeout_ms,
            queue_bytes=config.fleet_queue_bytes,
            pool_size=config.fill_threads + 1,
            wait_ms=config.fleet_wait_ms,
            encodings=tuple(config.encodings),
        )

    def wait_s(self, prefix_bytes: int) -> float:
        """How long a GET miss may wait for its fill's lookup: 0 while the breaker is not closed
        (a lookup would not be made, or would likely time out), else the shorter of
        ``wait_ms`` and about what encoding the prefix costs."""
        with self._lock:
            if self._breaker.state != "closed":
                return 0.0
        return min(self.wait, prefix_bytes * _ENCODE_S_PER_BYTE)

    # -- the fill's two calls --------------------------------------------------------------------

    def lookup(
        self, namespace: bytes, loaded: Loaded, allowed: tuple[str, ...], prefix: bytes, text: str
    ) -> Found | None:
        """The checked value for this prefix, or None (a miss, an error, a rejected value).

        Never raises: a bug here must cost a fill its fleet lookup, never the fill itself."""
        try:
            return self._lookup(namespace, loaded, allowed, prefix, text)
        except Exception:
            log.exception("fleet lookup failed")
            self._count("fleet_errors")
            return None

    def _lookup(
        self, namespace: bytes, loaded: Loaded, allowed: tuple[str, ...], prefix: bytes, text: str
    ) -> Found | None:
        if not self._allow():
            self._count("fleet_skipped")
            return None
        key = fleet_key(self.key_prefix, namespace, loaded.eid, allowed, prefix)
        try:
            with self._mapped():
                value = self._redis.get(key)
        except FleetUnavailable as exc:
            if "WRONGTYPE" not in str(exc):
                return None
            value = b""  # another kind of value under our key: rejected (and deleted) below
        if value is None:
            self._count("fleet_misses")
            return None
        found = check_value(self.secrets, key, value, loaded, allowed, prefix, text)
        if found is None:
            log.warning("fleet value for a %d-byte prefix rejected and deleted", len(prefix))
            self._count("fleet_rejected")
            self._enqueue(key, None)
            return None
        self._count("fleet_hits")
        return found

    def put(
        self,
        namespace: bytes,
        loaded: Loaded,
        allowed: tuple[str, ...],
        prefix: bytes,
        found: Found,
    ) -> None:
        """Queue the signed value of a fill for the writer; never blocks on the tier, never
        raises (the fill has its tokens already)."""
        try:
            key = fleet_key(self.key_prefix, namespace, loaded.eid, allowed, prefix)
            value = pack_value(
                self.secrets[0], key, found.tokens, found.cut, found.cut_byte, len(prefix)
            )
            self._enqueue(key, value)
        except Exception:
            log.exception("fleet write not queued")
            self._count("fleet_errors")

    # -- write-behind -----------------------------------------------------------------------------

    def _enqueue(self, key: bytes, value: bytes | None) -> None:
        """Queue a SET (``value``) or a DEL (None); dropped when the queue's bytes are spent."""
        size = len(key) + len(value or b"") + _QUEUE_OVERHEAD
        with self._lock:
            if self._closing or self._queued + size > self.queue_bytes:
                self.counters["fleet_writes_dropped"] += 1
                return
            self._queue.append((key, value))
            self._queued += size
            self._wakeup.notify()

    def _take_batch(self) -> list[tuple[bytes, bytes | None]]:
        with self._lock:
            while not self._queue and not self._closing:
                self._wakeup.wait()
            batch: list[tuple[bytes, bytes | None]] = []
            size = 0
            while self._queue and len(batch) < _BATCH_ITEMS and size < _BATCH_BYTES:
                key, value = self._queue.popleft()
                item = len(key) + len(value or b"") + _QUEUE_OVERHEAD
                self._queued -= item
                size += item
                batch.append((key, value))
            return batch

    def _write_loop(self, encodings: tuple[str, ...]) -> None:
        self._warm(encodings)
        while True:
            batch = self._take_batch()
            if not batch:
                return  # closing, and nothing left
            if not self._allow():
                # The tier is away: what it would have held is re-encoded on a miss, once per host.
                self._count("fleet_writes_dropped", len(batch))
                continue
            try:
                with self._mapped():
                    pipe = self._redis.pipeline(transaction=False)
                    for key, value in batch:
                        if value is None:
                            pipe.delete(key)
                        else:
                            pipe.set(key, value)
                    pipe.execute()
            except FleetUnavailable:
                self._count("fleet_writes_dropped", len(batch))
                continue
            self._count("fleet_writes", sum(1 for _, v in batch if v is not None))

    def _warm(self, encodings: tuple[str, ...]) -> None:
        """Open every pooled connection and build the preloaded encodings' spelling tables, on
        the writer thread before its first write: otherwise the first lookups of a fresh daemon
        (a late host's cold start, when the tier matters most) would each pay a connect (and
        AUTH, and a TLS handshake) and ~40 ms of table building. A tier that does not answer
        costs this thread one timeout, and counts as any failed call does."""
        for name in encodings:
            try:
                enc = get_encoding(name)
                table_for(encoding_id(enc), enc)
            except Exception:  # the daemon loaded it already; a failure here costs only speed
                log.exception("spelling table of %s not built ahead", name)
        pool = self._redis.connection_pool
        taken = []
        try:
            with self._mapped():
                for _ in range(self._pool_size):
                    taken.append(pool.get_connection())  # connects (and authenticates)
        except FleetUnavailable:
            pass  # counted; the breaker decides when to ask again
        finally:
            for connection in taken:
                pool.release(connection)

    # -- faults -----------------------------------------------------------------------------------

    def _allow(self) -> bool:
        with self._lock:
            return self._breaker.allow()

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        """The one boundary where redis-py's (and the socket's) errors become FleetUnavailable;
        each one counts as a failure of the breaker, a success closes it."""
        import redis

        try:
            yield
        except (redis.RedisError, OSError, ValueError) as exc:
            self._failed(exc)
            raise FleetUnavailable(str(exc)) from exc
        with self._lock:
            self._breaker.success()
            self._last_error = ""

    def _failed(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.counters["fleet_errors"] += 1
            was = self._breaker.state
            self._breaker.failure()
            opened = was == "closed" and self._breaker.state == "open"
            repeated, self._last_error = message == self._last_error, message
        if opened:
            log.warning(
                "fleet tier %s unavailable (%s): breaker open, fills encode locally",
                redact_url(self.url),
                message,
            )
        elif not repeated:
            log.info("fleet tier error: %s", message)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    # -- stats and life cycle ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self.counters)
            out["fleet_queue_bytes"] = self._queued
            out["fleet_breaker"] = self._breaker.state
        return out

    def close(self, flush_s: float = 1.0) -> None:
        """Stop the writer after it has sent what is queued (for at most ``flush_s``)."""
        with self._lock:
            self._closing = True
            self._wakeup.notify()
        self._writer.join(flush_s)
        with self._lock:
            self._queue.clear()
            self._queued = 0
        self._redis.close()


def _connect(url: str, timeout: float, pool_size: int) -> Any:
    """A client on a bounded, blocking pool: every call waits at most ``timeout`` for a
    connection, to connect, and for each reply; no retries (the breaker decides when to retry)."""
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError as exc:
        raise FleetConfigError(
            "the fleet tier needs redis-py: pip install 'flashtoken[fleet]'"
        ) from exc
    try:
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=timeout,  # the pool's wait for a free connection
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        return redis.Redis(connection_pool=pool)
    except (ValueError, redis.RedisError) as exc:
        raise FleetConfigError(
            f"cannot use --fleet-url {redact_url(url)}: {exc} (redis://[user:password@]host:port/db,"
            " rediss:// for TLS, or unix:///path/to/valkey.sock)"
        ) from exc
