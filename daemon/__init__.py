"""flashtoken-daemon: the shared sidecar that holds prefix tokens for every worker on a host.

Run it with ``flashtoken-daemon`` (or ``python -m flashtoken.daemon``); read its counters with
``flashtoken-daemon stats``. The wire format is ``flashtoken.protocol`` (docs/PROTOCOL.md);
workers talk to it through ``flashtoken.client.Client``.
"""

from .server import Server, StartupError
from .settings import DEFAULTS, SETTINGS, Config, parse_size
from .store import Entry, Store

__all__ = [
    "DEFAULTS",
    "SETTINGS",
    "Config",
    "Entry",
    "Server",
    "StartupError",
    "Store",
    "parse_size",
]
