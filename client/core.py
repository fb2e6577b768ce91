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

import atexit
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import tiktoken
import zmq

from flashtoken.auto import DEFAULT_BLOCK_BYTES, AutoPrefixCache
from flashtoken.encodings import encoding_id, resolve_encoding
from flashtoken.errors import ProtocolError
from flashtoken.prefix import FixedPrefixTokenCache, PrefixSplit, _encode, token_list
from flashtoken.protocol import (
    MAX_HEADER_BYTES,
    MAX_PREFIX_BYTES,
    SERVER_ERROR,
    make_chain_seed,
    make_key,
    pack_auto,
    pack_get,
    pack_tell,
    parse_blocks,
    parse_reply,
    publish_address,
)
from flashtoken.specials import SpecialArg, SpecialPolicy

__all__ = ["CLIENT_DEFAULTS", "AutoPending", "Breaker", "ClientCore", "Pending"]

MiB = 1024 * 1024

CLIENT_DEFAULTS: dict[str, Any] = {
    # ms: how long one daemon round trip may take before going local. Not less: with more busy
    # workers than cores, a healthy daemon's replies take 5-15 ms to be scheduled; at 5 ms the
    # breaker stayed open under such load and the daemon was never filled (8 workers, 2 cores).
    "timeout_ms": 20,
    "l1_bytes": 64 * MiB,  # bytes: approximate memory of the in-process cache
    "breaker_failures": 3,  # consecutive failures that open the breaker
    "breaker_cooldown_ms": 250,  # ms: first open period; doubles per failed probe
    "breaker_max_cooldown_ms": 5_000,  # ms: longest open period (a restart is seen within it)
    "max_prefix_bytes": MAX_PREFIX_BYTES,  # bytes: longer prefixes (or texts) stay local
    "auto_l1_bytes": 64 * MiB,  # bytes: the in-process AutoPrefixCache (texts with no prefix)
    "auto_block_bytes": DEFAULT_BLOCK_BYTES,  # bytes: its block size, also the daemon's chains'
    # bytes: a text with at most this much after the L1's chain is encoded here, and the daemon
    # is only told (no reply awaited): on a busy host a round trip costs about as much as
    # encoding 4 KiB (and the chain up to the previous request usually arrives by publication).
    "auto_local_bytes": 4096,
    "follow": True,  # take the chain blocks the daemon publishes into the L1 (client/follow.py)
}

_BYTES_PER_TOKEN = 12  # the head list (8, its ints shared) + tails and arrays made on demand
_BYTES_PER_ENTRY = 512

L1Key = Union[str, "tuple[str, frozenset[str]]"]


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


@dataclass(frozen=True)
class AutoPending:
    """An AUTO request on its way: the L1's plan for the text, to check the reply against."""

    id: int
    text: str
    plan: Any  # flashtoken.auto._Plan
    allowed: frozenset
    frames: list


# What ``ClientCore.auto_route`` decides.
AUTO_L1 = "l1"
AUTO_TELL = "tell"
AUTO_ASK = "ask"

# What ``ClientCore.accept`` makes of a reply.
LATE = "late"  # another request's reply: discard, keep waiting
DONE = "done"  # the answer: a cache (hit) or None (miss: encode locally)
FAILED = "failed"  # garbage or an error: encode locally, count a failure, drop the socket


