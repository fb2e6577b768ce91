"""Encode this text exactly, with the fastest backend that passed the exactness gate.

FlashToken's caches decide what to encode (the suffix, the re-encoded tail, a miss); an
:class:`Encoder` encodes it. ``backend="tiktoken"`` (the default) is tiktoken itself, the oracle.
``"toktok"`` (toktok-rs) and ``"gigatoken"`` are Rust tokenizers that offer tiktoken's ids for the
OpenAI encodings at several times its speed; ``"fastest"`` takes the first of them installed that
passes the gate, else tiktoken. Only "encode this text" is delegated: cuts, cache keys and the
special-token checks stay FlashToken's.

Exact or not used (docs/BACKENDS.md says exactly what is proven, gated and sampled; the per-backend
adapters are in flashtoken/backend_adapters.py):

- **Gated.** Before a backend serves an encoding, it must return tiktoken's ids on the gate
  (flashtoken/backend_gate.py). One that fails is not used: a ``RuntimeWarning`` names the
  backend, the encoding and the failing case, and tiktoken encodes instead.
- **Routed.** A text a backend cannot take goes to tiktoken, transparently: gigatoken always
  recognises special tokens, so text holding one it should treat as ordinary is tiktoken's;
  any error a backend raises (toktok rejects lone surrogates, which tiktoken repairs) sends that
  call to tiktoken, which then gives its own answer or its own exception. A text with a run of
  ``_LONG_RUN`` whitespace characters goes to tiktoken too: tiktoken's regex overflows its stack
  on runs near a million (``PanicException``), and a backend that answers there would give a
  different outcome.
- **Sampled.** ``shadow_fraction`` of the calls are re-encoded by tiktoken on a background thread
  (a bounded queue; a full queue drops the sample, never blocks the caller). A disagreement
  disables the backend for that encoding in the whole process, logs the case and shows in
  :meth:`Encoder.stats`.

>>> enc = Encoder("cl100k_base")
>>> enc.encode_ordinary("hello world"), enc.backend
([15339, 1917], 'tiktoken')
"""

from __future__ import annotations

import logging
import random
import threading
import warnings
import weakref
from collections.abc import Callable, Collection
from typing import Any, Literal

import tiktoken

from flashtoken.backend_adapters import (
    Avoiding,
    Gigatoken,
    TokTok,
    Unsupported,
)
from flashtoken.backend_gate import candidate_code_points, disagreeing_code_points, run_gate
from flashtoken.backend_shadow import Shadow
from flashtoken.backend_shadow import fatal as _fatal
from flashtoken.encodings import resolve_encoding

__all__ = ["BACKENDS", "Encoder", "get_encoder"]

BACKENDS = ("tiktoken", "toktok", "gigatoken", "fastest")
"""The names ``backend=`` accepts."""

_FASTEST_ORDER = ("toktok", "gigatoken")
# "fastest" uses the first of these that passed the gate, and for texts of _LARGE characters or
# more the second one too, if it passed: measured here (cl100k, min of repeats), toktok takes
# 0.45 us for 100 characters where gigatoken takes 0.72, and 151 us for 32 KiB where gigatoken
# takes 135 (numbers on 2 shared cores; the gate, not these, decides exactness).
_LARGE = 4096

_LONG_RUN = 100_000
_EXTRAS = {"toktok": "toktok-rs", "gigatoken": "gigatoken"}
_log = logging.getLogger("flashtoken.backends")


_candidates: list[str] = []


def _candidates_once() -> str:
    if not _candidates:
        _candidates.append(candidate_code_points())
    return _candidates[0]


_FACTORIES: dict[str, Callable[[tiktoken.Encoding], Any]] = {
    "toktok": TokTok,
    "gigatoken": Gigatoken,
}


# -- the gate, once per (backend, encoding) and process -------------------------------------------


class _State:
    """One backend on one encoding: its adapter while it is trusted, else why not."""

    def __init__(self, name: str, adapter: Any, disabled: str | None) -> None:
        self.name = name
        self.adapter = adapter
        self.disabled = disabled

    def disable(self, reason: str) -> None:
        self.disabled = reason


