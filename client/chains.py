"""Automatic reuse in the client: texts with no declared prefix (a component of ``ClientCore``).

The L1 is a ``flashtoken.AutoPrefixCache``. After its lookup (``plan``) a text is routed
(``route``): encoded here when the L1 holds all but a short rest, and the daemon is told the new
blocks (TELL, sent by the follower thread); otherwise one AUTO round trip asks the daemon for
its chain first (its reply checked by ``served.SpanCheck``, as a GET hit is). The follower
(client/follow.py) takes the blocks the daemon publishes for the chains this process follows
(``take_published``: checked by the AutoPrefixCache) and records this process's own new blocks
after the request has its tokens (``catch_up``). Sans-IO: the round trip itself is
client/flows.py's.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

from flashtoken.auto import AutoPrefixCache
from flashtoken.backends import Encoder
from flashtoken.errors import DaemonUnavailable, ProtocolError
from flashtoken.specials import SpecialPolicy, encode_with
from flashtoken.wire import (
    AutoHit,
    AutoMiss,
    AutoRequest,
    TellRequest,
    Unplaced,
    make_chain_seed,
    parse_blocks,
    parse_reply,
    publish_address,
)

from .breaker import Breaker

# At import, not on first use: a fork while a thread was inside that first import left the
# module's import lock held in the child, which then hung on its first AUTO (test_fork).
from .follow import Follower
from .requests import Pending, RequestContext
from .served import SpanCheck
from .sockets import CONTEXT, abandon, configure_dealer, trusted

__all__ = ["AUTO_ASK", "AUTO_L1", "AUTO_TELL", "Chains"]

# What ``Chains.route`` decides.
AUTO_L1 = "l1"
AUTO_TELL = "tell"
AUTO_ASK = "ask"


class Chains:
    """The automatic-reuse state of one client in one process: the L1 of chains, the seeds of
    its policies and the follower thread. Its dependencies are given, not shared attributes:
    the request context, the span check, the breaker and the client's counters."""

    def __init__(
        self,
        requests: RequestContext,
        spans: SpanCheck,
        breaker: Breaker,
        counters: dict[str, int],
        *,
        l1_bytes: int,
        block_bytes: int,
        local_bytes: int,
        max_text_bytes: int,
        follow: bool,
        encoder: Encoder,
    ) -> None:
        self.requests = requests
        self.spans = spans
        self.breaker = breaker
        self.counters = counters
        # Made now, not on first use: AutoPrefixCache checks block_bytes (a ValueError here).
        self.auto = AutoPrefixCache(
            requests.enc, max_bytes=l1_bytes, block_bytes=block_bytes, backend=encoder
        )
        self.encoder = encoder  # encodes the text after the chain (docs/BACKENDS.md)
        self.block = block_bytes
        self.local_bytes = local_bytes
        self.max_text_bytes = max_text_bytes
        self.follow = follow
        self.address: str | None = None  # the daemon's, for the follower (ClientCore.attach)
        self.follower: Follower | None = None  # started on the first text sent or told
        self._followed: set[bytes] = set()  # the seeds it subscribed to
        self._seeds: dict[frozenset[str], bytes] = {}
        self._seed_policies: dict[bytes, SpecialPolicy] = {}
        self.tell_from_root = False  # the daemon lost our chains: tell whole texts (note_reply)
        # Recording a text's new blocks in the L1 waits for the follower's thread, off the
        # request's path (~60-110 us of a ~200 us request for a long chat); the next lookup, and
        # stats, first finish what is left (``catch_up``), so a process sees its own texts.
        self._unrecorded: list[Any] = []
        self._recording = threading.Lock()

    def after_fork(self) -> None:
        """In a child: the AutoPrefixCache's lock anew, and the parent's follower left alone."""
        self.auto.after_fork()  # a no-op once flashtoken.auto's own fork hook has run
        self._recording = threading.Lock()  # the parent's follower may have held it
        if self.follower is not None:  # its thread is the parent's: leave its socket alone
            abandon(self.follower)
            self.follower = None
            self._followed = set()

    def distrust(self) -> None:
        """Forget every block (the daemon was caught answering wrong: ClientCore.distrust),
        those still to record too (under the lock: none is recorded after the clear)."""
        with self._recording:
            self._unrecorded.clear()
            self.auto.clear()

    # -- one text -------------------------------------------------------------------------------

    def plan(self, text: str, policy: SpecialPolicy) -> Any:
        """The L1's longest cached path for ``text`` (None: not UTF-8, encode locally)."""
        self.counters["auto_calls"] += 1
        self.catch_up()  # an uncontended lock: waits only while the thread is recording
        return self.auto.lookup(text, policy)

    def route(self, plan: Any) -> str:
        """What to do after the L1's ``plan``: ``AUTO_L1`` (the L1 holds every full block of
        the text), ``AUTO_TELL`` (the rest is short: encode it here, tell the daemon about the
        new blocks without waiting) or ``AUTO_ASK`` (ask the daemon for its chain first)."""
        if len(plan.data) // self.block <= len(plan.path):
            route = AUTO_L1
        elif len(plan.data) - plan.cut_byte <= self.local_bytes:
            route = AUTO_TELL
        else:
            return AUTO_ASK
        if plan.path:
            self.counters["l1_hits"] += 1
        return route

    def finish(
        self, text: str, policy: SpecialPolicy, plan: Any, found: tuple[list[int], int] | None
    ) -> list[int]:
        """The tokens of ``text``: the L1's, then the daemon's (``found``: checked tokens and the
        cut they reach), then one local encode of the rest; records the new blocks in the L1."""
        head = self.auto.head(plan)
        if found is not None:
            tail, cut = found
            tail += encode_with(self.encoder, text[cut:], policy)
        else:
            tail = encode_with(self.encoder, text[plan.cut :], policy)
        head += tail  # a new list: ``tail`` is only ever read again, by the record
        follower = self.follower
        if follower is None:
            self.auto.record(plan, policy, text, tail)
        else:
            self._unrecorded.append((plan, policy, text, tail))
            follower.later(self.catch_up)
        return head

    def catch_up(self) -> None:
        """Record the texts whose blocks are not recorded yet, in order (the follower's thread
        does, between requests; a lookup or stats first, if the thread has not yet)."""
        with self._recording:
            while self._unrecorded:
                self.auto.record(*self._unrecorded.pop(0))

    def seed(self, allowed: frozenset[str]) -> bytes:
        """The chain seed of a policy (``make_chain_seed``), made once."""
        seed = self._seeds.get(allowed)
        if seed is None:
            req = self.requests
            seed = make_chain_seed(req.namespace, req.eid, tuple(sorted(allowed)), self.block)
            self._seeds[allowed] = seed
            self._seed_policies[seed] = SpecialPolicy(allowed, frozenset())
        return seed

    def prepare_auto(self, plan: Any, allowed: frozenset[str]) -> Pending | None:
        """The AUTO request after the L1's ``plan``; None: the breaker is open, or too long.

        Its ``check`` gives ``(tokens, cut)``: the daemon's checked tokens after ``plan.cut``
        and the character offset they reach."""
        if len(plan.data) > self.max_text_bytes or not self.breaker.allow():
            self.counters["fallbacks"] += 1
            return None
        req = self.requests
        request_id = req.next_id()
        frames = AutoRequest(
            request_id,
            self.seed(allowed),
            req.enc.name,
            req.eid,
            tuple(sorted(allowed)),
            req.fill,
            self.block,
            len(plan.path),
            plan.data,
        ).frames()
        return Pending(request_id, frames, AutoHit, AutoMiss, partial(self._check, plan, allowed))

    def prepare_tell(self, plan: Any, allowed: frozenset[str]) -> list[bytes] | None:
        """The TELL request naming the blocks after the L1's ``plan`` (just encoded here), so
        that the daemon fills and publishes them; None when there are none or the breaker is
        not closed (no reply is awaited, so a TELL could not tell the breaker anything)."""
        first = 0 if self.tell_from_root else len(plan.path)
        digests = plan.digests[first:]
        if (
            len(plan.digests) == len(plan.path)
            or not self.requests.fill
            or self.breaker.state != "closed"
        ):
            return None
        self.tell_from_root = False
        data, start = plan.data, plan.path[first - 1].cut_byte if first else 0
        end = len(plan.digests) * self.block
        while end < len(data) and data[end] & 0xC0 == 0x80:
            end += 1  # to a character boundary
        req = self.requests
        return TellRequest(
            req.next_id(),
            self.seed(allowed),
            req.enc.name,
            req.eid,
            tuple(sorted(allowed)),
            self.block,
            first,
            plan.digests[first - 1].to_bytes(16, "big") if first else None,
            start,
            [d.to_bytes(16, "big") for d in digests],
            data[start:end],
        ).frames()

    def _check(
        self, plan: Any, allowed: frozenset[str], reply: AutoHit
    ) -> tuple[list[int], int] | None:
        start, cut_byte = reply.start, reply.cut_byte
        if (
            start != plan.cut_byte
            or cut_byte > len(plan.data)
            or not len(plan.path) < reply.blocks <= len(plan.data) // self.block
        ):
            return None
        segment = plan.data[start:cut_byte]
        try:
            text = segment.decode("utf-8")  # strict: cut_byte must end a character
        except UnicodeDecodeError:
            return None
        found = self.spans.spelled(reply.tokens, segment, text, allowed)
        if found is None:
            return None
        self.counters["auto_hit_bytes"] += cut_byte - start
        return found, plan.cut + len(text)

    # -- following the daemon's published blocks -----------------------------------------------

    def follow_chains(self, allowed: frozenset[str]) -> None:
        """Follow the daemon's published blocks of this policy's chains (client/follow.py)."""
        if not self.follow or self.address is None:
            return
        seed = self.seed(allowed)
        if self.follower is None:
            address = self.address
            where = publish_address(address)
            if where is None:
                self.follow = False
                return
            try:
                trusted(address, self.counters)
                trusted(where, self.counters)
            except DaemonUnavailable:
                return  # not the daemon's sockets (or none yet): asked again next time
            self.follower = Follower(
                CONTEXT.get(),
                address,
                where,
                self.take_published,
                self.note_frames,
                configure_dealer,
            )
            self._followed = set()
        if seed not in self._followed:
            self._followed.add(seed)
            self.follower.subscribe(seed)

    def take_published(self, frames: list[bytes]) -> int:
        """Store a published message's blocks in the L1, checked (on the follower's thread)."""
        try:
            blocks = parse_blocks(frames)
        except ProtocolError:
            self.counters["published_refused"] += 1
            return 0
        policy = self._seed_policies.get(blocks.seed)
        if policy is None:
            return 0
        return self.auto.adopt(
            policy,
            blocks.first,
            None if blocks.parent is None else int.from_bytes(blocks.parent, "big"),
            blocks.start,
            [int.from_bytes(d, "big") for d in blocks.digests],
            blocks.ends,
            blocks.span,
            blocks.tokens,
        )

    def note_reply(self, reply: Any) -> None:
        """A reply to a TELL (only ever ``placed: false``): the daemon lacks our chain (it was
        restarted, or evicted it), so the next TELL names every block from the first."""
        if isinstance(reply, Unplaced):
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

    def stats(self) -> dict[str, Any]:
        self.catch_up()
        auto = self.auto.stats()
        return {
            "auto_l1_items": auto["curr_items"],
            "auto_l1_bytes": auto["bytes"],
            "auto_l1_adopted": auto["blocks_adopted"],  # blocks other workers encoded
            "auto_l1_refused": auto["blocks_refused"],
            "published_received": self.follower.received if self.follower else 0,
            "told_by_follower": self.follower.told if self.follower else 0,
        }
