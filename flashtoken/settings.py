"""Settings as declared data: one ``Setting`` per option, shared by the client and the daemon.

A table of ``Setting`` rows (``flashtoken.client.settings.CLIENT_SETTINGS``,
``flashtoken.daemon.settings.SETTINGS``) is the single source of each option's name, default,
unit, range and help. From it come the keyword checks of ``Client()`` / ``AsyncClient()``, the
daemon's CLI flags, the ``FLASHTOKEN_*`` environment variables, ``--help`` and the table in
docs/INTEGRATION.md (a test compares the two). Precedence, everywhere: an explicit argument, then
the environment variable, then the default.

Values are checked where they enter (``Setting.check``), so a bad one fails at construction with
a message that says what to pass, not later inside every call (``timeout_ms=inf`` used to raise
``OverflowError`` from each poll; ``breaker_cooldown_ms=nan`` kept the breaker open for ever).

No third-party imports: ``import flashtoken`` stays light.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "KINDS",
    "Setting",
    "check_address",
    "format_size",
    "markdown_table",
    "parse_size",
    "resolve",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# sun_path holds 108 bytes with its NUL on Linux (104 on macOS and the BSDs).
MAX_IPC_PATH_BYTES = 107 if sys.platform.startswith("linux") else 103

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_size(text: str) -> int:
    """Bytes from ``"512MiB"``, ``"1GiB"``, ``"64k"`` or ``"1048576"`` (K, M, G are binary).

    >>> parse_size("512MiB"), parse_size("1GiB"), parse_size("4096")
    (536870912, 1073741824, 4096)

    Raises ValueError for anything else.
    """
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 512MiB, 1GiB, 65536)")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _UNITS[unit]


def format_size(n: int) -> str:
    """The inverse of ``parse_size`` for display: the largest exact binary unit.

    >>> format_size(512 * 1024 * 1024), format_size(4096), format_size(1000)
    ('512MiB', '4KiB', '1000')
    """
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def check_address(address: Any, name: str = "address") -> str:
    """``address`` if it is a usable daemon address, else a ValueError that says what to pass.

    Accepted: ``ipc:///an/absolute/path`` (a unix socket file; its directory's permissions are
    what keep other users out) and ``tcp://HOST:PORT`` (CURVE keys, flashtoken/wire/auth.py).

    >>> check_address("ipc:///run/flashtoken/daemon.sock")
    'ipc:///run/flashtoken/daemon.sock'
    >>> check_address("ipc://@flashtoken")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: address ipc://@flashtoken is an abstract unix socket, which has no file ...
    """
    example = "e.g. ipc:///run/flashtoken/daemon.sock"
    if not isinstance(address, str):
        raise TypeError(f"{name} must be a str such as 'ipc:///run/flashtoken/daemon.sock'")
    if address.startswith("ipc://"):
        path = address[len("ipc://") :]
        if path.startswith("@"):
            raise ValueError(
                f"{name} {address} is an abstract unix socket, which has no file permissions"
                f" (any local user could connect to it); use a path in a private directory,"
                f" {example}"
            )
        if not path.startswith("/"):
            raise ValueError(
                f"{name} {address} is not an absolute path (the daemon and its clients may run"
                f" in other directories); write ipc:// followed by an absolute path, {example}"
            )
        if len(path.encode("utf-8", "surrogateescape")) > MAX_IPC_PATH_BYTES:
            raise ValueError(
                f"{name} {address}: the socket path is longer than {MAX_IPC_PATH_BYTES} bytes,"
                f" the limit of a unix socket; choose a shorter path, {example}"
            )
        return address
    if address.startswith("tcp://"):
        host, sep, port = address[len("tcp://") :].rpartition(":")
        if host and sep and port.isdigit() and 0 < int(port) < 65536:
            return address
        raise ValueError(f"{name} {address} is not tcp://HOST:PORT, e.g. tcp://127.0.0.1:7000")
    raise ValueError(
        f"{name} {address!r} is not an ipc:// or tcp:// address; {example}"
        " (or tcp://127.0.0.1:7000, authenticated with the tcp:// key file's keys)"
    )


KINDS = ("size", "count", "ms", "flag", "choice", "names", "address", "text", "salt")


@dataclass(frozen=True)
class Setting:
    """One option: its name (a keyword, ``--name-with-dashes``, ``FLASHTOKEN_NAME``), default,
    kind, range and help.

    Kinds: ``size`` (bytes; ``"512MiB"`` from text), ``count`` (an int), ``ms`` (a finite
    number of milliseconds), ``flag`` (a bool; ``1/true/yes/on`` from text), ``choice``,
    ``names`` (comma-separated str), ``address`` (see ``check_address``), ``text`` (a str),
    ``salt`` (bytes, or a str taken as UTF-8).
    """

    name: str
    default: Any
    kind: str
    help: str
    low: float | None = None  # inclusive
    high: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound (timeout_ms > 0)
    choices: tuple[str, ...] = ()
    env_name: str | None = None  # default: FLASHTOKEN_ + NAME
    default_text: str | None = None  # for a default computed at run time (an address)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"setting {self.name}: kind must be one of {', '.join(KINDS)}, not"
                f" {self.kind!r} (the kind sets the unit shown: size is bytes, ms milliseconds)"
            )
        if self.default is not None:
            self.check(self.default)  # a default outside its own range is a bug in the table

    @property
    def env(self) -> str:
        return self.env_name or "FLASHTOKEN_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def unit(self) -> str:
        if self.kind == "choice":
            return " / ".join(self.choices)
        return {
            "size": "bytes",
            "count": "count",
            "ms": "ms",
            "flag": "bool",
            "names": "names",
            "address": "address",
            "salt": "str or bytes",
            "text": "name",
        }.get(self.kind, "")

    # -- checking ---------------------------------------------------------------------------

    def check(self, value: Any) -> Any:
        """``value`` normalised (a tuple of names, bytes for a salt), or TypeError / ValueError
        naming the option, what it must be and an example."""
        kind = self.kind
        if value is None and self.default is None:
            return None  # an optional setting left unset (no address, no fleet URL)
        if kind == "address":
            return check_address(value, self.name)
        if kind == "flag":
            if not isinstance(value, bool):
                raise TypeError(f"{self.name} must be True or False, not {value!r}")
            return value
        if kind in ("size", "count"):
            if isinstance(value, bool) or not isinstance(value, int):
                hint = "; for a size written as text, pass flashtoken.settings.parse_size('64MiB')"
                raise TypeError(
                    f"{self.name} must be an int, not {type(value).__name__} {value!r};"
                    f" e.g. {self._example()}{hint if kind == 'size' else ''}"
                )
            return self._in_range(value)
        if kind == "ms":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"{self.name} must be a number of milliseconds, not"
                    f" {type(value).__name__} {value!r}; e.g. {self._example()}"
                )
            if not math.isfinite(value):
                raise ValueError(
                    f"{self.name} must be a finite number of milliseconds, not {value!r};"
                    f" e.g. {self._example()} ({self._range()})"
                )
            return self._in_range(value)
        if kind == "choice":
            if value not in self.choices:
                raise ValueError(
                    f"{self.name} must be one of {', '.join(self.choices)}, not {value!r}"
                )
            return value
        if kind == "names":
            if isinstance(value, str):
                value = _names(value)
            try:
                names = tuple(value)
            except TypeError:
                names = None
            if names is None or not all(isinstance(n, str) and n for n in names):
                raise TypeError(
                    f"{self.name} must be a list of names such as ['cl100k_base', 'o200k_base'],"
                    f" not {value!r}"
                )
            return names
        if kind == "salt":
            if isinstance(value, str):
                return value.encode("utf-8")
            if isinstance(value, (bytes, bytearray, memoryview)):
                return bytes(value)
            raise TypeError(f"{self.name} must be a str or bytes, not {type(value).__name__}")
        if kind == "text":
            if not isinstance(value, str):
                raise TypeError(f"{self.name} must be a str, not {type(value).__name__}")
            return value
        raise AssertionError(f"unknown kind {kind!r}")

    def _range(self) -> str:
        parts = []
        if self.above is not None:
            parts.append(f"> {self.show(self.above)}")
        if self.low is not None:
            parts.append(f">= {self.show(self.low)}")
        if self.high is not None:
            parts.append(f"<= {self.show(self.high)}")
        return " and ".join(parts)

    def _in_range(self, value: float) -> Any:
        if (
            (self.above is not None and not value > self.above)
            or (self.low is not None and value < self.low)
            or (self.high is not None and value > self.high)
        ):
            raise ValueError(
                f"{self.name} must be {self._range()}, not"
                f" {self.show(value)}; e.g. {self._example()}"
            )
        return value

    def _example(self) -> str:
        """The default as a keyword argument: ``l1_bytes=67108864 (64MiB)``."""
        shown = self.show(self.default)
        written = repr(self.default)
        return f"{self.name}={written}" + (f" ({shown})" if shown != written else "")

    # -- text (CLI flags, environment variables) ----------------------------------------------

    def parse(self, text: str) -> Any:
        """The value of ``text`` (a CLI argument or an environment variable), checked."""
        kind = self.kind
        value: Any = text
        try:
            if kind == "size":
                value = parse_size(text)
            elif kind == "count":
                if not text.strip().lstrip("-").isdigit():
                    raise ValueError(f"not an integer: {text!r}")
                value = int(text.strip())
            elif kind == "ms":
                try:
                    value = float(text.strip())
                except ValueError:
                    raise ValueError(f"not a number of milliseconds: {text!r}") from None
                if value.is_integer():
                    value = int(value)
            elif kind == "flag":
                lowered = text.strip().lower()
                if lowered not in _TRUE | _FALSE:
                    raise ValueError(f"not a flag: {text!r} (use 1/0, true/false, yes/no)")
                value = lowered in _TRUE
            elif kind == "choice":
                value = text.strip().upper() if self.choices[0].isupper() else text.strip()
            elif kind == "names":
                value = _names(text)
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from None
        return self.check(value)

    def show(self, value: Any) -> str:
        """How ``--help``, the docs and errors write a value: 512MiB, not 536870912."""
        if value is None:
            return self.default_text or "none"
        if self.kind == "size" and isinstance(value, int) and not isinstance(value, bool):
            return format_size(value)
        if self.kind == "names":
            return ",".join(value) or "''"
        if self.kind == "flag":
            return "true" if value else "false"
        if self.kind == "salt":
            return repr(value.decode("utf-8", "replace")) if value else "''"
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def resolve(
    settings: Iterable[Setting],
    given: Mapping[str, Any],
    *,
    owner: str,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Every setting's value: from ``given`` (keywords; None means "not given" only for
    settings whose default is None), else its environment variable, else the default.

    Raises TypeError for a keyword that is no setting (suggesting the closest name), and
    TypeError / ValueError from ``Setting.check``; a bad environment variable is named as such.
    """
    table = {s.name: s for s in settings}
    unknown = sorted(set(given) - set(table))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, table, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(
            f"{owner}() got unexpected keyword arguments: {', '.join(hints)};"
            f" its settings are {', '.join(table)}"
        )
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, setting in table.items():
        if name in given and given[name] is not None:
            out[name] = setting.check(given[name])
        elif env.get(setting.env):
            try:
                out[name] = setting.parse(env[setting.env])
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"environment variable {setting.env}={env[setting.env]!r}: {exc};"
                    f" fix it or unset it"
                ) from None
        else:
            out[name] = setting.default
    return out


def markdown_table(settings: Iterable[Setting]) -> str:
    """The docs' table of ``settings``: name, environment variable, default, unit, meaning."""
    rows = [
        "| setting | environment | default | unit | meaning |",
        "|---|---|---|---|---|",
    ]
    for s in settings:
        rows.append(f"| `{s.name}` | `{s.env}` | {s.show(s.default)} | {s.unit} | {s.help} |")
    return "\n".join(rows) + "\n"
