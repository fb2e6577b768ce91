"""flashtoken-daemon: the shared sidecar that holds prefix tokens for every worker on a host.

Run it with ``flashtoken-daemon`` (or ``python -m flashtoken.daemon``); read its counters with
``flashtoken-daemon stats``. The wire format is ``flashtoken.wire`` (docs/PROTOCOL.md);
workers talk to it through ``flashtoken.client.Client``.

The server needs the ``[daemon]`` extra (pyzmq, msgpack); its names are imported on first use,
so that ``flashtoken-daemon --help`` and the settings work without it and the server's import
says which extra is missing.
"""

from __future__ import annotations

from typing import Any

from .settings import DEFAULTS, SETTINGS, Config, parse_size

__all__ = [
    "DEFAULTS",
    "SETTINGS",
    "Config",
    "Server",
    "StartupError",
    "Store",
    "parse_size",
]

_LAZY = {"Server": ".server", "StartupError": ".server", "Store": ".store"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    try:
        value = getattr(importlib.import_module(module, __name__), name)
    except ModuleNotFoundError as exc:
        if exc.name not in ("zmq", "msgpack", "xxhash"):
            raise
        raise ModuleNotFoundError(
            f"flashtoken.daemon.{name} needs {exc.name}: pip install 'flashtoken[daemon]'",
            name=exc.name,
        ) from exc
    globals()[name] = value
    return value
