"""The automatic-reuse half of ``ClientCore``: texts with no declared prefix.

The L1 is a ``flashtoken.AutoPrefixCache``. After its lookup (``auto_plan``) a text is routed
(``auto_route``): encoded here when the L1 holds all but a short rest, and the daemon is told
the new blocks (TELL, sent by the follower thread); otherwise one AUTO round trip asks the
daemon for its chain first (checked like a GET hit: ``_check_auto``). The follower
(client/follow.py) takes the blocks the daemon publishes for the chains this process follows
(``take_published``: checked by ``AutoPrefixCache.adopt``). Sans-IO like the rest of the core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from flashtoken.encodings import encoding_id
from flashtoken.errors import DaemonUnavailable, ProtocolError
from flashtoken.prefix import token_list
from flashtoken.specials import SpecialPolicy, encode_with
from flashtoken.wire import (
    AutoHit,
    AutoRequest,
    TellRequest,
    Unplaced,
    make_chain_seed,
    parse_blocks,
    parse_reply,
    publish_address,
)

# At import, not on first use: a fork while a thread was inside that first import left the
# module's import lock held in the child, which then hung on its first AUTO (test_fork).
from .follow import Follower
from .sockets import configure_dealer, trusted

__all__ = ["AUTO_ASK", "AUTO_L1", "AUTO_TELL", "AutoPending", "ChainCore"]


@dataclass(frozen=True)
class AutoPending:
    """An AUTO request on its way: the L1's plan for the text, to check the reply against."""

    id: int
    text: str
    plan: Any  # flashtoken.auto.Plan
    allowed: frozenset
    frames: list


# What ``ClientCore.auto_route`` decides.
AUTO_L1 = "l1"
AUTO_TELL = "tell"
AUTO_ASK = "ask"


class ChainCore:
    """``ClientCore``'s methods for texts with no prefix (a mixin: the state is ClientCore's)."""

    if TYPE_CHECKING:  # ClientCore's, used here
        from flashtoken.auto import AutoPrefixCache

        enc: Any
        auto: AutoPrefixCache
        block: int
        auto_local_bytes: int
        namespace: bytes
        fill: bool
        follow: bool
        follower: Any
        max_prefix_bytes: int
        tell_from_root: bool
        counters: dict[str, int]
        breaker: Any  # client/core.py's Breaker
        _eid: bytes | None
        _seeds: dict[frozenset, bytes]
        _seed_policies: dict[bytes, SpecialPolicy]
        _followed: set[bytes]

        def _may_hold_forbidden(self, allowed: frozenset, text: str) -> bool: ...
        def _forbidden(self, allowed: frozenset) -> frozenset: ...
        def next_id(self) -> int: ...

    def auto_plan(self, text: str, policy: SpecialPolicy) -> Any:
        """The L1's longest cached path for ``text`` (None: not UTF-8, encode locally)."""
        self.counters["auto_calls"] += 1
        return self.auto.lookup(text, policy)

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
        request_id = self.next_id()
        frames = AutoRequest(
            request_id,
            seed,
            self.enc.name,
            self._eid,
            tuple(sorted(allowed)),
            self.fill,
            self.block,
            len(plan.path),
            plan.data,
        ).frames()
        return AutoPending(request_id, text, plan, allowed, frames)

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
        seed = self.seed(allowed)
        assert self._eid is not None
        return TellRequest(
            self.next_id(),
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
        ).frames()

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
            try:
                trusted(address, self.counters)
                trusted(where, self.counters)
            except DaemonUnavailable:
                return  # not the daemon's sockets (or none yet): asked again next time
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

    def auto_finish(
        self, text: str, policy: SpecialPolicy, plan: Any, found: tuple[list[int], int] | None
    ) -> list[int]:
        """The tokens of ``text``: the L1's, then the daemon's (``found``: checked tokens and the
        cut they reach), then one local encode of the rest; records the new blocks in the L1."""
        head = self.auto.head(plan)
        if found is not None:
            tail, cut = found
            tail += encode_with(self.enc, text[cut:], policy)
        else:
            tail = encode_with(self.enc, text[plan.cut :], policy)
        self.auto.record(plan, policy, text, tail)
        head += tail
        return head

    def _check_auto(self, pending: AutoPending, reply: AutoHit) -> tuple[list[int], int] | None:
        plan = pending.plan
        start, cut_byte, blocks, tokens = reply.start, reply.cut_byte, reply.blocks, reply.tokens
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
