"""The fleet tier: the daemons of many hosts share what they encode through one Valkey (or Redis).

On a local miss, the daemon's fill thread asks the tier before it encodes (``lookup``), and writes
what it encoded there afterwards (``put``: queued, written by one thread, off every request's
path). Workers never talk to Valkey; each daemon holds one bounded connection pool.

Values. Under ``{key_prefix}{hex SHA-256 of (format, algorithm version, namespace, encoding
id, policy, prefix bytes)}`` a value is::

    b"FTF" version(1) | cut u32 | cut_byte u32 | prefix_len u32 | n u32 | n x u32 ids | mac(32)

integers little-endian; ``cut`` is the stable cut in code points, ``cut_byte`` the same offset in
bytes, ids the prefix's tokens before it (the store's token frame as is). ``mac`` is HMAC-SHA256
with the fleet secret over the key and everything before it: any process that can write to
Valkey could otherwise poison every host. A value is used only after it passes, in this order:
the HMAC (under any of the configured secrets, for rotation), the format, the lengths, the cut
(it must be the stable cut this daemon computes for the prefix itself: a regex scan of its last
pieces, no encode), the ids (known to the encoding, no special token the policy forbids), and
the spelling: ``decode_bytes(ids) == prefix[:cut_byte]``. A value that fails is deleted and
counted in ``fleet_rejected``. The tokenization itself is trusted to the holders of the secret,
as a client trusts its daemon.

Faults. Every call has its own timeout (``fleet_timeout_ms``, connect included, no retries); a
circuit breaker (the client's ``Breaker``) stops asking a tier that keeps failing and probes it
after a cool-down. A lookup that fails is a miss: the fill encodes, as it would without a tier.
So Valkey down, slow, restarted, flushed, answering errors or garbage, a wrong password or a
partition cost a fill at most one timeout, and never change an id (docs/FLEET.md).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from flashtoken.client.breaker import Breaker

import flashtoken
from flashtoken import tiktoken_parts
from flashtoken.boundary import stable_offset
from flashtoken.specials import SpecialPolicy
from flashtoken.wire import tokens_from_frame

from .encodings import Loaded

log = logging.getLogger("flashtoken.daemon.fleet")

FORMAT_VERSION = 1
_MAGIC = b"FTF" + bytes([FORMAT_VERSION])
_HEAD = struct.Struct("<4sIIII")  # magic+version, cut, cut_byte, prefix_len, n
_MAC_BYTES = 32
MIN_SECRET_BYTES = 16
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


# The first two bytes of each encoding's special tokens, by encoding identity (see
# _forbidden_special): a few short tuples, one per encoding ever checked.
_STARTS: dict[bytes, tuple[bytes, ...]] = {}


class FleetConfigError(ValueError):
    """The fleet settings cannot work; the message says what to change."""


class FleetUnavailable(Exception):
    """The tier did not answer in time, refused us, or spoke garbage (mapped in ``_mapped``)."""


class Found(NamedTuple):
    """A checked value: the store's token frame (little-endian uint32) and the cut."""

    tokens: bytes
    cut: int
    cut_byte: int


def read_secrets(path: str) -> list[bytes]:
    """The secrets in ``path``: one a line, the first signs, every one verifies (rotation).

    Blank lines and lines starting with ``#`` are skipped. Raises FleetConfigError if the file
    cannot be read or holds no secret, or a secret is shorter than MIN_SECRET_BYTES.
    """
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            lines = f.read().splitlines()
    except OSError as exc:
        raise FleetConfigError(f"cannot read the fleet secret file {path}: {exc}") from exc
    secrets = [line.strip() for line in lines]
    secrets = [s for s in secrets if s and not s.startswith(b"#")]
    if not secrets:
        raise FleetConfigError(
            f"the fleet secret file {path} holds no secret; write one line of at least"
            f" {MIN_SECRET_BYTES} random bytes, e.g. `head -c 32 /dev/urandom | base64 > {path}`"
        )
    for s in secrets:
        if len(s) < MIN_SECRET_BYTES:
            raise FleetConfigError(
                f"a secret in {path} is {len(s)} bytes; use at least {MIN_SECRET_BYTES}"
                " (e.g. `head -c 32 /dev/urandom | base64`)"
            )
    if mode & 0o077:
        log.warning("fleet secret file %s is readable by group or others; chmod 600 it", path)
    return secrets


