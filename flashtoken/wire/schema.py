"""One declaration per message, from which both its packing and its parsing are derived.

A message is a frozen dataclass (flashtoken/wire/requests.py, replies.py, published.py) whose
fields say where each value travels and what it may be::

    @dataclass(frozen=True)
    class GetRequest(Message):
        OP = "GET"
        id: int = header(REQUEST_ID)
        ns: bytes = header(Bin(KEY_BYTES))
        ...
        prefix: bytes = frame(TEXT)

``message.frames()`` packs it; ``Cls.parse(header, frames, limits)`` checks every field's type
and range and builds it; a message's ``check`` adds the rules that tie fields together (a TELL's
span against its digests). Class-level constants (``OP``, and the names in ``TAGS``, such as a
reply's ``ok`` and ``hit``) go into every header of that message and are what the receiver
dispatches on: no op is guessed from which fields a header happens to hold.
Rejected: a pack function, a dataclass and a parse branch per message (the old protocol.py):
three copies of every message to keep in step, and replies as dicts whose kind was guessed
from which fields they held.
"""

from __future__ import annotations

import dataclasses
from array import array
from typing import Any, ClassVar, NamedTuple

from flashtoken.errors import ProtocolError

from .codec import (
    HEADER_START,
    KEY_BYTES,
    MAX_PREFIX_BYTES,
    MAX_REQUEST_ID,
    MAX_SPECIAL_CHARS,
    MAX_SPECIALS,
    seal_header,
    tokens_from_frame,
    tokens_to_frame,
)

__all__ = [
    "ALLOWED",
    "BOOL",
    "REQUEST_ID",
    "TEXT",
    "TOKENS",
    "Bin",
    "Digests",
    "Int",
    "IntList",
    "Limits",
    "Map",
    "Message",
    "Parent",
    "Raw",
    "Spec",
    "Str",
    "frame",
    "header",
]


class Limits(NamedTuple):
    """What a receiver accepts beyond the fixed ranges: the daemon's ``--max-prefix-bytes``."""

    max_text_bytes: int = MAX_PREFIX_BYTES


DEFAULT_LIMITS = Limits()


class Spec:
    """A field's wire type and range. ``check`` returns the value as the message holds it, or
    raises ProtocolError naming the field; ``pack`` gives what goes on the wire."""

    def check(self, name: str, value: Any, limits: Limits) -> Any:
        raise NotImplementedError

    def pack(self, value: Any) -> Any:
        return value


class Int(Spec):
    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def check(self, name: str, value: Any, limits: Limits) -> int:
        if type(value) is not int or not self.low <= value <= self.high:  # type(): not a bool
            raise ProtocolError(f"field {name!r} must be an int in [{self.low}, {self.high}]")
        return value


class _Bool(Spec):
    def check(self, name: str, value: Any, limits: Limits) -> bool:
        if type(value) is not bool:
            raise ProtocolError(f"field {name!r} must be a bool")
        return value


class Bin(Spec):
    """Exactly ``length`` bytes (msgpack bin)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def check(self, name: str, value: Any, limits: Limits) -> bytes:
        if type(value) is not bytes or len(value) != self.length:
            raise ProtocolError(f"field {name!r} must be {self.length} bytes")
        return value


class Parent(Spec):
    """A 16-byte digest or nil; which of the two is the message's ``check`` to say."""

    def check(self, name: str, value: Any, limits: Limits) -> bytes | None:
        return None if value is None else Bin(KEY_BYTES).check(name, value, limits)


class Str(Spec):
    def __init__(self, max_chars: int, *, empty: bool = False) -> None:
        self.max_chars, self.low = max_chars, 0 if empty else 1

    def check(self, name: str, value: Any, limits: Limits) -> str:
        if type(value) is not str or not self.low <= len(value) <= self.max_chars:
            raise ProtocolError(
                f"field {name!r} must be a str of {self.low} to {self.max_chars} characters"
            )
        return value


