"""What the gunicorn hooks take (``hooks(...)``'s keywords), in a module of its own.

client/gunicorn.py uses it, and so do the two parts it drives, client/supervisor.py (how the
daemon is started) and client/warmup.py (what the master loads before fork), which therefore do
not import the hooks module.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["SidecarSettings"]


@dataclass(frozen=True)
class SidecarSettings:
    """What ``hooks(...)`` takes; every field has the default shown.

    ``address``: the daemon's ``ipc://`` address; None = a fresh private directory per server.
    ``spawn``: run the daemon from the master (False: it runs elsewhere, e.g. under systemd).
    ``encoding``: what ``get_client()`` encodes with when no encoding is named; None =
    ``$FLASHTOKEN_ENCODING``, else ``"cl100k_base"`` (as for ``Client()``).
    ``client``: ``"auto"`` (asyncio workers get an ``AsyncClient``), ``"sync"`` or ``"async"``:
    which client ``post_fork`` makes ahead of the first request.
    ``client_options``: keyword arguments for every ``Client`` / ``AsyncClient`` (``timeout_ms``,
    ``l1_bytes``, ...). ``max_bytes`` (``"512MiB"`` or an int), ``encodings`` and
    ``daemon_args`` (more CLI flags) go to ``flashtoken-daemon serve``; None = its defaults.
    ``warm_prefixes``: prompts (of ``encoding``, no special tokens allowed) that the master
    encodes once at start; every worker's client begins with them in its in-process cache, so
    no worker's first requests pay for them (a system prompt, the templates in use).
    ``prometheus``: export every worker's client counters through prometheus-client's
    multiprocess mode (client/prometheus.py); ``$PROMETHEUS_MULTIPROC_DIR`` is used, or set to
    a fresh directory that ``on_exit`` removes. The application serves them with
    ``flashtoken.client.prometheus.metrics_response()``.
    ``daemon_log``: a file for the daemon's log; None = the master's stderr.
    ``start_timeout_s``: how long ``when_ready`` waits for the daemon's socket (workers start
    anyway afterwards: they encode locally until it answers). ``stop_timeout_s``: SIGTERM to
    SIGKILL. ``restart_delay_s`` / ``max_restart_delay_s``: the supervisor's back-off.
    """

    address: str | None = None
    spawn: bool = True
    encoding: str | None = None
    client: str = "auto"
    client_options: dict = field(default_factory=dict)
    max_bytes: str | int | None = None
    encodings: Sequence[str] | None = None
    daemon_args: Sequence[str] = ()
    warm_prefixes: Sequence[str] = ()
    prometheus: bool = False
    daemon_log: str | None = None
    start_timeout_s: float = 10.0
    stop_timeout_s: float = 5.0
    restart_delay_s: float = 0.1
    max_restart_delay_s: float = 10.0

    def encoding_name(self) -> str:
        return self.encoding or os.environ.get("FLASHTOKEN_ENCODING") or "cl100k_base"

    def daemon_command(self, bind: str) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "flashtoken.daemon",
            "serve",
            "--bind",
            bind,
            "--exit-with-parent",
        ]
        if self.max_bytes is not None:
            cmd += ["--max-bytes", str(self.max_bytes)]
        if self.encodings is not None:
            cmd += ["--encodings", ",".join(self.encodings)]
        return cmd + list(self.daemon_args)
