"""The daemon's STATS reply in the Prometheus text exposition format (version 0.0.4), and the
opt-in ``/metrics`` endpoint that serves it.

Used by ``flashtoken-daemon stats --format prometheus`` and by ``/metrics`` (``serve
--metrics-port N``), so that both print the same names. A counter ``get_hits`` becomes
``flashtoken_get_hits_total``; a gauge (``curr_items``, ``bytes``, ...) keeps its name with the
``flashtoken_`` prefix; the versions and the pid are labels of ``flashtoken_info``. Stats that
are not numbers, and names this module does not know the type of, are written as gauges:
a new counter in server.py shows up without a change here (as an untyped gauge).

Written by hand rather than through prometheus-client: the format is a few lines of text, the
CLI must print it without an optional dependency, and the endpoint is the standard library's
HTTP server.
"""

from __future__ import annotations

import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["GAUGES", "HELP", "MetricsServer", "prometheus_text"]

log = logging.getLogger("flashtoken.daemon")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Values that go up and down; every other numeric stat counts events since the start.
GAUGES = frozenset(
    {
        "uptime",
        "time",
        "curr_items",
        "blocks",
        "bytes",
        "limit_maxbytes",
        "fills_pending",
        "curr_connections",
        "rss_bytes",
        "rss_limit_bytes",
        "open_fds",
        "max_fds",
        "rss_max_bytes",
        "limit_rss_bytes",
        "limit_connections",
        "map_curr_items",
        "map_bytes",
        "map_limit_maxbytes",
        "fills_running",
        "fill_bytes_pending",
        "parked_bytes",
        "reply_bytes_queued",
        "fleet_queue_bytes",
    }
)
# HELP texts beyond the generic "flashtoken-daemon stat NAME.".
HELP = {
    "tokens_served": "Cached tokens served to workers: socket_tokens_served + map_tokens_served.",
    "socket_tokens_served": "Cached tokens sent in the daemon's replies (declared and chains).",
    "map_tokens_served": "Cached tokens workers read from the host's map (counted at TOUCH).",
}
_INFO = ("version", "tiktoken_version", "pid")
_SETTINGS_AS_GAUGES = ("max_bytes", "fill_threads", "max_prefix_bytes", "max_pending_fills", "hwm")


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> str | None:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return None


def prometheus_text(reply: dict[str, Any]) -> str:
    """The exposition text for one STATS reply (``{"stats": {...}, "settings": {...}}``).

    >>> print(prometheus_text({"stats": {"get_hits": 3, "bytes": 10, "version": "0.1.0"}}), end="")
    # HELP flashtoken_info flashtoken-daemon's versions and pid.
    # TYPE flashtoken_info gauge
    flashtoken_info{version="0.1.0"} 1
    # HELP flashtoken_bytes flashtoken-daemon stat bytes.
    # TYPE flashtoken_bytes gauge
    flashtoken_bytes 10
    # HELP flashtoken_get_hits_total flashtoken-daemon stat get_hits.
    # TYPE flashtoken_get_hits_total counter
    flashtoken_get_hits_total 3
    """
    stats: dict[str, Any] = reply.get("stats", {})
    settings: dict[str, Any] = reply.get("settings", {})
    lines: list[str] = []
    labels = ",".join(f'{k}="{_label(stats[k])}"' for k in _INFO if k in stats)
    lines += [
        "# HELP flashtoken_info flashtoken-daemon's versions and pid.",
        "# TYPE flashtoken_info gauge",
        f"flashtoken_info{{{labels}}} 1",
    ]
    for name in sorted(stats):
        if name in _INFO:
            continue
        value = _number(stats[name])
        if value is None:
            continue
        counter = name not in GAUGES
        metric = f"flashtoken_{name}" + ("_total" if counter else "")
        lines += [
            f"# HELP {metric} {HELP.get(name, f'flashtoken-daemon stat {name}.')}",
            f"# TYPE {metric} {'counter' if counter else 'gauge'}",
            f"{metric} {value}",
        ]
    for name in _SETTINGS_AS_GAUGES:
        value = _number(settings.get(name))
        if value is not None:
            metric = f"flashtoken_setting_{name}"
            lines += [
                f"# HELP {metric} flashtoken-daemon setting {name}.",
                f"# TYPE {metric} gauge",
                f"{metric} {value}",
            ]
    return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on 127.0.0.1:``port``: the daemon's stats in the exposition format.

    Each scrape asks the daemon for its STATS on its own socket, as ``flashtoken-daemon stats``
    does, rather than reading the server's counters from this thread: the loop owns them, and
    the request is what any client may send (bounded by ``timeout_ms``; a daemon that does not
    answer gives a 503). Only the loopback interface: the stats name prefixes' sizes and
    counts, which are not for the network; a remote Prometheus scrapes through a local agent.
    """

    HOST = "127.0.0.1"

    def __init__(self, address: str, port: int, *, timeout_ms: int = 1000) -> None:
        self.address = address
        self.timeout_ms = timeout_ms
        self._http = ThreadingHTTPServer((self.HOST, port), self._handler())
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._thread: threading.Thread | None = None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                if self.path.split("?", 1)[0] != "/metrics":
                    self._send(404, "not found: the metrics are at /metrics\n")
                    return
                from flashtoken.errors import DaemonError
                from flashtoken.wire.admin import request_stats

                try:
                    reply = request_stats(owner.address, timeout_ms=owner.timeout_ms)
                except DaemonError as exc:
                    self._send(503, f"flashtoken-daemon did not answer: {exc}\n")
                    return
                self._send(200, prometheus_text(reply))

            def _send(self, status: int, text: str) -> None:
                body = text.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("metrics: " + format, *args)

        return Handler

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="flashtoken-metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics at http://%s:%d/metrics", self.HOST, self.port)
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join(5)
        self._http.server_close()
