"""Prometheus: the workers' client counters (client/prometheus.py) and the daemon's stats typed
as counters or gauges (daemon/metrics.py).

The multiprocess mode under gunicorn is tested end to end in tests/test_gunicorn_e2e.py; here
one process, a real daemon, and the message without prometheus-client.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from flashtoken.client import Client

from flashtoken import get_encoding
from tests.daemon_fixtures import DaemonProcess

prometheus_client = pytest.importorskip("prometheus_client")  # the [dev] extra installs it

from flashtoken.client import prometheus  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

PREFIX = "You are a metered assistant. Règles: précis. 规则 " * 20


def _samples(name: str) -> dict[tuple, float]:
    body, content_type = prometheus.metrics_response()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_a_clients_counters_are_exported_and_only_grow(daemon: DaemonProcess) -> None:
    key = (("encoding", "o200k_base"),)
    before = _samples("flashtoken_client_l1_hits_total").get(key, 0.0)
    with Client(daemon.address, encoding="o200k_base", min_uses=1) as client:
        assert prometheus.track(client, interval_s=0) is client
        enc = get_encoding("o200k_base")
        for i in range(5):
            assert client.encode_ordinary(f" q{i}", prefix=PREFIX) == enc.encode_ordinary(
                PREFIX + f" q{i}"
            )
        hits = client.stats()["l1_hits"]
        assert hits >= 4
        assert _samples("flashtoken_client_l1_hits_total")[key] == before + hits
        # Copying again adds only what is new.
        client.encode_ordinary(" again", prefix=PREFIX)
        assert _samples("flashtoken_client_l1_hits_total")[key] == before + hits + 1
    # A second client's counts add to the same series; levels are not exported.
    with Client(daemon.address, encoding="o200k_base", min_uses=1) as other:
        prometheus.track(other, interval_s=0)
        other.encode_ordinary(" x", prefix=PREFIX)
        other.encode_ordinary(" y", prefix=PREFIX)
        assert _samples("flashtoken_client_l1_hits_total")[key] == before + hits + 2
    body, _ = prometheus.metrics_response()
    assert b"flashtoken_client_l1_items" not in body and b"flashtoken_client_breaker" not in body


def test_without_prometheus_client_the_message_says_what_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "from flashtoken.client import prometheus\n"
        "try:\n"
        "    prometheus.metrics_response()\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'flashtoken[metrics]'" in out.stdout, out.stderr


# Levels of the daemon's STATS reply: a Prometheus counter must never go down.
DAEMON_LEVELS = {
    "curr_items",
    "bytes",
    "limit_maxbytes",
    "curr_connections",
    "limit_connections",
    "rss_bytes",
    "rss_max_bytes",
    "limit_rss_bytes",
    "map_curr_items",
    "map_bytes",
    "map_limit_maxbytes",
    "fills_pending",
    "fills_running",
    "fill_bytes_pending",
    "parked_bytes",
    "reply_bytes_queued",
}


def test_daemon_levels_are_gauges_and_the_serving_counters_are_there(
    daemon: DaemonProcess,
) -> None:
    from flashtoken.client.sync import request_stats
    from flashtoken.daemon.metrics import prometheus_text

    with Client(daemon.address, min_uses=1) as client:
        client.encode_ordinary(" warm", prefix=PREFIX)
    reply = request_stats(daemon.address, timeout_ms=5000)
    assert DAEMON_LEVELS <= set(reply["stats"]), DAEMON_LEVELS - set(reply["stats"])
    text = prometheus_text(reply)
    for name in DAEMON_LEVELS:
        assert f"# TYPE flashtoken_{name} gauge" in text, name
    for name in ("get_hits", "get_misses", "fills", "evictions", "tokens_served"):
        assert f"# TYPE flashtoken_{name}_total counter" in text, name