class _Allowed(Spec):
    """The allowed special tokens: sorted, no duplicates (one canonical form, so that equal
    policies compare equal in the store). A tuple in the message, a list on the wire."""

    def check(self, name: str, value: Any, limits: Limits) -> tuple[str, ...]:
        if type(value) is not list or len(value) > MAX_SPECIALS:
            raise ProtocolError(f"field {name!r} must be a list of at most {MAX_SPECIALS} str")
        for item in value:
            if type(item) is not str or not 0 < len(item) <= MAX_SPECIAL_CHARS:
                raise ProtocolError(f"field {name!r} must hold special-token strings")
        if any(a >= b for a, b in zip(value, value[1:], strict=False)):
            raise ProtocolError(f"field {name!r} must be sorted and without duplicates")
        return tuple(value)

    def pack(self, value: Any) -> list[str]:
        return list(value)


class Digests(Spec):
    """1 to ``most`` 16-byte digests."""

    def __init__(self, most: int) -> None:
        self.most = most

    def check(self, name: str, value: Any, limits: Limits) -> list[bytes]:
        if (
            type(value) is not list
            or not 0 < len(value) <= self.most
            or any(type(d) is not bytes or len(d) != KEY_BYTES for d in value)
        ):
            raise ProtocolError(f"field {name!r} must list 1 to {self.most} 16-byte digests")
        return value


class IntList(Spec):
    """A list of ints >= 0 (its length is the message's ``check`` to tie to another field)."""

    def check(self, name: str, value: Any, limits: Limits) -> list[int]:
        if type(value) is not list or any(type(x) is not int or x < 0 for x in value):
            raise ProtocolError(f"field {name!r} must be a list of ints >= 0")
        return value


class Map(Spec):
    """A map of str keys (the STATS reply's sections: clients ignore names they do not know)."""

    def check(self, name: str, value: Any, limits: Limits) -> dict[str, Any]:
        if type(value) is not dict:
            raise ProtocolError(f"field {name!r} must be a map")
        return value


# -- frames ---------------------------------------------------------------------------------


class _Text(Spec):
    """A UTF-8 frame of at most ``limits.max_text_bytes``, strictly valid: lone surrogates and
    overlong forms are refused too."""

    def check(self, name: str, value: Any, limits: Limits) -> bytes:
        if len(value) > limits.max_text_bytes:
            raise ProtocolError(
                f"{name} of {len(value)} bytes exceeds the limit of {limits.max_text_bytes}"
            )
        value = bytes(value)
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"{name} is not valid UTF-8 at byte {exc.start}") from exc
        return value


class Raw(Spec):
    """A frame of bytes, at most ``most`` long when given, a multiple of ``unit``."""

    def __init__(self, *, unit: int = 1, most: int | None = None, what: str = "") -> None:
        self.unit, self.most, self.what = unit, most, what

    def check(self, name: str, value: Any, limits: Limits) -> bytes:
        if len(value) % self.unit or (self.most is not None and len(value) > self.most):
            raise ProtocolError(f"frame {name!r} must be {self.what}")
        return bytes(value)


class _Tokens(Spec):
    """Little-endian uint32 tokens: ``array('I')`` in a parsed message; packed from an array or
    from a frame already in wire form (the daemon's stored bytes, sent zero-copy)."""

    def check(self, name: str, value: Any, limits: Limits) -> array:
        return tokens_from_frame(value)

    def pack(self, value: Any) -> Any:
        return tokens_to_frame(value) if isinstance(value, array) else value


BOOL = _Bool()
ALLOWED = _Allowed()
TEXT = _Text()
TOKENS = _Tokens()
REQUEST_ID = Int(0, MAX_REQUEST_ID)


def header(spec: Spec, *, optional: bool = False, **kwargs: Any) -> Any:
    """A field carried in the header under its own name; ``optional`` (with a ``default``): a
    header without it is read as holding the default (a field added in a later version)."""
    return dataclasses.field(metadata={"header": spec, "optional": optional}, **kwargs)


def frame(spec: Spec, *, topic: bool = False) -> Any:
    """A field carried as a raw frame after the header, in declaration order; ``topic``: before
    the header (a PUB message's subscription topic)."""
    return dataclasses.field(metadata={"frame": spec, "topic": topic})