def redact_url(url: str | None) -> str | None:
    """``url`` without its password (for logs and STATS)."""
    if not url or "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    auth, _, host = rest.rpartition("@")
    user = auth.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if ":" in auth else url


def fleet_key(
    key_prefix: bytes, namespace: bytes, eid: bytes, allowed: tuple[str, ...], prefix: bytes
) -> bytes:
    """The Valkey key of a prefix's value: a strong digest of everything that decides its ids
    (SHA-256: several times faster than BLAKE2b where the CPU has SHA instructions).

    ``namespace`` separates tenants (today the daemon's key for the prefix, which carries the
    client's namespace salt); the algorithm version separates daemons whose cuts could differ.
    """
    h = hashlib.sha256()
    fields = [b"flashtoken-fleet/%d" % FORMAT_VERSION, flashtoken.__version__.encode()]
    fields += [namespace, eid, b"%d" % len(allowed), *(a.encode() for a in allowed)]
    for field in fields:
        h.update(struct.pack("<Q", len(field)))
        h.update(field)
    h.update(struct.pack("<Q", len(prefix)))
    h.update(prefix)
    return key_prefix + h.hexdigest().encode()


def _mac(secret: bytes, key: bytes, body: bytes | memoryview) -> bytes:
    h = hmac.new(secret, key, hashlib.sha256)
    h.update(body)
    return h.digest()


def pack_value(
    secret: bytes, key: bytes, tokens: bytes, cut: int, cut_byte: int, n_prefix: int
) -> bytes:
    """The signed value of a fill (``tokens``: the store's little-endian uint32 frame)."""
    body = _HEAD.pack(_MAGIC, cut, cut_byte, n_prefix, len(tokens) // 4) + tokens
    return body + _mac(secret, key, body)


def check_value(
    secrets: list[bytes],
    key: bytes,
    value: Any,
    loaded: Loaded,
    allowed: tuple[str, ...],
    prefix: bytes,
    text: str,
) -> Found | None:
    """The value's tokens and cut if it passes every check (module docstring), else None."""
    if not isinstance(value, bytes) or len(value) < _HEAD.size + _MAC_BYTES:
        return None
    body, mac = memoryview(value)[:-_MAC_BYTES], value[-_MAC_BYTES:]
    if not any(hmac.compare_digest(_mac(s, key, body), mac) for s in secrets):
        return None
    magic, cut, cut_byte, n_prefix, n = _HEAD.unpack_from(body)
    if magic != _MAGIC or len(body) != _HEAD.size + 4 * n or n_prefix != len(prefix):
        return None
    if cut > len(text) or cut_byte > n_prefix or (n == 0) != (cut == 0):
        return None
    if cut:  # (0, 0): nothing kept, which is exact for any prefix
        policy = SpecialPolicy.of(loaded.enc, frozenset(allowed), ())
        if cut != stable_offset(loaded.rule, policy, text, 0, len(text)):
            return None
        if len(text[:cut].encode()) != cut_byte:
            return None
    tokens = body[_HEAD.size :]
    ids = tokens_from_frame(tokens).tolist()  # decode_bytes reads a list twice as fast
    try:
        spelled = loaded.enc.decode_bytes(ids)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException:  # noqa: B036 - an unknown id: KeyError, or pyo3's PanicException
        return None
    if spelled != prefix[:cut_byte] or _forbidden_special(loaded, allowed, spelled, ids):
        return None
    return Found(tokens.tobytes(), cut, cut_byte)


def _forbidden_special(
    loaded: Loaded, allowed: tuple[str, ...], spelled: bytes, ids: list[int]
) -> bool:
    """Whether ``ids`` hold a special token the policy does not allow (a prefix may spell one's
    text as ordinary tokens). A special token's id spells its text, so when the text holds no
    special token's first two bytes (nearly always) no id needs a look; max() and a set test
    over every id would cost as much as the decode."""
    specials = tiktoken_parts.special_tokens(loaded.enc)
    starts = _STARTS.get(loaded.eid)
    if starts is None:
        starts = _STARTS[loaded.eid] = tuple({s.encode()[:2] for s in specials})
    if not any(start in spelled for start in starts):
        return False
    ok = {specials[a] for a in allowed}  # two names may share an id (o200k_harmony)
    return not {i for i in specials.values() if i not in ok}.isdisjoint(ids)


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
            target=self._write_loop, name="flashtoken-fleet", daemon=True
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

    def _write_loop(self) -> None:
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