_states: weakref.WeakKeyDictionary[tiktoken.Encoding, dict[str, _State]] = (
    weakref.WeakKeyDictionary()
)
_states_lock = threading.Lock()


def _state(enc: tiktoken.Encoding, name: str) -> _State:
    """Load and gate ``name`` for ``enc`` (once). Raises ImportError if it is not installed."""
    with _states_lock:
        per_enc = _states.setdefault(enc, {})
        state = per_enc.get(name)
        if state is None:
            state = per_enc[name] = _load_and_gate(enc, name)
    return state


def _load_and_gate(enc: tiktoken.Encoding, name: str) -> _State:
    try:
        adapter = _FACTORIES[name](enc)
    except ImportError as exc:
        raise ImportError(
            f"backend {name!r} is not installed: pip install 'flashtoken[{name}]' "
            f"(or {_EXTRAS.get(name, name)!r}), or use backend='tiktoken'"
        ) from exc
    except Unsupported as exc:
        return _State(name, None, str(exc))
    except Exception as exc:  # noqa: BLE001 - a backend that cannot load is not used
        return _State(name, None, f"{name} did not load {enc.name}: {type(exc).__name__}: {exc}")
    try:
        avoid = disagreeing_code_points(enc, adapter.ordinary, _candidates_once())
    except Exception as exc:  # noqa: BLE001 - a backend that cannot be probed is not used
        return _State(name, None, f"{name} could not be probed on {enc.name}: {exc!r}")
    if avoid:
        _log.info(
            "backend %r classifies %d code points otherwise than tiktoken on %s (%s...): texts "
            "holding one go to tiktoken",
            name,
            len(avoid),
            enc.name,
            ", ".join(f"U+{ord(c):04X}" for c in avoid[:3]),
        )
        adapter = Avoiding(adapter, avoid)
    failure = run_gate(enc, adapter.ordinary, adapter.special)
    if failure is not None:
        reason = f"backend {name!r} failed the exactness gate on {enc.name}: {failure}"
        warnings.warn(reason + "; tiktoken encodes instead", RuntimeWarning, stacklevel=4)
        return _State(name, None, reason)
    return _State(name, adapter, None)


# -- the encoder ----------------------------------------------------------------------------------