class _Layout:
    """A message class's declaration, read once: which fields go where, and how each is packed
    (``None``: as it is, no call; most fields). Plain slots: ``frames()`` reads it per message."""

    __slots__ = (
        "count",
        "defaults",
        "frame_packers",
        "frames",
        "head_packers",
        "header",
        "prelude",
        "topic",
    )

    def __init__(self, cls: type[Message]) -> None:
        head, frames, topic = [], [], None
        # Header fields that may be absent (added in a later version with a default): an
        # absent one takes its default, a present one is checked like any other.
        self.defaults: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if "header" in f.metadata:
                head.append((f.name, f.metadata["header"]))
                if f.metadata["optional"]:
                    self.defaults[f.name] = f.default
            elif f.metadata["topic"]:
                topic = (f.name, f.metadata["frame"])
            else:
                frames.append((f.name, f.metadata["frame"]))
        self.header: tuple[tuple[str, Spec], ...] = tuple(head)
        self.frames: tuple[tuple[str, Spec], ...] = tuple(frames)
        self.topic: tuple[str, Spec] | None = topic
        self.count = cls.COUNT
        # The constant fields first (magic, version, op, tags), as headers always began.
        self.prelude: dict[str, Any] = dict(HEADER_START)
        if cls.OP is not None:
            self.prelude["op"] = cls.OP
        self.prelude.update((name, getattr(cls, name)) for name in cls.TAGS)
        self.head_packers = tuple((name, _packer(spec)) for name, spec in head)
        self.frame_packers = tuple((name, _packer(spec)) for name, spec in frames)


def _packer(spec: Spec) -> Any:
    return None if type(spec).pack is Spec.pack else spec.pack


_LAYOUTS: dict[type, _Layout] = {}


class Message:
    """Base of every message: ``frames()`` and ``parse()`` read the dataclass's declaration."""

    OP: ClassVar[str | None] = None
    """The op of a request, echoed by its replies; None for a published message."""
    TAGS: ClassVar[tuple[str, ...]] = ()
    """Class attributes written into every header of this message (a reply's ``ok``, ``hit``)."""
    COUNT: ClassVar[str | None] = None
    """A header field holding the number of tokens of the ``tokens`` frame (``n``)."""

    @classmethod
    def _layout(cls) -> _Layout:
        layout = _LAYOUTS.get(cls)
        if layout is None:
            layout = _LAYOUTS[cls] = _Layout(cls)
        return layout

    def frames(self) -> list[Any]:
        """The message as ZeroMQ frames: its header, then its raw frames."""
        layout = _LAYOUTS.get(type(self)) or self._layout()
        fields = layout.prelude.copy()
        for name, pack in layout.head_packers:
            value = getattr(self, name)
            fields[name] = value if pack is None else pack(value)
        out = []
        for name, pack in layout.frame_packers:
            value = getattr(self, name)
            out.append(value if pack is None else pack(value))
        if layout.count is not None:
            fields[layout.count] = len(out[-1]) // 4
        if layout.topic is not None:
            name, spec = layout.topic
            return [spec.pack(getattr(self, name)), seal_header(fields), *out]
        return [seal_header(fields), *out]

    @classmethod
    def parse(cls, head: dict[str, Any], frames: list[Any], limits: Limits = DEFAULT_LIMITS) -> Any:
        """Build the message from its decoded header and its frames after the header (the
        topic, if any, first). Raises ProtocolError for any field out of its type or range."""
        layout = cls._layout()
        want = len(layout.frames) + (layout.topic is not None)
        if len(frames) != want:
            names = [n for n, _ in layout.frames]
            raise ProtocolError(
                f"{cls.OP or cls.__name__} takes {want} frame(s) besides the header"
                + (f": the {', '.join(names)}" if names else "")
                + f", not {len(frames)}"
            )
        defaults = layout.defaults
        values = {
            name: spec.check(name, head.get(name), limits)
            if name not in defaults or name in head
            else defaults[name]
            for name, spec in layout.header
        }
        rest = iter(frames)
        if layout.topic is not None:
            name, spec = layout.topic
            values[name] = spec.check(name, next(rest), limits)
        for (name, spec), raw in zip(layout.frames, rest, strict=True):
            values[name] = spec.check(name, raw, limits)
        if cls.COUNT is not None:
            n = Int(0, MAX_PREFIX_BYTES * 64).check(cls.COUNT, head.get(cls.COUNT), limits)
            if len(frames[-1]) != 4 * n:
                raise ProtocolError(f"a {cls.__name__} whose token frame does not hold n tokens")
        message = cls(**values)
        message.check()
        return message

    def check(self) -> None:
        """The rules that tie fields together; raise ProtocolError. None by default."""
