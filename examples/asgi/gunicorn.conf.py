"""gunicorn config for the ASGI example: 4 uvicorn workers, FlashToken's daemon as their sidecar.

    gunicorn -c examples/asgi/gunicorn.conf.py

The worker class: the `uvicorn-worker` package's UvicornWorker when installed, else the one
uvicorn itself still ships (deprecated there, but working). Recent gunicorn releases also have a
native worker_class = "asgi". Every worker gets an AsyncClient from the hooks.
"""

import importlib.util
import os
import warnings
from pathlib import Path

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
chdir = str(Path(__file__).resolve().parent)
wsgi_app = "app:app"
timeout = 30
graceful_timeout = 10
if importlib.util.find_spec("uvicorn_worker") is not None:
    worker_class = "uvicorn_worker.UvicornWorker"
else:
    warnings.filterwarnings("ignore", message=".*uvicorn.workers.*", category=DeprecationWarning)
    worker_class = "uvicorn.workers.UvicornWorker"

from flashtoken.client.gunicorn import hooks  # noqa: E402

on_starting, when_ready, post_fork, worker_exit, on_exit = hooks(
    max_bytes=os.environ.get("FLASHTOKEN_MAX_BYTES", "256MiB"),
    # The workers' counters at GET /metrics, when prometheus-client is installed.
    prometheus=importlib.util.find_spec("prometheus_client") is not None,
)
