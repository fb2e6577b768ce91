"""gunicorn config for the WSGI example: 4 sync workers, FlashToken's daemon as their sidecar.

    gunicorn -c examples/gunicorn/gunicorn.conf.py      # from anywhere; flags override these

The two FlashToken lines are the last ones. Environment: BIND (127.0.0.1:8000),
WEB_CONCURRENCY (4 workers), FLASHTOKEN_MAX_BYTES (the daemon's store, 256MiB). With
prometheus-client installed, GET /metrics has every worker's client counters.
"""

import importlib.util
import os
from pathlib import Path

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
chdir = str(Path(__file__).resolve().parent)
wsgi_app = "app:app"
timeout = 30
graceful_timeout = 10

from flashtoken.client.gunicorn import hooks  # noqa: E402

on_starting, when_ready, post_fork, worker_exit, on_exit = hooks(
    max_bytes=os.environ.get("FLASHTOKEN_MAX_BYTES", "256MiB"),
    # The workers' counters at GET /metrics, when prometheus-client is installed.
    prometheus=importlib.util.find_spec("prometheus_client") is not None,
)
