"""The daemon's settings: one table of defaults with units, ranges and help.

The same names are the CLI flags (``max_bytes`` is ``--max-bytes``), the environment variables
(``FLASHTOKEN_MAX_BYTES``; ``bind`` is ``FLASHTOKEN_ADDRESS``, the clients' variable), the keys
of the ``settings`` map in a STATS reply, and the names in docs/PROTOCOL.md; the table in
docs/INTEGRATION.md is generated from this one. The ``Setting`` machinery is flashtoken/settings.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from flashtoken.settings import GiB, KiB, MiB, Setting, format_size, parse_size, resolve

__all__ = [
    "DEFAULTS",
    "SETTINGS",
    "Config",
    "GiB",
    "KiB",
    "MiB",
    "Setting",
    "format_size",
    "parse_size",
]

# == flashtoken.wire.MAX_PREFIX_BYTES (tests/test_cli.py checks): not imported from there,
# because the protocol needs msgpack and `flashtoken-daemon --help` must work without it.
MAX_PREFIX_BYTES = 4 * MiB

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "bind",
        None,
        "address",
        "address to bind (the clients' `address`); on tcp:// only clients holding the keys of"
        " the tcp:// key file get in (CURVE, docs/PROTOCOL.md)",
        env_name="FLASHTOKEN_ADDRESS",
        default_text="ipc://$XDG_RUNTIME_DIR/flashtoken/daemon.sock, else"
        " ipc://$TMPDIR/flashtoken-$UID/daemon.sock; tcp://127.0.0.1:7417 where ipc:// or fcntl"
        " is missing",
    ),
    Setting(
        "max_bytes",
        512 * MiB,
        "size",
        "budget of the store: token bytes + prefix bytes + a fixed overhead per entry;"
        " never exceeded (LRU eviction)",
        low=0,
        high=1024 * GiB,
    ),
    Setting(
        "encodings",
        ("cl100k_base", "o200k_base"),
        "names",
        "encodings to load at start (others load on their first fill); '' for none",
    ),
    Setting("fill_threads", 2, "count", "threads encoding prefixes for fills", low=1, high=256),
    Setting(
        "max_prefix_bytes",
        MAX_PREFIX_BYTES,
        "size",
        "largest prefix a GET may carry",
        low=1,
        high=MAX_PREFIX_BYTES,
    ),
    Setting(
        "max_pending_fills",
        64,
        "count",
        "fills queued or running at once; a miss beyond that is answered without a fill",
        low=1,
        high=1_000_000,
    ),
    Setting(
        "hwm", 1000, "count", "ZeroMQ send and receive high-water marks", low=1, high=1_000_000
    ),
    Setting(
        "log_level",
        "INFO",
        "choice",
        "logging level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
    ),
    Setting(
        "log_format",
        "text",
        "choice",
        "text: one line per record; json: one JSON object per line (time, level, pid, message)",
        choices=("text", "json"),
    ),
    Setting(
        "metrics_port",
        0,
        "count",
        "serve GET /metrics (Prometheus) on 127.0.0.1 at this port; 0: no endpoint",
        low=0,
        high=65535,
    ),
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
        "text",
        "Valkey / Redis shared by the fleet's daemons: redis://[user:password@]host:port/db,"
        " rediss:// (TLS) or unix:///path.sock; needs fleet_secret_file",
    ),
    Setting(
        "fleet_secret_file",
        None,
        "text",
        "file of fleet secrets, one a line (>= 16 bytes each): the first signs values, every"
        " one verifies them (rotation)",
    ),
    Setting("fleet_key_prefix", "flashtoken:", "text", "prefix of every fleet key (for ACLs)"),
    Setting(
        "fleet_timeout_ms",
        50,
        "ms",
        "timeout of each fleet call (connect, lookup, write); a fill waits at most this long",
        above=0,
        high=60_000,
    ),
    Setting(
        "fleet_wait_ms",
        5,
        "ms",
        "longest a GET miss waits for its fill's fleet lookup (never longer than encoding the"
        " prefix would take, about); 0: answer misses at once",
        low=0,
        high=10_000,
    ),
    Setting(
        "fleet_queue_bytes",
        64 * MiB,
        "size",
        "bytes of fleet writes queued at most; a write beyond that is dropped and counted",
        low=0,
        high=64 * GiB,
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
    log_format: str = DEFAULTS["log_format"]
    metrics_port: int = DEFAULTS["metrics_port"]
    fleet_url: str | None = DEFAULTS["fleet_url"]
    fleet_secret_file: str | None = DEFAULTS["fleet_secret_file"]
    fleet_key_prefix: str = DEFAULTS["fleet_key_prefix"]
    fleet_timeout_ms: int = DEFAULTS["fleet_timeout_ms"]
    fleet_queue_bytes: int = DEFAULTS["fleet_queue_bytes"]
    fleet_wait_ms: int = DEFAULTS["fleet_wait_ms"]
    # Test-only (hidden flag --debug-key-bytes): truncate keys to force collisions.
    debug_key_bytes: int | None = field(default=None)

    def __post_init__(self) -> None:
        # The table's checks, so that a Config made in code fails here, with a message that
        # says the fix, and not inside the server's loop (or as a traceback at bind).
        table = {s.name: s for s in SETTINGS}
        for f in fields(self):
            if f.name in table:
                object.__setattr__(self, f.name, table[f.name].check(getattr(self, f.name)))
        if self.bind is None:
            raise TypeError("Config needs bind=ADDRESS (flashtoken.wire.default_address())")

    @classmethod
    def from_settings(cls, given: dict[str, Any], **extra: Any) -> Config:
        """A Config from keywords (None: not given), else ``FLASHTOKEN_*``, else the defaults;
        ``bind`` None becomes the default address. Raises TypeError / ValueError (naming an
        environment variable when it is the culprit) and PermissionError for an unsafe default
        directory."""
        values = resolve(SETTINGS, given, owner="flashtoken-daemon")
        if values["bind"] is None:
            from flashtoken.wire import default_address

            values["bind"] = default_address()
        return cls(**values, **extra)

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
