"""The daemon's settings: one table of defaults with units.

The same names are the CLI flags (``max_bytes`` is ``--max-bytes``), the keys of the
``settings`` map in a STATS reply, and the names in docs/PROTOCOL.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from flashtoken.protocol import MAX_PREFIX_BYTES

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    unit: str
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "bind",
        None,
        "address",
        "address to bind; default ipc://$XDG_RUNTIME_DIR/flashtoken/daemon.sock (or"
        " {tempdir}/flashtoken-{uid}/daemon.sock). tcp:// only when given: TCP has no"
        " authentication",
    ),
    Setting(
        "max_bytes",
        512 * MiB,
        "bytes",
        "budget of the store: token bytes + prefix bytes + a fixed overhead per entry;"
        " never exceeded (LRU eviction)",
    ),
    Setting(
        "encodings",
        ("cl100k_base", "o200k_base"),
        "names",
        "encodings to load at start (others load on their first fill)",
    ),
    Setting("fill_threads", 2, "threads", "threads encoding prefixes for fills"),
    Setting("max_prefix_bytes", MAX_PREFIX_BYTES, "bytes", "largest prefix a GET may carry"),
    Setting(
        "max_pending_fills",
        64,
        "fills",
        "fills queued or running at once; a miss beyond that is answered without a fill",
    ),
    Setting("hwm", 1000, "messages", "ZeroMQ send and receive high-water marks"),
    Setting("log_level", "INFO", "level", "logging level (DEBUG, INFO, WARNING, ERROR)"),
    Setting(
        "exit_with_parent",
        False,
        "flag",
        "exit when the process that started the daemon exits (gunicorn on_starting hooks)",
    ),
    # The fleet tier (daemon/fleet.py, docs/FLEET.md): off unless fleet_url is given.
    Setting(
        "fleet_url",
        None,
        "url",
        "Valkey / Redis shared by the fleet's daemons: redis://[user:password@]host:port/db,"
        " rediss:// (TLS) or unix:///path.sock; needs fleet_secret_file",
    ),
    Setting(
        "fleet_secret_file",
        None,
        "path",
        "file of fleet secrets, one a line (>= 16 bytes each): the first signs values, every"
        " one verifies them (rotation)",
    ),
    Setting("fleet_key_prefix", "flashtoken:", "string", "prefix of every fleet key (for ACLs)"),
    Setting(
        "fleet_timeout_ms",
        50,
        "ms",
        "timeout of each fleet call (connect, lookup, write); a fill waits at most this long",
    ),
    Setting(
        "fleet_wait_ms",
        5,
        "ms",
        "longest a GET miss waits for its fill's fleet lookup (never longer than encoding the"
        " prefix would take, about); 0: answer misses at once",
    ),
    Setting(
        "fleet_queue_bytes",
        64 * MiB,
        "bytes",
        "bytes of fleet writes queued at most; a write beyond that is dropped and counted",
    ),
)

DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS}

# Per-entry bytes counted on top of the token and prefix bytes: the entry object, its dict
# slot, the key and the LRU links. An estimate, fixed so that accounting is deterministic.
ENTRY_OVERHEAD = 256
# Fills that failed (o200k's panic on ~1M spaces), remembered so that a prefix or a chain that
# makes tiktoken panic is not encoded again on every request.
FAILED_FILLS_KEPT = 1024


@dataclass(frozen=True)
class Config:
    """The daemon's resolved settings (see ``SETTINGS``)."""

    bind: str
    max_bytes: int = DEFAULTS["max_bytes"]
    encodings: tuple[str, ...] = DEFAULTS["encodings"]
    fill_threads: int = DEFAULTS["fill_threads"]
    max_prefix_bytes: int = DEFAULTS["max_prefix_bytes"]
    max_pending_fills: int = DEFAULTS["max_pending_fills"]
    hwm: int = DEFAULTS["hwm"]
    log_level: str = DEFAULTS["log_level"]
    exit_with_parent: bool = DEFAULTS["exit_with_parent"]
    fleet_url: str | None = DEFAULTS["fleet_url"]
    fleet_secret_file: str | None = DEFAULTS["fleet_secret_file"]
    fleet_key_prefix: str = DEFAULTS["fleet_key_prefix"]
    fleet_timeout_ms: int = DEFAULTS["fleet_timeout_ms"]
    fleet_queue_bytes: int = DEFAULTS["fleet_queue_bytes"]
    fleet_wait_ms: int = DEFAULTS["fleet_wait_ms"]
    # Test-only (hidden flag --debug-key-bytes): truncate keys to force collisions.
    debug_key_bytes: int | None = field(default=None)

    def report(self) -> dict[str, Any]:
        """The settings as a STATS reply carries them."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["encodings"] = list(self.encodings)
        out["fleet_url"] = _redact(self.fleet_url)  # a URL may carry the password
        if self.debug_key_bytes is None:
            del out["debug_key_bytes"]
        return out


def _redact(url: str | None) -> str | None:
    from .fleet import redact_url  # imports no redis: that happens when a tier is made

    return redact_url(url)


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB}


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
