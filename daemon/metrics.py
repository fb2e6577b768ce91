"""The daemon's STATS reply in the Prometheus text exposition format (version 0.0.4).

Used by ``flashtoken-daemon stats --format prometheus`` and by the opt-in ``/metrics`` endpoint
(``--metrics-port``), so that both print the same names. A counter ``get_hits`` becomes
``flashtoken_get_hits_total``; a gauge (``curr_items``, ``bytes``, ...) keeps its name with the
``flashtoken_`` prefix; the versions and the pid are labels of ``flashtoken_info``. Stats that
are not numbers, and names this module does not know the type of, are written as gauges:
a new counter in server.py shows up without a change here (as an untyped gauge).

Written by hand rather than through prometheus-client: the format is a few lines of text, and
the CLI must print it without the optional dependency.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["GAUGES", "prometheus_text"]

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
    }
)
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
            f"# HELP {metric} flashtoken-daemon stat {name}.",
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
