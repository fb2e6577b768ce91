"""The settings of ``Client`` and ``AsyncClient``: one table, with units, ranges and help.

Each is a keyword of both constructors and an environment variable (``timeout_ms`` is
``FLASHTOKEN_TIMEOUT_MS``); an explicit keyword wins over the variable, the variable over the
default. docs/INTEGRATION.md's "Settings" table is generated from this one (a test checks it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flashtoken.auto import DEFAULT_BLOCK_BYTES
from flashtoken.backends import BACKENDS
from flashtoken.settings import MiB, Setting, resolve
from flashtoken.wire import MAX_PREFIX_BYTES

__all__ = [
    "CLIENT_DEFAULTS",
    "CLIENT_SETTINGS",
    "SHARE_MIN_BYTES",
    "check_keywords",
    "client_settings",
]

_HOUR_MS = 3_600_000

CLIENT_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "address",
        None,
        "address",
        "the daemon's address (also the daemon's `--bind`)",
        default_text="ipc://$XDG_RUNTIME_DIR/flashtoken/daemon.sock, else"
        " ipc://$TMPDIR/flashtoken-$UID/daemon.sock",
    ),
    Setting("encoding", "cl100k_base", "text", "the encoding's name (or a tiktoken.Encoding)"),
    Setting(
        "namespace",
        b"",
        "salt",
        "a salt for the daemon's keys: clients with different namespaces share nothing",
    ),
    # Not less than 20 ms by default: with more busy workers than cores, a healthy daemon's
    # replies take 5-15 ms to be scheduled; at 5 ms the breaker stayed open under such load and
    # the daemon was never filled (8 workers, 2 cores).
    Setting(
        "timeout_ms",
        20,
        "ms",
        "how long one round trip to the daemon may take before the call encodes locally",
        above=0,
        high=_HOUR_MS,
    ),
    Setting(
        "l1_bytes",
        64 * MiB,
        "size",
        "approximate memory of the in-process cache of declared prefixes",
        low=0,
    ),
    # Up to ~27 prompts of 32 KiB: measured, ~0.35 ms and ~0.25 MiB of the worker's memory
    # each (the text and its ids' list), held whether the worker is asked for them or not.
    Setting(
        "preload_bytes",
        2 * MiB,
        "size",
        "map bytes of the host's most recently used prefixes taken into the L1 when the client"
        " starts (ipc:// only; 0: none)",
        low=0,
    ),
    Setting(
        "breaker_failures",
        3,
        "count",
        "consecutive failures that open the circuit breaker",
        low=1,
        high=1_000_000,
    ),
    Setting(
        "breaker_cooldown_ms",
        250,
        "ms",
        "the breaker's first open period; doubles per failed probe",
        low=0,
        high=_HOUR_MS,
    ),
    Setting(
        "breaker_max_cooldown_ms",
        5_000,
        "ms",
        "the breaker's longest open period (a restarted daemon is seen within it)",
        low=0,
        high=_HOUR_MS,
    ),
    Setting(
        "max_prefix_bytes",
        MAX_PREFIX_BYTES,
        "size",
        "longer prefixes (or texts) are encoded locally, never sent",
        low=0,
        high=MAX_PREFIX_BYTES,
    ),
    Setting(
        "auto_l1_bytes",
        64 * MiB,
        "size",
        "memory of the in-process AutoPrefixCache (texts with no prefix)",
        low=0,
    ),
    Setting(
        "auto_block_bytes",
        DEFAULT_BLOCK_BYTES,
        "size",
        "block size of automatic reuse, also of the daemon's chains",
        low=16,
        high=MAX_PREFIX_BYTES,
    ),
    # On a busy host a round trip costs about as much as encoding 4 KiB, and the chain up to
    # the previous request usually arrives by publication.
    Setting(
        "auto_local_bytes",
        4096,
        "size",
        "a text with at most this much after the in-process chain is encoded here and the"
        " daemon only told (no reply awaited)",
        low=0,
    ),
    Setting(
        "follow",
        True,
        "flag",
        "take the chain blocks the daemon publishes into the in-process cache (a thread)",
    ),
    Setting("fill", True, "flag", "ask the daemon to fill its store on a miss"),
    # nginx's proxy_cache_min_uses: a prefix that changes every request is never cached, so the
    # first request for one is encoded whole (flashtoken/admission.py).
    Setting(
        "min_uses",
        2,
        "count",
        "requests for a declared prefix (on this host) before it is cached: 2 encodes the first"
        " whole, as tiktoken does; 1 caches from the first",
        low=1,
        high=2,
    ),
    Setting(
        "backend",
        "tiktoken",
        "choice",
        "what encodes the text not found cached (docs/BACKENDS.md): tiktoken, or a fast exact"
        " tokenizer once it passed its gate against tiktoken",
        choices=BACKENDS,
    ),
    Setting(
        "share_min_bytes",
        None,
        "size",
        "declared prefixes of fewer UTF-8 bytes are encoded here whole, never looked up on the"
        " host: below it the backend's whole encode costs less than a hit",
        low=0,
        high=MAX_PREFIX_BYTES,
        default_text="per backend: toktok 3072, gigatoken 6144, tiktoken 0",
    ),
)

# share_min_bytes when unset, per backend in use: declared prefixes of fewer UTF-8 bytes are
# never looked up in the host's store (neither the map nor the daemon), because the backend
# encodes prefix + suffix whole in less time than a hit costs (the hash, the lookup and its
# confirmation, the token list, the split); the client's own L1 still caches one seen twice.
# Measured here (cl100k, a 38-character suffix, a client with l1_bytes=0, medians of 300 calls):
# a map hit costs 15-20 us up to 1 KiB, 30 us at 4 KiB, 45 us at 8 KiB; the whole encode,
# toktok 18 us for 2 KiB and 35 us for 4 KiB, gigatoken 27 us for 4 KiB and 47 us for 8 KiB,
# tiktoken 25 us for 256 bytes. tiktoken: 0, since it would gain a few us below ~180 bytes
# only. A backend not named here: 0 (always shared).
SHARE_MIN_BYTES: dict[str, int] = {"tiktoken": 0, "toktok": 3072, "gigatoken": 6144}

# What ClientCore takes (address and encoding belong to Client / AsyncClient).
CLIENT_DEFAULTS: dict[str, Any] = {
    s.name: s.default for s in CLIENT_SETTINGS if s.name not in ("address", "encoding")
}


KEYWORDS = frozenset(s.name for s in CLIENT_SETTINGS)


def check_keywords(owner: str, names: Iterable[str]) -> None:
    """Raise the TypeError of ``client_settings`` if one of these keyword names is no setting:
    ``Client() got unexpected keyword arguments: 'timout_ms' (did you mean 'timeout_ms'?); ...``."""
    unknown = set(names) - KEYWORDS
    if unknown:
        resolve(CLIENT_SETTINGS, dict.fromkeys(unknown), owner=owner)


def client_settings(owner: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """All of a client's settings from its keywords, ``FLASHTOKEN_*`` and the defaults, checked.

    Raises TypeError for an unknown keyword or a value of the wrong type, ValueError for one out
    of range (also from an environment variable), each naming the setting and a valid value.
    """
    given = dict(given)
    encoding = given.get("encoding")
    if encoding is not None and not isinstance(encoding, str):
        given.pop("encoding")  # a tiktoken.Encoding: resolve_encoding checks it
    out = resolve(CLIENT_SETTINGS, given, owner=owner)
    if encoding is not None and not isinstance(encoding, str):
        out["encoding"] = encoding
    if out["breaker_max_cooldown_ms"] < out["breaker_cooldown_ms"]:
        raise ValueError(
            f"breaker_max_cooldown_ms ({out['breaker_max_cooldown_ms']}) must be at least"
            f" breaker_cooldown_ms ({out['breaker_cooldown_ms']}); raise the first or lower"
            " the second"
        )
    return out
