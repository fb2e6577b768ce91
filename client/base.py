"""What ``Client`` and ``AsyncClient`` share that does no IO: their settings (one signature of
explicit, typed keywords, checked against the table in client/settings.py), the core, where the
last call's ids came from, the counters and tiktoken's decode passthroughs."""

from __future__ import annotations

import inspect
from array import array
from contextvars import ContextVar
from typing import Any, TypeVar

import tiktoken

from flashtoken.admission import WholeText
from flashtoken.specials import SpecialArg, SpecialPolicy
from flashtoken.text import require_str
from flashtoken.wire import default_address

from .core import ClientCore
from .flows import Source
from .l1 import L1Key, Prefix, l1_key
from .settings import check_keywords, client_settings
from .sockets import register
from .tally import Tallied, count_tokens

__all__ = ["ClientBase"]

C = TypeVar("C", bound="ClientBase")


class ClientBase:
    """The settings, the core and the per-call source of a client; see ``Client``.

    Every keyword left None takes its ``FLASHTOKEN_*`` environment variable, else the table's
    default (docs/INTEGRATION.md, "Settings"); a test checks that these keywords are the
    table's, so a setting cannot be added to one and not the other.
    """

    def __new__(cls: type[C], *args: Any, **keywords: Any) -> C:
        # Python's own TypeError for a misspelt keyword names no setting: these names are
        # checked here first (a set difference, well under a microsecond), and one that is no
        # setting is named with the closest that is (client_settings' message).
        check_keywords(cls.__name__, keywords)
        return super().__new__(cls)

    def __init__(
        self,
        address: str | None = None,
        encoding: str | tiktoken.Encoding | None = None,
        *,
        namespace: bytes | str | None = None,
        timeout_ms: float | None = None,
        l1_bytes: int | None = None,
        preload_bytes: int | None = None,
        breaker_failures: int | None = None,
        breaker_cooldown_ms: float | None = None,
        breaker_max_cooldown_ms: float | None = None,
        max_prefix_bytes: int | None = None,
        auto_l1_bytes: int | None = None,
        auto_block_bytes: int | None = None,
        auto_local_bytes: int | None = None,
        follow: bool | None = None,
        fill: bool | None = None,
        min_uses: int | None = None,
        backend: str | None = None,
        share_min_bytes: int | None = None,
    ) -> None:
        # The first statement, so that locals() holds the parameters only: name -> value given.
        given = dict(locals())
        del given["self"]
        settings = client_settings(type(self).__name__, given)
        self._core = ClientCore(settings)
        self.address: str = settings["address"] or default_address()
        settings["address"] = self.address
        self.settings: dict[str, Any] = settings
        """The settings in use: the keywords given, else ``FLASHTOKEN_*``, else the defaults."""
        self._core.attach(self.address)
        self._closed = False
        # Per thread and per asyncio task (each has its own context): a client shared by many
        # reports to each caller its own last call's source.
        self._source: ContextVar[str | None] = ContextVar("flashtoken_source", default=None)
        self._open()
        register(self)

    # help(), inspect and IDEs show __init__'s keywords, not __new__'s (*args, **keywords).
    __signature__ = inspect.signature(__init__).replace(
        parameters=list(inspect.signature(__init__).parameters.values())[1:],
        return_annotation=inspect.Signature.empty,
    )

    def _open(self) -> None:
        """The driver's IO state (socket, lock), before the fork hook can see the client."""
        raise NotImplementedError

    @property
    def encoding(self) -> tiktoken.Encoding:
        return self._core.enc

    @property
    def last_source(self) -> str | None:
        """Where the ids of this thread's (or task's) last encode call came from:

        ``"l1"`` this process's cache; ``"map"`` the host's map (no round trip); ``"daemon"``
        the daemon's answer; ``"local"`` a local encode (the prefix's, or a text's rest after
        nothing cached); ``"whole"`` a first sight, encoded whole as tiktoken would, not cached.
        For a text with no prefix, the source of its longest cached part. For a batch, the
        source all its texts share, else ``"mixed"``. None before the first call.
        """
        return self._source.get()

    def decode(self, tokens: list[int], errors: str = "replace") -> str:
        """``encoding.decode(tokens, errors=errors)``: tiktoken's, no IO."""
        return self._core.enc.decode(tokens, errors=errors)

    def decode_bytes(self, tokens: list[int]) -> bytes:
        """``encoding.decode_bytes(tokens)``: tiktoken's, no IO."""
        return self._core.enc.decode_bytes(tokens)

    def stats(self) -> dict[str, Any]:
        """This process's counters: ``l1_hits``, ``l2_hits`` (daemon hits), ``misses`` (daemon
        misses), ``fallbacks`` (local encodes without a daemon answer), ``timeouts``, ``errors``,
        ``rejected_hits``, ``late_replies``, ``breaker`` (closed / open / half-open), L1 size, and
        of the tokens returned, ``cached_tokens`` (from a cache) and ``uncached_tokens``
        (encoded by the call: client/tally.py)."""
        out = self._core.stats()
        out["address"] = self.address
        return out

    # -- what the drivers share before any IO ---------------------------------------------------

    def _allowed(self, allowed_special: SpecialArg) -> frozenset[str]:
        return ClientCore.allowed_of(self._core.enc, allowed_special)

    def _l1(self, prefix: str, allowed: frozenset[str]) -> tuple[L1Key, Tallied | None]:
        """The L1 key of ``prefix`` and its cache there, or, for a prefix too short to share
        (``share_min_bytes``), its local one: no flow, no IO (the source set if found), each
        counting its tokens (client/tally.py). None: fetch it (client/flows.py)."""
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        core = self._core
        key = l1_key(prefix, allowed)
        cache: Prefix | None = core.l1.get(key)
        if cache is not None:
            self._source.set("l1")
            return key, Tallied.of(cache, "l1", allowed, core.counters)
        if core.share_min_bytes and core.too_short_to_share(prefix):
            cache = core.short_local(key, prefix, allowed)
            return key, self._fetched(
                cache, "whole" if isinstance(cache, WholeText) else "local", allowed
            )
        return key, None

    def _fetched(self, cache: Prefix, source: Source, allowed: frozenset[str]) -> Tallied:
        """A prefix the L1 did not hold, as a driver's flow fetched it (its source set): the
        cache the call's method runs on, counting its tokens (client/tally.py)."""
        self._source.set(source)
        return Tallied.of(cache, source, allowed, self._core.counters)

    def _auto_policy(
        self, text: str, allowed_special: SpecialArg, disallowed_special: SpecialArg
    ) -> SpecialPolicy | None:
        """The policy of a text with no prefix, or None when tiktoken's own call must answer
        (a disallowed special token: its ValueError; invalid arguments: its TypeError)."""
        require_str(text, "text")
        policy = SpecialPolicy.parse(self._core.enc, allowed_special, disallowed_special)
        if policy is None or policy.finds_disallowed(text):
            return None
        return policy

    def _tiktoken(
        self, text: str, allowed_special: SpecialArg, disallowed_special: SpecialArg
    ) -> list[int]:
        self._source.set("local")
        # Any: tiktoken's annotation omits the other collections its encode takes (and ours).
        special: Any = dict(allowed_special=allowed_special, disallowed_special=disallowed_special)
        tokens = self._core.enc.encode(text, **special)
        count_tokens(self._core.counters, len(tokens), 0)
        return tokens


def batch_source(sources: list[Source | None]) -> str | None:
    """The source of a batch: the one all its texts share, else ``"mixed"``."""
    distinct = set(sources)
    return distinct.pop() if len(distinct) == 1 else ("mixed" if distinct else None)


def to_numpy(tokens: Any) -> Any:
    """``tokens`` (a list or an ``array('I')``) as tiktoken's ``encode_to_numpy`` returns them:
    a ``numpy.uint32`` array. numpy is imported here, not at import: it is optional."""
    import numpy

    buffer = tokens if isinstance(tokens, array) else array("I", tokens)
    return numpy.frombuffer(buffer, dtype=numpy.uint32)
