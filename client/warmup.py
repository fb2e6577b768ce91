"""What gunicorn's master loads before it forks, so that no worker's first requests pay for it:
the encodings the workers will use, and the prefixes named in ``hooks(warm_prefixes=...)``.

Used by ``on_starting`` and ``post_fork`` in client/gunicorn.py. Every worker inherits what the
master loaded through fork, sharing the pages: a worker boots in milliseconds instead of loading
the BPE files itself (~0.5 s each, during which gunicorn's SIGTERM is not yet handled), and its
first request for a second encoding does not pay 0.7-1.1 s either.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .l1 import l1_key

if TYPE_CHECKING:
    from .sidecar_settings import SidecarSettings

__all__ = ["encoding_names", "load_encodings", "prefix_caches", "seed"]


def encoding_names(settings: SidecarSettings) -> list[str]:
    """The workers' encoding first, then the daemon's (``encodings``, ``$FLASHTOKEN_ENCODINGS``
    or its default), without repeats."""
    from flashtoken.daemon.settings import DEFAULTS

    names = [settings.encoding_name()]
    configured = settings.encodings
    if configured is None:
        env = os.environ.get("FLASHTOKEN_ENCODINGS")
        configured = env.split(",") if env else DEFAULTS["encodings"]
    names += [n.strip() for n in configured if n.strip()]
    return list(dict.fromkeys(names))


def load_encodings(names: Sequence[str], log: Any) -> None:
    """Load each encoding with its id and FlashToken's per-encoding tables, once.

    An encoding that fails is logged and skipped: the workers report it on first use.
    """
    from flashtoken import AutoPrefixCache, FixedPrefixTokenCache
    from flashtoken.encodings import encoding_id, get_encoding

    for name in names:
        try:
            enc = get_encoding(name)
            encoding_id(enc)
            FixedPrefixTokenCache(enc, "Warm-up: é 中文 👋 ").encode_ordinary(" ok")
            # Its per-encoding tables (token byte lengths: ~50 ms for o200k) are cached by
            # encoding, so every client a worker makes finds them.
            AutoPrefixCache(enc, max_bytes=1 << 20).encode_ordinary("Warm-up: é 中文 👋 ok")
        except Exception as exc:  # noqa: BLE001 - the workers will report it on first use
            log.warning("flashtoken: cannot load encoding %r: %s", name, exc)


def prefix_caches(encoding: str, prefixes: Sequence[str], log: Any) -> list[Any]:
    """A ``FixedPrefixTokenCache`` per warm prefix (no special tokens allowed); [] on failure."""
    from flashtoken import FixedPrefixTokenCache
    from flashtoken.encodings import get_encoding

    try:
        enc = get_encoding(encoding)
        return [FixedPrefixTokenCache(enc, p) for p in prefixes]
    except Exception as exc:  # noqa: BLE001 - the workers encode them on first use
        log.warning("flashtoken: cannot encode the warm prefixes: %s", exc)
        return []


def seed(client: Any, caches: Sequence[Any]) -> None:
    """Put the master's warm prefixes into a new client's in-process cache (its L1), exactly
    as its own first local encode of each would have."""
    core = getattr(client, "_core", None)
    if core is None or not caches or client.encoding.name != caches[0].encoding.name:
        return
    for cache in caches:
        core.l1.put(l1_key(cache.prefix, frozenset()), cache)