class ClientCore:
    """The state of one client in one process, without IO. Not for direct use."""

    def __init__(
        self,
        encoding: str | tiktoken.Encoding,
        *,
        namespace: bytes = b"",
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
        fill: bool = True,
    ) -> None:
        if not isinstance(namespace, bytes):
            raise TypeError("namespace must be bytes")
        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be > 0")
        if l1_bytes < 0:
            raise ValueError("l1_bytes must be >= 0")
        if auto_l1_bytes < 0:
            raise ValueError("auto_l1_bytes must be >= 0")
        if auto_local_bytes < 0:
            raise ValueError("auto_local_bytes must be >= 0")
        self.enc = resolve_encoding(encoding)
        self.namespace = namespace
        self.timeout = timeout_ms / 1000
        self.l1_limit = l1_bytes
        self.max_prefix_bytes = min(max_prefix_bytes, MAX_PREFIX_BYTES)
        self.fill = fill
        self.breaker = Breaker(
            breaker_failures, breaker_cooldown_ms / 1000, breaker_max_cooldown_ms / 1000
        )
        self.l1: OrderedDict[L1Key, tuple[FixedPrefixTokenCache, int]] = OrderedDict()
        self.l1_bytes = 0
        self._l1_lock = threading.Lock()
        self._eid: bytes | None = None
        # A special token's id decodes to its text, so a hit could spell the prefix with a
        # special id where the policy does not allow one. It can only do so where the text holds
        # a special token's first character (for OpenAI's encodings, "<"): a memchr tells.
        self._forbidden_text: dict[frozenset, Any] = {}
        self._forbidden_ids: dict[frozenset, frozenset] = {}
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
            ),
            0,
        )

    def after_fork(self) -> None:
        """In a child process: the same L1 (plain data), a fresh breaker and lock.

        The counters carry on from the parent's values at the fork, like all inherited memory
        (the first calls in the child may already have counted L1 hits).
        """
        self.pid = os.getpid()
        self._l1_lock = threading.Lock()
        self.auto._lock = threading.Lock()  # a parent's thread may have held it at the fork
        self.breaker.reset()
        if self.follower is not None:  # its thread is the parent's: leave its socket alone
            _abandoned.append(self.follower)
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

    def l1_put(self, key: L1Key, cache: FixedPrefixTokenCache) -> None:
        size = _BYTES_PER_ENTRY + 2 * len(cache.prefix) + _BYTES_PER_TOKEN * cache.cut // 3
        # cut // 3: a cheap token-count estimate (~3-4 chars a token), without a len() of head.
        if size > self.l1_limit:
            return
        with self._l1_lock:
            old = self.l1.pop(key, None)
            if old is not None:
                self.l1_bytes -= old[1]
            while self.l1 and self.l1_bytes + size > self.l1_limit:
                self.l1_bytes -= self.l1.popitem(last=False)[1][1]
            self.l1[key] = (cache, size)
            self.l1_bytes += size

    def build_local(self, prefix: str, allowed: frozenset) -> FixedPrefixTokenCache:
        """One local encode of the prefix: the same cost as tiktoken on it, once per process."""
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
        key = make_key(self.namespace, self._eid, ordered, data)
        self._next_id = (self._next_id + 1) & 0xFFFF_FFFF_FFFF_FFFF or 1  # 0 means "unknown"
        frames = pack_get(self._next_id, key, self.enc.name, self._eid, ordered, self.fill, data)
        return Pending(self._next_id, prefix, allowed, frames)

    # -- automatic reuse (no declared prefix) ---------------------------------------------------

    def auto_plan(self, text: str, policy: SpecialPolicy) -> Any:
        """The L1's longest cached path for ``text`` (None: not UTF-8, encode locally)."""
        self.counters["auto_calls"] += 1
        return self.auto._plan(text, policy)

    def auto_route(self, plan: Any) -> str:
        """What to do after the L1's ``plan``: ``AUTO_L1`` (the L1 holds every full block of
        the text), ``AUTO_TELL`` (the rest is short: encode it here, tell the daemon about the
        new blocks without waiting) or ``AUTO_ASK`` (ask the daemon for its chain first)."""
        if len(plan.data) // self.block <= len(plan.path):
            if plan.path:
                self.counters["l1_hits"] += 1
            return AUTO_L1
        if len(plan.data) - plan.cut_byte <= self.auto_local_bytes:
            if plan.path:
                self.counters["l1_hits"] += 1
            return AUTO_TELL
        return AUTO_ASK

    def seed(self, allowed: frozenset) -> bytes:
        """The chain seed of a policy (``make_chain_seed``), made once."""
        seed = self._seeds.get(allowed)
        if seed is None:
            if self._eid is None:
                self._eid = encoding_id(self.enc)
            seed = make_chain_seed(self.namespace, self._eid, tuple(sorted(allowed)), self.block)
            self._seeds[allowed] = seed
            self._seed_policies[seed] = SpecialPolicy(allowed, frozenset())
        return seed

    def prepare_auto(self, text: str, plan: Any, allowed: frozenset) -> AutoPending | None:
        """The AUTO request for ``text`` after the L1's ``plan``; None: breaker open, too long."""
        if len(plan.data) > self.max_prefix_bytes or not self.breaker.allow():
            self.counters["fallbacks"] += 1
            return None
        seed = self.seed(allowed)
        assert self._eid is not None
        self._next_id = (self._next_id + 1) & 0xFFFF_FFFF_FFFF_FFFF or 1
        frames = pack_auto(
            self._next_id,
            seed,
            self.enc.name,
            self._eid,
            tuple(sorted(allowed)),
            self.fill,
            self.block,
            len(plan.path),
            plan.data,
        )
        return AutoPending(self._next_id, text, plan, allowed, frames)

    def prepare_tell(self, plan: Any, allowed: frozenset) -> list[bytes] | None:
        """The TELL request naming the blocks after the L1's ``plan`` (just encoded here), so
        that the daemon fills and publishes them; None when there are none or the breaker is
        not closed (no reply is awaited, so a TELL could not tell the breaker anything)."""
        first = 0 if self.tell_from_root else len(plan.path)
        digests = plan.digests[first:]
        if len(plan.digests) == len(plan.path) or not self.fill or self.breaker.state != "closed":
            return None
        self.tell_from_root = False
        data, start = plan.data, plan.path[first - 1].cut_byte if first else 0
        end = len(plan.digests) * self.block
        while end < len(data) and data[end] & 0xC0 == 0x80:
            end += 1  # to a character boundary
        self._next_id = (self._next_id + 1) & 0xFFFF_FFFF_FFFF_FFFF or 1
        seed = self.seed(allowed)
        assert self._eid is not None
        return pack_tell(
            self._next_id,
            seed,
            self.enc.name,
            self._eid,
            tuple(sorted(allowed)),
            self.block,
            first,
            plan.digests[first - 1].to_bytes(16, "big") if first else None,
            start,
            [d.to_bytes(16, "big") for d in digests],
            data[start:end],
        )

    def follow_chains(self, context: zmq.Context, address: str, allowed: frozenset) -> None:
        """Follow the daemon's published blocks of this policy's chains (client/follow.py)."""
        if not self.follow:
            return
        seed = self.seed(allowed)
        if self.follower is None:
            where = publish_address(address)
            if where is None:
                self.follow = False
                return
            from .follow import Follower

            self.follower = Follower(
                context, address, where, self.take_published, self.note_frames, configure_dealer
            )
            self._followed = set()
        if seed not in self._followed:
            self._followed.add(seed)
            self.follower.subscribe(seed)

    def take_published(self, frames: list[bytes]) -> int:
        """Store a published message's blocks in the L1, checked (on the follower's thread)."""
        try:
            blocks = parse_blocks(frames)
            tokens = token_list(blocks.tokens)  # ValueError: an id no encoding has
        except (ProtocolError, ValueError):
            self.counters["published_refused"] += 1
            return 0
        policy = self._seed_policies.get(blocks.seed)
        if policy is None:
            return 0
        return self.auto._adopt(
            policy,
            blocks.first,
            None if blocks.parent is None else int.from_bytes(blocks.parent, "big"),
            blocks.start,
            [int.from_bytes(d, "big") for d in blocks.digests],
            blocks.ends,
            blocks.span,
            tokens,
        )

    def note_reply(self, reply: Any) -> None:
        """A reply to a TELL (only ever ``placed: false``): the daemon lacks our chain (it was
        restarted, or evicted it), so the next TELL names every block from the first."""
        if reply.fields.get("placed") is False:
            self.tell_from_root = True

    def note_frames(self, frames: list[bytes]) -> None:
        """``note_reply`` for raw frames (the follower thread reads its socket's replies)."""
        try:
            self.note_reply(parse_reply(frames))
        except ProtocolError:
            pass

    def stop_following(self) -> None:
        follower, self.follower = self.follower, None
        if follower is not None:
            follower.close()

    def auto_finish(
        self, text: str, policy: SpecialPolicy, plan: Any, found: tuple[list[int], int] | None
    ) -> list[int]:
        """The tokens of ``text``: the L1's, then the daemon's (``found``: checked tokens and the
        cut they reach), then one local encode of the rest; records the new blocks in the L1."""
        head = self.auto._head(plan)
        if found is not None:
            tail, cut = found
            tail += _encode(self.enc, text[cut:], policy)
        else:
            tail = _encode(self.enc, text[plan.cut :], policy)
        self.auto._finish(plan, policy, text, tail)
        head += tail
        return head

    def _check_auto(
        self, pending: AutoPending, fields: dict, tokens: Any
    ) -> tuple[list[int], int] | None:
        plan = pending.plan
        start, cut_byte, blocks = fields["start"], fields["cut_byte"], fields["blocks"]
        if (
            start != plan.cut_byte
            or cut_byte > len(plan.data)
            or not len(plan.path) < blocks <= len(plan.data) // self.block
        ):
            return None
        segment = plan.data[start:cut_byte]
        try:
            found = token_list(tokens)
            if self.enc.decode_bytes(found) != segment:
                return None  # a colliding, stale or corrupted chain: it spells another text
            text = segment.decode("utf-8")  # strict: cut_byte must end a character
        except Exception:
            return None
        if self._may_hold_forbidden(pending.allowed, text) and not self._forbidden(
            pending.allowed
        ).isdisjoint(found):
            return None
        self.counters["auto_hit_bytes"] += cut_byte - start
        return found, plan.cut + len(text)

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
        forbidden = self._forbidden_ids.get(allowed)
        if forbidden is None:
            forbidden = self._forbidden_ids[allowed] = frozenset(
                i for s, i in self.enc._special_tokens.items() if s not in allowed
            )
        return forbidden

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
        if not reply.ok:
            if reply.error == SERVER_ERROR:
                # The daemon is healthy but cannot serve this prefix (its fill failed).
                self.breaker.success()
                self.counters["misses"] += 1
                return DONE, None
            return self._failed()  # CLIENT_ERROR: we and the daemon disagree; back off
        if "hit" not in reply.fields or ("blocks" in reply.fields) != isinstance(
            pending, AutoPending
        ):
            return self._failed()  # not an answer to this op
        if reply.tokens is None:
            self.breaker.success()
            self.counters["misses"] += 1
            return DONE, None
        if isinstance(pending, AutoPending):
            cache: Any = self._check_auto(pending, reply.fields, reply.tokens)
        else:
            cache = self._check_hit(pending, reply.fields["cut"], reply.tokens)
        if cache is None:
            self.counters["rejected_hits"] += 1
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