class Encoder:
    """Encodes text as ``encoding`` does, with ``backend`` where it is exact, else tiktoken.

    ``encode_ordinary(text)`` and ``encode(text, allowed_special=..., disallowed_special=...)``
    are the Encoding's: an Encoder stands in for it wherever FlashToken encodes text it does not
    find cached. Only ``encode`` calls with nothing disallowed reach a fast backend (the
    caches check for disallowed special tokens themselves). ``backend`` is one of
    :data:`BACKENDS`; ``shadow_fraction`` (0..1) of the calls served by a fast backend are checked
    against tiktoken off the request path.

    >>> Encoder("cl100k_base", "fastest").encode_ordinary("hello world")
    [15339, 1917]

    Raises ValueError for an unknown backend or fraction, and ImportError if a backend named
    explicitly is not installed (``"fastest"`` never raises: it settles for tiktoken).
    """

    def __init__(
        self,
        encoding: str | tiktoken.Encoding,
        backend: str = "tiktoken",
        *,
        shadow_fraction: float = 0.0,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if not 0.0 <= shadow_fraction <= 1.0:
            raise ValueError(f"shadow_fraction must lie in [0, 1], not {shadow_fraction!r}")
        self._enc = enc = resolve_encoding(encoding)
        self.requested = backend
        self._state, self._why = _choose(enc, backend)
        self._large = _choose(enc, _FASTEST_ORDER[1])[0] if backend == "fastest" else None
        if self._large is self._state:
            self._large = None
        self._fraction = shadow_fraction
        self._counts = {"routed_to_tiktoken": 0}
        self._shadow: Shadow | None = None
        if self._state is None:
            # tiktoken's bound methods themselves: no wrapper on the default path.
            self.encode_ordinary: Callable[[str], list[int]] = enc.encode_ordinary
            self.count_ordinary: Callable[[str], int] = lambda text: len(enc.encode_ordinary(text))
            return
        adapter = self._state.adapter
        if shadow_fraction > 0:
            self._shadow = Shadow(enc, self._state)
            self.encode_ordinary = lambda text: self._call(adapter.ordinary, text, None)
            # Counts go through encode_ordinary here, so that they are sampled too.
            self.count_ordinary = lambda text: len(self.encode_ordinary(text))
        else:
            large = self._large.adapter if self._large is not None else None
            self.encode_ordinary = self._fast(
                adapter.ordinary, enc.encode_ordinary, large and large.ordinary
            )
            self.count_ordinary = self._fast(
                adapter.count_ordinary,
                lambda text: len(enc.encode_ordinary(text)),
                large and large.count_ordinary,
            )

    def _fast(
        self,
        fast: Callable[[str], Any],
        slow: Callable[[str], Any],
        large: Callable[[str], Any] | None = None,
    ) -> Callable[[str], Any]:
        """``fast(text)`` (``large(text)`` for a large text, if given) unless it refuses (None,
        or any error): then ``slow(text)``.

        A closure, not a method: a suffix of 100 characters takes toktok about a microsecond,
        so each attribute lookup and check on this path is a visible share of the call."""
        state, counts, large_state = self._state, self._counts, self._large
        assert state is not None

        def call(text: str) -> Any:
            size = len(text)
            if large is not None and size >= _LARGE and not large_state.disabled:  # type: ignore[union-attr]
                use = large  # (a refusal there goes to tiktoken, like any other)
            elif not state.disabled:
                use = fast
            else:
                return slow(text)
            if size < _LONG_RUN or not _has_long_run(text):
                try:
                    out = use(text)
                except BaseException as exc:  # any refusal, PanicException included
                    if _fatal(exc):
                        raise
                    out = None
                if out is not None:
                    return out
                counts["routed_to_tiktoken"] += 1
            return slow(text)

        return call

    @property
    def encoding(self) -> tiktoken.Encoding:
        return self._enc

    @property
    def backend(self) -> str:
        """The backend in use now: tiktoken if none passed the gate or one was disabled."""
        if self._state is None or self._state.disabled:
            return "tiktoken"
        return self._state.name

    def encode(
        self,
        text: str,
        *,
        allowed_special: Literal["all"] | Collection[str],
        disallowed_special: Literal["all"] | Collection[str],
    ) -> list[int]:
        """``encoding.encode(text, allowed_special=..., disallowed_special=...)``.

        Both keywords are required (no tiktoken defaults to trip over). The fast backend serves
        only calls with nothing disallowed (``disallowed_special=()``): FlashToken's caches make
        those, having checked for disallowed tokens themselves; any other call is tiktoken's.
        """
        if self._state is None or disallowed_special:
            return self._enc.encode(
                text,
                allowed_special=allowed_special,  # type: ignore[arg-type]
                disallowed_special=disallowed_special,
            )
        if allowed_special == "all":
            allowed: frozenset[str] = frozenset(self._enc.special_tokens_set)
        elif type(allowed_special) is frozenset:
            allowed = allowed_special
        else:
            allowed = frozenset(allowed_special)
        return self._call(self._state.adapter.special, text, allowed)

    def _call(self, fn: Callable[..., list[int] | None], text: str, allowed: Any) -> list[int]:
        state = self._state
        if state is not None and not state.disabled and not _has_long_run(text):
            try:
                ids = fn(text) if allowed is None else fn(text, allowed)
            except BaseException as exc:  # any refusal, PanicException included: tiktoken's
                if _fatal(exc):
                    raise
                ids = None
            if ids is not None:
                if self._shadow is not None and random.random() < self._fraction:
                    self._shadow.offer(text, allowed, ids)
                return ids
            self._counts["routed_to_tiktoken"] += 1
        if allowed is None:
            return self._enc.encode_ordinary(text)
        return self._enc.encode(text, allowed_special=allowed, disallowed_special=())

    def stats(self) -> dict[str, object]:
        """Counters (memcached style) and why the asked backend is not in use, if it is not."""
        out: dict[str, object] = {
            "backend": self.backend,
            "backend_requested": self.requested,
            "backend_disabled": self._state.disabled if self._state else self._why,
            "backend_avoided_code_points": getattr(
                self._state.adapter if self._state else None, "avoided", 0
            ),
            "backend_large_texts": (
                self._large.name if self._large and not self._large.disabled else None
            ),
            "shadow_fraction": self._fraction,
            **self._counts,
        }
        if self._shadow is not None:
            out.update(self._shadow.counts)
        return out

    def __repr__(self) -> str:
        return f"Encoder({self._enc.name!r}, backend={self.backend!r})"


def _has_long_run(text: str) -> bool:
    """Whether ``text`` holds ``_LONG_RUN`` whitespace characters in a row.

    Such a run covers two consecutive multiples ``m``, ``m + step`` of ``step = _LONG_RUN // 2``,
    and the first such ``m`` lies less than ``step`` after the run's start: so only those pairs
    are looked at, and the whitespace around ``m`` measured (``strip``, in C). Rejected: the
    regex ``\\s{100000}``, which tries each start inside a shorter run again (a text of 99,999
    spaces took it 20 s).
    """
    n = len(text)
    if n < _LONG_RUN:
        return False
    step = _LONG_RUN // 2
    for m in range(0, n - step, step):
        if text[m].isspace() and text[m + step].isspace():
            before = text[max(0, m - step) : m]
            after = text[m : m + _LONG_RUN]
            if len(before) - len(before.rstrip()) + len(after) - len(after.lstrip()) >= _LONG_RUN:
                return True
    return False


def _choose(enc: tiktoken.Encoding, backend: str) -> tuple[_State | None, str | None]:
    """The trusted state of ``backend`` on ``enc``, or None (tiktoken) and why."""
    if backend == "tiktoken":
        return None, None
    if backend != "fastest":
        state = _state(enc, backend)
        return (state, None) if state.adapter is not None else (None, state.disabled)
    reasons = []
    for name in _FASTEST_ORDER:
        try:
            state = _state(enc, name)
        except ImportError:
            reasons.append(f"{name} is not installed")
            continue
        if state.adapter is not None and not state.disabled:
            return state, None
        reasons.append(str(state.disabled))
    return None, "; ".join(reasons)


_encoders: weakref.WeakKeyDictionary[tiktoken.Encoding, dict[tuple[str, float], Encoder]] = (
    weakref.WeakKeyDictionary()
)


# (id of the Encoding, backend, fraction) -> (a weak reference to it, its Encoder): the
# reference tells an Encoding from a later one that reuses a dead one's id.
_recent: dict[tuple[int, str, float], tuple[weakref.ref[tiktoken.Encoding], Encoder]] = {}


def get_encoder(
    encoding: str | tiktoken.Encoding | Encoder,
    backend: str | Encoder = "tiktoken",
    *,
    shadow_fraction: float = 0.0,
) -> Encoder:
    """The process's :class:`Encoder` for ``encoding`` and ``backend`` (one per pair), or
    ``backend`` itself when it is an Encoder already (which must be of the same encoding)."""
    if type(backend) is str:
        # The usual call (a cache or client made per request on a miss): one plain dict
        # lookup. A WeakKeyDictionary lookup makes a weak reference every time (~0.3 µs).
        found = _recent.get((id(encoding), backend, shadow_fraction))
        if found is not None and found[0]() is encoding:
            return found[1]
    enc = encoding.encoding if isinstance(encoding, Encoder) else resolve_encoding(encoding)
    if isinstance(backend, Encoder):
        if backend.encoding is not enc:
            raise ValueError(
                f"the Encoder is for {backend.encoding.name!r}, the cache for {enc.name!r}"
            )
        return backend
    per_enc = _encoders.setdefault(enc, {})
    key = (backend, shadow_fraction)
    encoder = per_enc.get(key)
    if encoder is None:
        encoder = per_enc[key] = Encoder(enc, backend, shadow_fraction=shadow_fraction)
    if isinstance(encoding, tiktoken.Encoding):
        if len(_recent) >= 64:
            _recent.clear()
        _recent[(id(encoding), backend, shadow_fraction)] = (weakref.ref(encoding), encoder)
    return encoder
