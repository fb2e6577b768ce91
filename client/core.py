"""What the sync and asyncio clients share, without any socket IO (sans-IO).

The L1 cache, the keys, the circuit breaker, building requests and checking replies all live
here, so that ``Client`` and ``AsyncClient`` differ only in how they wait on the socket. Every
decision that could change a token id is made here, and made the same way for both.

A reply is used only after these checks (``ClientCore.accept``): it parses as our protocol, its
id is the one we are waiting for (else it is a late reply and is discarded), a hit's token frame
holds exactly ``n`` tokens, ``0 <= cut <= len(prefix)``, no id is out of the vocabulary, the
tokens decode to exactly ``prefix[:cut]``, and none is a special token the policy does not allow.
The last check is what makes a colliding or corrupted entry harmless: its tokens spell another text.
The daemon is trusted on one thing only: that for the text they spell, its tokens and its cut
are what ``flashtoken.split_prefix`` computes (it runs that code; it is reachable only by the
socket owner).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import tiktoken
import xxhash

from flashtoken.admission import SecondSight, WholeText
from flashtoken.auto import AutoPrefixCache
from flashtoken.encodings import encoding_id, resolve_encoding
from flashtoken.errors import ProtocolError
from flashtoken.prefix import FixedPrefixTokenCache, PrefixSplit, token_list
from flashtoken.specials import SpecialArg, SpecialPolicy
from flashtoken.wire import (
    MAX_PREFIX_BYTES,
    MIN_BLOCK_BYTES,
    SERVER_ERROR,
    AutoHit,
    AutoMiss,
    ErrorReply,
    GetHit,
    GetMiss,
    GetRequest,
    TouchRequest,
    namespace_tag,
    parse_reply,
)

from .chains import AutoPending, ChainCore
from .hostmap import HostMapView
from .settings import CLIENT_DEFAULTS, client_settings
from .sockets import abandon

__all__ = ["CLIENT_DEFAULTS", "AutoPending", "Breaker", "ClientCore", "Pending"]

_BYTES_PER_TOKEN = 12  # the head list (8, its ints shared) + tails and arrays made on demand
_BYTES_PER_ENTRY = 512

L1Key = Union[str, "tuple[str, frozenset[str]]"]


def _sighting(prefix: str, allowed: frozenset) -> bytes:
    """What this worker remembers of a prefix it saw once (no map to keep it in)."""
    h = xxhash.xxh3_128(prefix.encode("utf-8", "surrogatepass"))
    h.update("\x00".join(sorted(allowed)).encode("utf-8"))
    return h.digest()


class Breaker:
    """A circuit breaker: stop asking a daemon that keeps failing, probe it now and then.

    closed: every request goes out. After ``failures`` consecutive failures: open for
    ``cooldown`` seconds (no request goes out; callers encode locally). Then half-open: one
    probe goes out; its success closes the breaker, its failure opens it again for twice as long
    (up to ``max_cooldown``). So a dead or frozen daemon costs one timeout per cool-down period,
    not one per call.
    """

    def __init__(
        self,
        failures: int,
        cooldown: float,
        max_cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = failures
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.failures = 0
        self.cooldown = self.base_cooldown
        self.open_until = 0.0
        self._state = "closed"

    @property
    def state(self) -> str:
        if self._state == "open" and self.clock() >= self.open_until:
            return "half-open"
        return self._state

    def allow(self) -> bool:
        """Whether a request may go out now; in half-open, only the one probe may."""
        if self._state == "closed":
            return True
        if self._state == "open" and self.clock() >= self.open_until:
            self._state = "probing"
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.cooldown = self.base_cooldown
        self._state = "closed"

    def failure(self) -> None:
        self.failures += 1
        if self._state == "probing":
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            self._open()
        elif self._state == "closed" and self.failures >= self.threshold:
            self._open()

    def _open(self) -> None:
        self._state = "open"
        self.open_until = self.clock() + self.cooldown


@dataclass(frozen=True)
class Pending:
    """A GET on its way: what is needed to check its reply."""

    id: int
    prefix: str
    allowed: frozenset
    frames: list


# What ``ClientCore.accept`` makes of a reply.
LATE = "late"  # another request's reply: discard, keep waiting
DONE = "done"  # the answer: a cache (hit) or None (miss: encode locally)
FAILED = "failed"  # garbage or an error: encode locally, count a failure, drop the socket


class ClientCore(ChainCore):
    """The state of one client in one process, without IO. Not for direct use.

    Its automatic-reuse half (texts with no prefix) is ``ChainCore``, client/chains.py."""

    def __init__(
        self,
        encoding: str | tiktoken.Encoding,
        *,
        namespace: bytes | str = CLIENT_DEFAULTS["namespace"],
        l1_bytes: int = CLIENT_DEFAULTS["l1_bytes"],
        timeout_ms: float = CLIENT_DEFAULTS["timeout_ms"],
        breaker_failures: int = CLIENT_DEFAULTS["breaker_failures"],
        breaker_cooldown_ms: float = CLIENT_DEFAULTS["breaker_cooldown_ms"],
        breaker_max_cooldown_ms: float = CLIENT_DEFAULTS["breaker_max_cooldown_ms"],
        max_prefix_bytes: int = CLIENT_DEFAULTS["max_prefix_bytes"],
        auto_l1_bytes: int = CLIENT_DEFAULTS["auto_l1_bytes"],
        auto_block_bytes: int = CLIENT_DEFAULTS["auto_block_bytes"],
        auto_local_bytes: int = CLIENT_DEFAULTS["auto_local_bytes"],
        follow: bool = CLIENT_DEFAULTS["follow"],
        fill: bool = CLIENT_DEFAULTS["fill"],
        min_uses: int = CLIENT_DEFAULTS["min_uses"],
    ) -> None:
        # The table's checks (client/settings.py), for a core made without Client: the same
        # messages, and a str namespace taken as UTF-8.
        checked = client_settings(
            "ClientCore",
            dict(
                namespace=namespace,
                l1_bytes=l1_bytes,
                timeout_ms=timeout_ms,
                breaker_failures=breaker_failures,
                breaker_cooldown_ms=breaker_cooldown_ms,
                breaker_max_cooldown_ms=breaker_max_cooldown_ms,
                max_prefix_bytes=max_prefix_bytes,
                auto_l1_bytes=auto_l1_bytes,
                auto_block_bytes=auto_block_bytes,
                auto_local_bytes=auto_local_bytes,
                follow=follow,
                fill=fill,
                min_uses=min_uses,
            ),
        )
        self.enc = resolve_encoding(encoding)
        self.namespace: bytes = checked["namespace"]  # a str is taken as UTF-8
        if auto_block_bytes < MIN_BLOCK_BYTES:
            raise ValueError(
                f"auto_block_bytes={auto_block_bytes} is below the daemon's minimum of"
                f" {MIN_BLOCK_BYTES} bytes (each block costs it a lookup and an entry);"
                f" pass auto_block_bytes >= {MIN_BLOCK_BYTES}"
            )
        self._ns = namespace_tag(self.namespace)  # the daemon derives the key from it and the bytes
        self.timeout = timeout_ms / 1000
        self.l1_limit = l1_bytes
        self.max_prefix_bytes = min(max_prefix_bytes, MAX_PREFIX_BYTES)
        self.fill = fill
        self.breaker = Breaker(
            breaker_failures, breaker_cooldown_ms / 1000, breaker_max_cooldown_ms / 1000
        )
        self.l1: OrderedDict[L1Key, tuple[FixedPrefixTokenCache, int]] = OrderedDict()
        self.l1_bytes = 0
        self._from_daemon: set[L1Key] = set()  # L1 keys whose split the daemon gave
        self._l1_lock = threading.Lock()
        self._eid: bytes | None = None
        self.hostmap: HostMapView | None = None  # attach_map: the client gives the address
        # Prefixes this worker saw once (with no map to tell it), or None: cache from the first.
        self.seen = SecondSight() if min_uses > 1 else None
        # A special token's id decodes to its text, so a hit could spell the prefix with a
        # special id where the policy does not allow one. It can only do so where the text holds
        # a special token's first character (for OpenAI's encodings, "<"): a memchr tells.
        self._forbidden_text: dict[frozenset, Any] = {}
        # Made now, not on first use: AutoPrefixCache checks block_bytes (a ValueError here).
        self.auto = AutoPrefixCache(self.enc, max_bytes=auto_l1_bytes, block_bytes=auto_block_bytes)
        self.block = auto_block_bytes
        self.auto_local_bytes = auto_local_bytes
        self._seeds: dict[frozenset, bytes] = {}
        self._seed_policies: dict[bytes, SpecialPolicy] = {}
        self.follow = follow
        self.follower: Any = None  # client/follow.py's Follower, started on the first AUTO
        self._followed: set[bytes] = set()  # the seeds it subscribed to
        self.tell_from_root = False  # the daemon lost our chains: tell whole texts (note_reply)
        self._next_id = 0
        self.pid = os.getpid()
        self.reset_counters()

    def reset_counters(self) -> None:
        self.counters = dict.fromkeys(
            (
                "l1_hits",
                "l2_hits",
                "misses",
                "fallbacks",
                "timeouts",
                "errors",
                "rejected_hits",
                "late_replies",
                "auto_calls",
                "auto_hit_bytes",
                "auto_told",  # TELLs sent on the client's own socket (no follower)
                "published_refused",
                "map_hits",  # of l2_hits, those read from the host's map (no round trip)
                "first_sights",  # prefixes encoded whole, not cached: seen once (admission)
                "untrusted",  # sockets not connected: not the daemon's (owner, mode, directory)
            ),
            0,
        )

    def after_fork(self) -> None:
        """In a child process: the same L1 (plain data), a fresh breaker and locks.

        Run by ``os.register_at_fork`` before the child runs any code (client/sockets.py), and
        by the pid check of a call if a fork bypassed that (a C-level ``fork()``). A lock a
        parent's thread held at the fork would never be released: it is made anew, and the L1
        it guarded emptied (that thread was half way through an update). The counters carry on
        from the parent's values at the fork, like all inherited memory.
        """
        self.pid = os.getpid()
        if self.hostmap is not None:
            self.hostmap.after_fork()
        if self._l1_lock.locked():
            self.l1 = OrderedDict()
            self.l1_bytes = 0
        self._l1_lock = threading.Lock()
        self.auto.after_fork()  # a no-op once flashtoken.auto's own fork hook has run
        self.breaker.reset()
        if self.follower is not None:  # its thread is the parent's: leave its socket alone
            abandon(self.follower)
            self.follower = None
            self._followed = set()

    # -- L1 -----------------------------------------------------------------------------------

    @staticmethod
    def allowed_of(enc: tiktoken.Encoding, allowed_special: SpecialArg) -> frozenset:
        """The normalised allowed set, as ``SpecialPolicy`` computes it (the L1 key's part)."""
        if allowed_special == "all":
            return frozenset(enc.special_tokens_set)
        if not allowed_special and not isinstance(allowed_special, str):
            return frozenset()
        try:
            if not isinstance(allowed_special, str) and all(
                isinstance(s, str) for s in allowed_special
            ):
                return frozenset(allowed_special) & enc.special_tokens_set
        except TypeError:
            pass
        # Invalid: the cache raises the TypeError SpecialPolicy raises, given the same arguments.
        return frozenset()

    @staticmethod
    def l1_key(prefix: str, allowed: frozenset) -> L1Key:
        # The ordinary policy is keyed by the str itself: its hash is cached on the object, and
        # a caller passing the same object gets an identity comparison, not a memcmp.
        return (prefix, allowed) if allowed else prefix

    def l1_get(self, key: L1Key) -> FixedPrefixTokenCache | None:
        found = self.l1.get(key)
        if found is None:
            return None
        try:
            self.l1.move_to_end(key)
        except KeyError:  # evicted by another thread in between: still a valid cache
            pass
        self.counters["l1_hits"] += 1
        return found[0]

    def l1_put(
        self, key: L1Key, cache: FixedPrefixTokenCache | WholeText, from_daemon: bool = False
    ) -> None:
        if isinstance(cache, WholeText):
            return  # a first sight: encoded whole, not kept (admission on the second sight)
        size = _BYTES_PER_ENTRY + 2 * len(cache.prefix) + _BYTES_PER_TOKEN * cache.cut // 3
        # cut // 3: a cheap token-count estimate (~3-4 chars a token), without a len() of head.
        if size > self.l1_limit:
            return
        with self._l1_lock:
            old = self.l1.pop(key, None)
            if old is not None:
                self.l1_bytes -= old[1]
            while self.l1 and self.l1_bytes + size > self.l1_limit:
                gone, (_, gone_size) = self.l1.popitem(last=False)
                self.l1_bytes -= gone_size
                self._from_daemon.discard(gone)
            self.l1[key] = (cache, size)
            self.l1_bytes += size
            if from_daemon:
                self._from_daemon.add(key)
            else:
                self._from_daemon.discard(key)

    def distrust(self) -> None:
        """A reply of the daemon was found wrong: drop from the L1 everything it gave before
        (declared prefixes it answered, every block of the automatic L1), not only that reply.
        What the client cannot check (that a spelling is tiktoken's own tokenization) it took
        on trust; a daemon caught answering wrong is not trusted with what it said before."""
        with self._l1_lock:
            for key in self._from_daemon:
                old = self.l1.pop(key, None)
                if old is not None:
                    self.l1_bytes -= old[1]
            self._from_daemon = set()
        self.auto.clear()

    def attach_map(self, address: str) -> None:
        """Read the host's map beside the daemon's socket at ``address`` (ipc:// only)."""
        try:
            self.hostmap = HostMapView(address, self.enc)
        except ImportError:  # lmdb missing: every prefix is asked for, as before the map
            self.hostmap = None

    def from_map(self, prefix: str, allowed: frozenset) -> FixedPrefixTokenCache | WholeText | None:
        """The L1 entry for ``prefix`` from the host's map, with no round trip; a
        :class:`WholeText` for the host's first sight of it (not cached: admission on the second
        sight); None when the daemon must be asked (or there is no map).

        Works while the daemon is down, frozen or restarting: the map is a file."""
        if self.hostmap is None:
            return None
        try:
            data = prefix.encode("utf-8")
        except UnicodeEncodeError:
            return None
        if len(data) > self.max_prefix_bytes:
            return None
        if self._eid is None:
            self._eid = encoding_id(self.enc)  # ~40 ms once per process: not in __init__
        found = self.hostmap.lookup(self.enc, self._ns, self._eid, allowed, prefix, data)
        if isinstance(found, FixedPrefixTokenCache):
            self.counters["l2_hits"] += 1  # a hit of the host's store, as one through the daemon
            self.counters["map_hits"] += 1  # ... of those, read from the map with no round trip
            return found
        if found is None or found.seen or self.seen is None:
            return None  # no usable map, the host has seen it, or min_uses=1: ask the daemon
        self.hostmap.sighted(found.key)
        self.counters["first_sights"] += 1
        return WholeText(self.enc, prefix)

    def touch_frames(self, *, closing: bool = False) -> list[bytes] | None:
        """A TOUCH to send now (fire-and-forget) for the map hits taken, or None; ``closing``:
        all that are pending, due or not."""
        if self.hostmap is None:
            return None
        keys = self.hostmap.pending() if closing else self.hostmap.touches_due()
        return None if keys is None else TouchRequest(0, keys).frames()

    def build_local(self, prefix: str, allowed: frozenset) -> FixedPrefixTokenCache | WholeText:
        """One local encode of the prefix: the same cost as tiktoken on it, once per process.

        Only for a prefix seen before (by the host, or without a map by this worker): a first
        sight is encoded whole, not split and kept (flashtoken/admission.py)."""
        reader = None if self.hostmap is None else self.hostmap.reader
        if self.seen is not None and (reader is None or not reader.usable):
            if not self.seen.seen_before(_sighting(prefix, allowed)):
                self.counters["first_sights"] += 1
                return WholeText(self.enc, prefix)
        cache = FixedPrefixTokenCache(self.enc, prefix)
        if allowed:
            # Compute the split for this policy now, not inside a later call.
            cache.count("", allowed_special=allowed, disallowed_special=())
        return cache

    # -- requests -----------------------------------------------------------------------------

    def prepare(self, prefix: str, allowed: frozenset) -> Pending | None:
        """The GET to send for ``prefix``, or None when the daemon must not be asked.

        None: the breaker is open, the prefix has lone surrogates (not UTF-8: the daemon could
        not even receive it; tiktoken replaces them, locally), or it is over the size limit.
        """
        try:
            data: bytes | None = prefix.encode("utf-8")
        except UnicodeEncodeError:
            data = None
        if data is None or len(data) > self.max_prefix_bytes or not self.breaker.allow():
            self.counters["fallbacks"] += 1
            return None
        if self._eid is None:
            self._eid = encoding_id(self.enc)  # ~40 ms once per process: not in __init__
        ordered = tuple(sorted(allowed))
        request_id = self.next_id()
        frames = GetRequest(
            request_id,
            self._ns,
            self.enc.name,
            self._eid,
            ordered,
            self.fill,
            data,
            fill_wait_ms(len(data), self.timeout) if self.fill else 0,
        ).frames()
        return Pending(request_id, prefix, allowed, frames)

    def next_id(self) -> int:
        """A new request id: 1 .. 2^64-1, wrapping (0 means "unknown")."""
        self._next_id = (self._next_id + 1) & 0xFFFF_FFFF_FFFF_FFFF or 1
        return self._next_id

    # -- automatic reuse (no declared prefix) ---------------------------------------------------

    def _may_hold_forbidden(self, allowed: frozenset, text: str) -> bool:
        """Whether ``text`` holds the text of a special token not allowed: only then could a
        reply that spells ``text`` carry that token's id (a regex search, ~10x cheaper than
        looking for the ids in a long head)."""
        search = self._forbidden_text.get(allowed)
        if search is None:
            search = self._forbidden_text[allowed] = SpecialPolicy(
                frozenset(), frozenset(self.enc.special_tokens_set - allowed)
            ).finds_disallowed
        return search(text)

    def _forbidden(self, allowed: frozenset) -> frozenset:
        """The ids of the special tokens not in ``allowed`` (the L1 keeps them per policy)."""
        return self.auto.forbidden(allowed)

    def accept(self, pending: Pending | AutoPending, frames: list) -> tuple[str, Any]:
        """What a received reply means for ``pending``: ``(LATE | DONE | FAILED, result)``.

        The result of a GET is a cache (hit) or None (miss); of an AUTO, ``(tokens, cut)``
        (hit) or None."""
        try:
            reply = parse_reply(frames)
        except ProtocolError:
            return self._failed()
        if reply.id != pending.id:
            self.note_reply(reply)
            self.counters["late_replies"] += 1
            return LATE, None
        if isinstance(reply, ErrorReply):
            if reply.error == SERVER_ERROR:
                # The daemon is healthy but cannot serve this prefix (its fill failed).
                self.breaker.success()
                self.counters["misses"] += 1
                return DONE, None
            return self._failed()  # CLIENT_ERROR: we and the daemon disagree; back off
        auto = isinstance(pending, AutoPending)
        hit, miss = (AutoHit, AutoMiss) if auto else (GetHit, GetMiss)
        if isinstance(reply, miss):
            self.breaker.success()
            self.counters["misses"] += 1
            return DONE, None
        if not isinstance(reply, hit):
            return self._failed()  # not an answer to this op
        if isinstance(pending, AutoPending):
            cache: Any = self._check_auto(pending, reply)  # type: ignore[arg-type]
        else:
            cache = self._check_hit(pending, reply.cut, reply.tokens)  # type: ignore[union-attr]
        if cache is None:
            self.counters["rejected_hits"] += 1
            self.distrust()
            return self._failed()
        self.breaker.success()
        self.counters["l2_hits"] += 1
        return DONE, cache

    def _check_hit(self, pending: Pending, cut: int, tokens: Any) -> FixedPrefixTokenCache | None:
        prefix = pending.prefix
        if cut > len(prefix):
            return None
        try:
            head = token_list(tokens)  # shared int objects: ~8 bytes a token in the L1, not ~40
            # Raises KeyError for an id outside the vocabulary (or in one of its holes).
            spelled = self.enc.decode_bytes(head)
        except Exception:
            return None
        text = prefix[:cut]
        if spelled != text.encode("utf-8"):
            return None  # a colliding, stale or corrupted entry: it spells another text
        if self._may_hold_forbidden(pending.allowed, text):
            if not self._forbidden(pending.allowed).isdisjoint(head):
                return None
        return FixedPrefixTokenCache.from_split(
            self.enc, prefix, PrefixSplit(head, cut), allowed_special=pending.allowed
        )

    def _failed(self) -> tuple[str, None]:
        self.counters["errors"] += 1
        self.counters["fallbacks"] += 1
        self.breaker.failure()
        return FAILED, None

    def timed_out(self) -> None:
        self.counters["timeouts"] += 1
        self.counters["fallbacks"] += 1
        self.breaker.failure()

    def unavailable(self) -> None:
        """The socket failed (a ZMQError): like a timeout, without the wait."""
        self.counters["errors"] += 1
        self.counters["fallbacks"] += 1
        self.breaker.failure()

    def busy(self) -> None:
        """Another thread or task held the socket for the whole budget."""
        self.counters["fallbacks"] += 1

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        out["breaker"] = self.breaker.state
        out["l1_items"] = len(self.l1)
        out["l1_bytes"] = self.l1_bytes
        out["l1_limit"] = self.l1_limit
        auto = self.auto.stats()
        out["auto_l1_items"] = auto["curr_items"]
        out["auto_l1_bytes"] = auto["bytes"]
        out["auto_l1_adopted"] = auto["blocks_adopted"]  # blocks other workers encoded
        out["auto_l1_refused"] = auto["blocks_refused"]
        out["published_received"] = self.follower.received if self.follower else 0
        out["auto_told"] += self.follower.told if self.follower else 0
        return out


def fill_wait_ms(prefix_bytes: int, timeout_s: float) -> int:
    """How long a GET may wait for the daemon's fill of its prefix (single flight): about twice
    what encoding it here would cost (~75 ns a byte; the daemon's encode serves every worker
    that waits), and well inside the client's own timeout, so a wait never trips the breaker."""
    return max(0, min(int(timeout_s * 750), 1 + prefix_bytes // 8192))