# -- sockets ------------------------------------------------------------------------------------

# Reply size limit: a header plus 4 bytes a token, and a prefix never has more tokens than bytes.
MAX_REPLY_BYTES = MAX_HEADER_BYTES + 4 * MAX_PREFIX_BYTES

# Sockets and contexts inherited from a parent process: never used, closed or collected in the
# child (closing would tear down the parent's connection state shared through the fork).
_abandoned: list[Any] = []


def configure_dealer(sock: zmq.Socket, address: str) -> None:
    """The client socket's options: bounded everything, and no queueing to a dead daemon."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 64)
    sock.setsockopt(zmq.RCVHWM, 64)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
    # Queue only on completed connections: a send to a daemon that is not there fails at once
    # (EAGAIN) instead of queueing a request it would answer after its restart.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    sock.connect(address)


class _ContextHolder:
    """One zmq.Context per process, made lazily, terminated at exit after every client closed.

    Not ``zmq.Context.instance()``: that one is shared with the application, which may term it.
    """

    def __init__(self) -> None:
        self.pid = -1
        self.ctx: zmq.Context | None = None
        self.lock = threading.Lock()

    def get(self) -> zmq.Context:
        pid = os.getpid()
        if self.pid != pid:
            with self.lock:
                if self.pid != pid:
                    if self.ctx is not None:
                        _abandoned.append(self.ctx)
                    self.ctx = zmq.Context()
                    self.pid = pid
        assert self.ctx is not None
        return self.ctx


CONTEXT = _ContextHolder()
_clients: weakref.WeakSet[Any] = weakref.WeakSet()


def register(client: Any) -> None:
    _clients.add(client)


@atexit.register
def _close_all() -> None:
    # Never hang interpreter exit: every socket closes with LINGER=0, then the context ends.
    for client in list(_clients):
        try:
            client._close_socket()
            client._core.stop_following()  # before the context goes: its thread uses it
        except Exception:
            pass
    if CONTEXT.ctx is not None and CONTEXT.pid == os.getpid():
        CONTEXT.ctx.destroy(linger=0)
        CONTEXT.ctx = None
        CONTEXT.pid = -1
