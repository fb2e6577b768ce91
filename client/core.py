"""What the sync and asyncio clients share, without any socket IO (sans-IO).

The L1 (client/l1.py), the host's map (client/hostmap.py), the circuit breaker, building requests
and checking replies are held here (the automatic-reuse half is client/chains.py; each is a
component); the order of the steps of each request is client/flows.py's, and ``Client`` and
``AsyncClient`` differ only in how they wait on the socket. Every decision that could change a
token id is made here, and made the same way for both.

A reply is used only after these checks (``ClientCore.accept``): it parses as our protocol, its
id is the one we are waiting for (else it is a late reply and is discarded), it answers the
request's op, ``0 <= cut <= len(prefix)``, and its tokens are a valid span of the text
(client/served.py: they decode to exactly ``prefix[:cut]``, no id is out of the vocabulary and
none is a special token the policy does not allow). The last check is what makes a colliding
or corrupted entry harmless: its tokens spell another text. The daemon is trusted on one thing
only: that for the text they spell, its tokens and its cut are what ``flashtoken.split_prefix``
computes (it runs that code; it is reachable only by the socket owner).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial
from typing import Any

import tiktoken
import xxhash

from flashtoken.admission import SecondSight, WholeText
from flashtoken.backends import get_encoder
from flashtoken.encodings import resolve_encoding
from flashtoken.errors import ProtocolError
from flashtoken.prefix import FixedPrefixTokenCache, PrefixSplit
from flashtoken.specials import SpecialArg
from flashtoken.wire import (
    MAX_PREFIX_BYTES,
    MIN_BLOCK_BYTES,
    SERVER_ERROR,
    ErrorReply,
    GetHit,
    GetMiss,
    GetRequest,
    TouchRequest,
    parse_reply,
)

from .breaker import Breaker
from .chains import Chains
from .hostmap import HostMapView
from .l1 import L1Key, Prefix, PrefixL1, l1_key
from .requests import Pending, RequestContext
from .served import SpanCheck
from .settings import CLIENT_DEFAULTS, SHARE_MIN_BYTES

__all__ = ["CLIENT_DEFAULTS", "Breaker", "ClientCore", "Pending"]

_UNSENT_TOUCH_BYTES = 256 * 16  # a TOUCH batch's worth of keys (the protocol takes 1,024)

COUNTERS = (
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
    "short_prefixes",  # declared prefixes below SHARE_MIN_BYTES: never looked up on the host
    "preloaded",  # the host's hot prefixes taken into the L1 when the client started
    "cached_tokens",  # of the tokens returned, those taken from a cache (client/tally.py)
    "uncached_tokens",  # ... and those encoded by the call
)


def _sighting(prefix: str, allowed: frozenset[str]) -> bytes:
    """What this worker remembers of a prefix it saw once (no map to keep it in)."""
    h = xxhash.xxh3_128(prefix.encode("utf-8", "surrogatepass"))
    h.update("\x00".join(sorted(allowed)).encode("utf-8"))
    return h.digest()


# What ``ClientCore.accept`` makes of a reply.
LATE = "late"  # another request's reply: discard, keep waiting
DONE = "done"  # the answer: the pending request's ``check`` result (hit) or None (miss)
FAILED = "failed"  # garbage or an error: encode locally, count a failure, drop the socket


class ClientCore:
    """The state of one client in one process, without IO. Not for direct use.

    ``settings``: the resolved settings of the client (``client_settings``) without its
    address. Its automatic-reuse half is ``self.chains`` (client/chains.py)."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.enc = resolve_encoding(settings["encoding"])
        # Encodes what is not cached: misses, suffixes, the text after a chain (docs/BACKENDS.md).
        self.encoder = get_encoder(self.enc, settings["backend"])
        block = settings["auto_block_bytes"]
        if block < MIN_BLOCK_BYTES:
            raise ValueError(
                f"auto_block_bytes={block} is below the daemon's minimum of"
                f" {MIN_BLOCK_BYTES} bytes (each block costs it a lookup and an entry);"
                f" pass auto_block_bytes >= {MIN_BLOCK_BYTES}"
            )
        self.namespace: bytes = settings["namespace"]  # a str was taken as UTF-8
        self.requests = RequestContext(self.enc, self.namespace, settings["fill"])
        self.timeout = settings["timeout_ms"] / 1000
        self.max_prefix_bytes = min(settings["max_prefix_bytes"], MAX_PREFIX_BYTES)
        # Below this a hit costs more than the backend's whole encode (client/settings.py).
        given = settings.get("share_min_bytes")
        by_backend = SHARE_MIN_BYTES.get(self.encoder.backend, 0)
        self.share_min_bytes = by_backend if given is None else given
        self.breaker = Breaker(
            settings["breaker_failures"],
            settings["breaker_cooldown_ms"] / 1000,
            settings["breaker_max_cooldown_ms"] / 1000,
        )
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.spans = SpanCheck(self.enc)
        self.chains = Chains(
            self.requests,
            self.spans,
            self.breaker,
            self.counters,
            l1_bytes=settings["auto_l1_bytes"],
            block_bytes=block,
            local_bytes=settings["auto_local_bytes"],
            max_text_bytes=self.max_prefix_bytes,
            follow=settings["follow"],
            encoder=self.encoder,
        )
        self.l1 = PrefixL1(settings["l1_bytes"], self.counters)
        self.preload_bytes = min(settings["preload_bytes"], settings["l1_bytes"])
        self.hostmap: HostMapView | None = None  # attach: the client gives the address
        self._unsent_touches = b""  # keys of map hits whose TOUCH could not be sent yet
        # Prefixes this worker saw once (with no map to tell it), or None: cache from the first.
        self.seen = SecondSight() if settings["min_uses"] > 1 else None
        self.pid = os.getpid()

    @property
    def follow(self) -> bool:
        return self.chains.follow

    def reset_counters(self) -> None:
        # In place: the chains component counts into the same dict.
        self.counters.update(dict.fromkeys(COUNTERS, 0))

    def after_fork(self) -> None:
        """In a child process: the same L1 (plain data), a fresh breaker and locks.

        Run by ``os.register_at_fork`` before the child runs any code (client/sockets.py), and
        by the pid check of a call if a fork bypassed that (a C-level ``fork()``). The counters
        carry on from the parent's values at the fork, like all inherited memory.
        """
        self.pid = os.getpid()
        self._unsent_touches = b""  # the parent's hits are the parent's to report
        if self.hostmap is not None:
            self.hostmap.after_fork()
        self.l1.after_fork()
        self.chains.after_fork()
        self.breaker.reset()

    def attach(self, address: str) -> None:
        """The daemon's address: read the host's map beside its socket (ipc:// only), follow
        its published chains."""
        self.chains.address = address
        try:
            self.hostmap = HostMapView(address, self.enc, self.encoder)
        except ImportError:  # lmdb missing: every prefix is asked for, as before the map
            self.hostmap = None
            return
        hot = self.hostmap.hot(
            self.enc, self.requests.tag, self.requests.eid, self.preload_bytes, self.encoder
        )
        for prefix, allowed, cache in reversed(hot):  # the newest put last: the L1's freshest
            self.l1.put(l1_key(prefix, allowed), cache, True)
        self.counters["preloaded"] += len(hot)

    # -- the policy's key, and trust ----------------------------------------------------------

    @staticmethod
    def allowed_of(enc: tiktoken.Encoding, allowed_special: SpecialArg) -> frozenset[str]:
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

    def distrust(self) -> None:
        """A reply of the daemon was found wrong: drop from the L1 everything it gave before
        (declared prefixes it answered, every block of the automatic L1), not only that reply.
        What the client cannot check (that a spelling is tiktoken's own tokenization) it took
        on trust; a daemon caught answering wrong is not trusted with what it said before."""
        self.l1.distrust()
        self.chains.distrust()

    def from_map(self, prefix: str, allowed: frozenset[str]) -> Prefix | None:
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
        req = self.requests
        found = self.hostmap.lookup(
            self.enc, req.tag, req.eid, allowed, prefix, data, backend=self.encoder
        )
        if isinstance(found, FixedPrefixTokenCache):
            self.counters["l2_hits"] += 1  # a hit of the host's store, as one through the daemon
            self.counters["map_hits"] += 1  # ... of those, read from the map with no round trip
            return found
        if found is None or found.seen or self.seen is None:
            return None  # no usable map, the host has seen it, or min_uses=1: ask the daemon
        if self.seen.seen_before(found.key):
            # This worker's own sight, not reported yet (sightings go in batches, ~50 ms): a
            # second sight all the same.
            return None
        self.hostmap.sighted(found.key)
        self.counters["first_sights"] += 1
        return WholeText(self.enc, prefix, self.encoder)

    def touch_frames(self, *, closing: bool = False) -> list[bytes] | None:
        """A TOUCH to send now (fire-and-forget) for the map hits taken, or None; ``closing``:
        all that are pending, due or not."""
        request = self.touch_request(closing=closing)
        return None if request is None else request.frames()

    def touch_request(self, *, closing: bool = False) -> TouchRequest | None:
        """``touch_frames``' request, with the keys of the last one that could not be sent."""
        if self.hostmap is None:
            return None
        keys = self.hostmap.pending() if closing else self.hostmap.touches_due()
        if self._unsent_touches:
            keys, self._unsent_touches = self._unsent_touches + (keys or b""), b""
        return None if keys is None else TouchRequest(0, keys)

    def touch_unsent(self, keys: bytes) -> None:
        """Keep the keys of a TOUCH that was not sent (a socket still connecting, the socket
        busy) for the next one: a hit never reported is never counted by the daemon
        (``get_hits``, ``map_tokens_served``) nor moves its entry in the LRU order. At most
        ``_UNSENT_TOUCH_BYTES``, the newest, while the daemon is away."""
        self._unsent_touches = (keys + self._unsent_touches)[-_UNSENT_TOUCH_BYTES:]

    def too_short_to_share(self, prefix: str) -> bool:
        """Whether ``prefix`` is below ``SHARE_MIN_BYTES`` for this client's backend: its whole
        encode costs less than a hit from the host's store would."""
        limit, chars = self.share_min_bytes, len(prefix)
        if chars >= limit:  # a code point is one UTF-8 byte or more (up to four)
            return False
        if 4 * chars < limit or prefix.isascii():  # no encode (1 us a KiB) where it can't matter
            return True
        return len(prefix.encode("utf-8", "surrogatepass")) < limit

    def short_local(self, key: L1Key, prefix: str, allowed: frozenset[str]) -> Prefix:
        """A prefix too short to share: encoded whole, as tiktoken does; split and put in the
        L1 only once it is seen again here (or at once with ``min_uses=1``) and the L1 can
        hold it. Nothing is looked up, sent or filled, so it costs nothing beyond its encode."""
        self.counters["short_prefixes"] += 1
        if not self.l1.could_hold(len(prefix)) or (
            self.seen is not None and not self.seen.seen_before(_sighting(prefix, allowed))
        ):
            return WholeText(self.enc, prefix, self.encoder)
        cache = self._split_here(prefix, allowed)
        if self.pid == os.getpid():  # else a fork the hook missed: the next flow resets the L1
            self.l1.put(key, cache)
        return cache

    def build_local(self, prefix: str, allowed: frozenset[str]) -> Prefix:
        """One local encode of the prefix: the same cost as tiktoken on it, once per process.

        Only for a prefix seen before (by the host, or without a map by this worker): a first
        sight is encoded whole, not split and kept (flashtoken/admission.py)."""
        reader = None if self.hostmap is None else self.hostmap.reader
        if self.seen is not None and (reader is None or not reader.usable):
            if not self.seen.seen_before(_sighting(prefix, allowed)):
                self.counters["first_sights"] += 1
                return WholeText(self.enc, prefix, self.encoder)
        return self._split_here(prefix, allowed)

    def _split_here(self, prefix: str, allowed: frozenset[str]) -> FixedPrefixTokenCache:
        cache = FixedPrefixTokenCache(self.enc, prefix, backend=self.encoder)
        if allowed:
            # Compute the split for this policy now, not inside a later call.
            cache.count("", allowed_special=allowed, disallowed_special=())
        return cache

    # -- requests -----------------------------------------------------------------------------

    def prepare(self, prefix: str, allowed: frozenset[str]) -> Pending | None:
        """The GET to send for ``prefix``, or None when the daemon must not be asked.

        None: the breaker is open, the prefix has lone surrogates (not UTF-8: the daemon could
        not even receive it; tiktoken replaces them, locally), or it is over the size limit.
        Its ``check`` gives the prefix's cache made of the daemon's split.
        """
        try:
            data: bytes | None = prefix.encode("utf-8")
        except UnicodeEncodeError:
            data = None
        if data is None or len(data) > self.max_prefix_bytes or not self.breaker.allow():
            self.counters["fallbacks"] += 1
            return None
        req = self.requests
        request_id = req.next_id()
        frames = GetRequest(
            request_id,
            req.tag,
            self.enc.name,
            req.eid,
            tuple(sorted(allowed)),
            req.fill,
            data,
            fill_wait_ms(len(data), self.timeout) if req.fill else 0,
        ).frames()
        return Pending(
            request_id, frames, GetHit, GetMiss, partial(self._check_hit, prefix, allowed)
        )

    def accept(self, pending: Pending, frames: list[bytes]) -> tuple[str, Any]:
        """What a received reply means for ``pending``: ``(LATE | DONE | FAILED, result)``;
        the result of a hit is ``pending.check``'s, of a miss None."""
        try:
            reply = parse_reply(frames)
        except ProtocolError:
            return self._failed()
        if reply.id != pending.id:
            self.chains.note_reply(reply)
            self.counters["late_replies"] += 1
            return LATE, None
        if isinstance(reply, ErrorReply):
            if reply.error == SERVER_ERROR:
                # The daemon is healthy but cannot serve this prefix (its fill failed).
                self.breaker.success()
                self.counters["misses"] += 1
                return DONE, None
            return self._failed()  # CLIENT_ERROR: we and the daemon disagree; back off
        if isinstance(reply, pending.miss):
            self.breaker.success()
            self.counters["misses"] += 1
            return DONE, None
        if not isinstance(reply, pending.hit):
            return self._failed()  # not an answer to this op
        result = pending.check(reply)
        if result is None:
            self.counters["rejected_hits"] += 1
            self.distrust()
            return self._failed()
        self.breaker.success()
        self.counters["l2_hits"] += 1
        return DONE, result

    def _check_hit(
        self, prefix: str, allowed: frozenset[str], reply: GetHit
    ) -> FixedPrefixTokenCache | None:
        cut = reply.cut
        if cut > len(prefix):
            return None
        text = prefix[:cut]
        head = self.spans.spelled(reply.tokens, text.encode("utf-8"), text, allowed)
        if head is None:
            return None
        return FixedPrefixTokenCache.from_split(
            self.enc, prefix, PrefixSplit(head, cut), allowed_special=allowed, backend=self.encoder
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
        out["backend"] = self.encoder.backend  # tiktoken where the asked one failed its gate
        out["l1_items"] = len(self.l1)
        out["l1_bytes"] = self.l1.bytes
        out["l1_limit"] = self.l1.limit
        chains = self.chains.stats()
        out["auto_told"] += chains.pop("told_by_follower")
        out.update(chains)
        return out


def fill_wait_ms(prefix_bytes: int, timeout_s: float) -> int:
    """How long a GET may wait for the daemon's fill of its prefix (single flight): about twice
    what encoding it here would cost (~75 ns a byte; the daemon's encode serves every worker
    that waits), and well inside the client's own timeout, so a wait never trips the breaker."""
    return max(0, min(int(timeout_s * 750), 1 + prefix_bytes // 8192))
