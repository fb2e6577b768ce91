"""The workers' counters for Prometheus: every client's ``stats()`` copied into prometheus-client
counters, which gunicorn's (or uvicorn's) worker processes add up in its multiprocess mode.

Under gunicorn, one keyword in ``gunicorn.conf.py`` and one route in the application::

    on_starting, when_ready, post_fork, worker_exit, on_exit = hooks(prometheus=True)

    from flashtoken.client.prometheus import metrics_response
    body, content_type = metrics_response()          # GET /metrics, whichever worker answers

Elsewhere (one process, or ``uvicorn --workers N`` with ``PROMETHEUS_MULTIPROC_DIR`` set by
you), ``track(client)`` once per client. Needs ``pip install prometheus-client`` (the
``[metrics]`` extra).

Each counter of ``Client.stats()`` becomes ``flashtoken_client_<name>_total{encoding="..."}``
(``flashtoken_client_l1_hits_total``, ``..._misses_total``, and the tokens returned,
``..._cached_tokens_total`` from a cache and ``..._uncached_tokens_total`` encoded by the
worker, as serving stacks report a prompt's cached tokens), with its HELP text: the sum
over this host's worker processes, dead ones included, as counters should. The sizes of the
in-process caches (``l1_items``, ``l1_bytes``, ...) are not exported: a gauge of a worker that
gunicorn killed would linger in multiprocess mode unless every deployment added a
``child_exit`` hook; the daemon's own ``/metrics`` (``--metrics-port``) has the host's store.

Why copy rather than count at the source: the clients' counters are plain ints on the request
path (a dict increment, no lock), and prometheus-client's multiprocess values take a lock and
write to a memory map on every ``inc``. A thread per process copies the increase of each
counter every ``INTERVAL_S`` (and the answering worker copies its own before a scrape), so a
scrape sees each other worker at most a second late. Rejected: a custom collector reading
``stats()`` at scrape time, which in multiprocess mode would see only the worker that answers.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import weakref
from typing import Any

__all__ = [
    "CLIENT_GAUGES",
    "CLIENT_HELP",
    "INTERVAL_S",
    "MULTIPROC_ENV",
    "flush",
    "metrics_response",
    "multiprocess_dir",
    "track",
]

log = logging.getLogger("flashtoken.client")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
INTERVAL_S = 1.0
# Stats of Client.stats() that are levels, not counts of events: not exported (see above).
CLIENT_GAUGES = frozenset(
    {"l1_items", "l1_bytes", "l1_limit", "auto_l1_items", "auto_l1_bytes", "breaker", "address"}
)


# The HELP text of each exported counter; one not listed here (a counter added since) gets a
# generic one, so a new counter is exported before it is described.
CLIENT_HELP = {
    "cached_tokens": "Tokens returned that came from a cache (L1, host map, daemon, fleet).",
    "uncached_tokens": "Tokens returned that the worker encoded itself for the call.",
    "l1_hits": "Calls answered from the worker's in-process cache (declared prefixes, chains).",
    "l2_hits": "Declared prefixes taken from the host's store (map or daemon), not encoded.",
    "map_hits": "Of l2_hits, those read from the host's map with no round trip.",
    "misses": "Declared prefixes the daemon did not hold when asked (encoded locally).",
    "fallbacks": "Calls encoded locally without a daemon answer (timeout, error, breaker).",
    "timeouts": "Round trips to the daemon that took longer than timeout_ms.",
    "errors": "Daemon replies or sockets that failed (garbage, error replies, socket errors).",
    "rejected_hits": "Daemon answers whose tokens did not spell the text (discarded).",
    "late_replies": "Replies that came after their request gave up (discarded).",
    "first_sights": "Declared prefixes encoded whole on their first sight, not cached.",
    "short_prefixes": "Declared prefixes below share_min_bytes: encoded here, never looked up.",
    "preloaded": "The host's hot prefixes taken into the L1 when the client started.",
    "untrusted": "Sockets not used: not a private socket of this user (not the daemon).",
    "auto_calls": "Calls with no declared prefix (automatic reuse).",
    "auto_hit_bytes": "Bytes of texts with no prefix found in the daemon's chains.",
    "auto_told": "Texts told to the daemon (no reply awaited) so that it caches their blocks.",
    "auto_l1_adopted": "Chain blocks other workers encoded, taken into this worker's cache.",
    "auto_l1_refused": "Chain blocks not taken into the in-process cache (checks or room).",
    "published_received": "Chain blocks received from the daemon's publications.",
    "published_refused": "Publications of chain blocks that did not parse (refused).",
}

_MISSING = (
    "flashtoken.client.prometheus needs prometheus-client:"
    " pip install 'flashtoken[metrics]' (or pip install prometheus-client)"
)


def _require() -> Any:
    try:
        import prometheus_client
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(_MISSING, name="prometheus_client") from exc
    return prometheus_client


def multiprocess_dir(base: str | None = None) -> tuple[str, bool]:
    """The directory of prometheus-client's multiprocess mode, set in ``$PROMETHEUS_MULTIPROC_DIR``
    for this process and its children; returns ``(path, made_here)``.

    A directory already named there is kept as it is (prometheus-client's rule: empty it
    before each start of the server). Otherwise a fresh 0700 one is made under ``base`` (the
    temp dir by default). Must run before ``prometheus_client`` is first imported in the
    process that forks the workers: it picks its storage at import. Raises
    ModuleNotFoundError, saying what to install, without prometheus-client.
    """
    import importlib.util
    import sys

    if importlib.util.find_spec("prometheus_client") is None:
        raise ModuleNotFoundError(_MISSING, name="prometheus_client")
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        return path, False
    if "prometheus_client" in sys.modules and not _is_multiprocess():
        log.warning(
            "flashtoken: prometheus_client was imported before %s was set; the workers'"
            " counters will not be shared (import it after hooks(prometheus=True))",
            MULTIPROC_ENV,
        )
    path = tempfile.mkdtemp(prefix="flashtoken-prometheus-", dir=base)
    os.environ[MULTIPROC_ENV] = path
    return path, True


def _is_multiprocess() -> bool:
    from prometheus_client import values

    return bool(getattr(values.ValueClass, "_multiprocess", False))


class _Exporter:
    """This process's copy of its clients' counters into prometheus-client (one per process)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.interval_s = 0.0  # set by the first add() that asks for a thread
        self.lock = threading.Lock()
        self.clients: weakref.WeakSet[Any] = weakref.WeakSet()
        self.seen: weakref.WeakKeyDictionary[Any, dict[str, int]] = weakref.WeakKeyDictionary()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, client: Any, interval_s: float) -> None:
        with self.lock:
            self.clients.add(client)
            if self.thread is not None or interval_s <= 0:
                return
            self.interval_s = interval_s
            self.thread = threading.Thread(
                target=self._run, name="flashtoken-prometheus", daemon=True
            )
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.copy()
            except Exception:  # noqa: BLE001 - metrics must never take the worker down
                log.exception("flashtoken: copying the client counters to prometheus failed")

    def copy(self) -> None:
        """Add each counter's increase since the last copy (a client's whole value the first
        time, and after a counter went down, which only a new client could do)."""
        with self.lock:
            for client in list(self.clients):
                stats = client.stats()
                seen = self.seen.setdefault(client, {})
                encoding = getattr(getattr(client, "encoding", None), "name", "")
                for name, value in stats.items():
                    if name in CLIENT_GAUGES or isinstance(value, bool):
                        continue
                    if not isinstance(value, int):
                        continue
                    before = seen.get(name, 0)
                    increase = value - before if value >= before else value
                    seen[name] = value
                    if increase:
                        _counter(name).labels(encoding=encoding).inc(increase)


_COUNTERS: dict[str, Any] = {}
_exporter: _Exporter | None = None
_EXPORTER_LOCK = threading.Lock()


def _counter(name: str) -> Any:
    found = _COUNTERS.get(name)
    if found is None:
        prometheus_client = _require()
        # prometheus-client appends "_total" to a counter's samples.
        text = CLIENT_HELP.get(name, f"FlashToken Client.stats() counter {name}.")
        found = _COUNTERS[name] = prometheus_client.Counter(
            f"flashtoken_client_{name}",
            f"{text[:-1]}, summed over this host's workers.",
            ["encoding"],
        )
    return found


def _this_process() -> _Exporter:
    """The exporter of this process; after a fork, a new one (the parent's thread is not here)."""
    global _exporter
    with _EXPORTER_LOCK:
        if _exporter is None or _exporter.pid != os.getpid():
            _exporter = _Exporter()
        return _exporter


def track(client: Any, *, interval_s: float = INTERVAL_S) -> Any:
    """Export ``client``'s counters (a ``Client`` or an ``AsyncClient``) from now on; returns it.

    Starts this process's copying thread, every ``interval_s``, unless one runs
    (``interval_s=0``: no thread for this client; copies happen on ``flush()`` and
    ``metrics_response()``). A client is held weakly: one that is dropped
    stops being copied, and what it counted stays in the totals. Raises ModuleNotFoundError,
    saying what to install, without prometheus-client.
    """
    _require()
    _this_process().add(client, interval_s)
    return client


def flush() -> None:
    """Copy this process's clients' counters now (a worker before it exits, or before a scrape)."""
    exporter = _exporter
    if exporter is not None and exporter.pid == os.getpid():
        exporter.copy()


def metrics_response() -> tuple[bytes, str]:
    """``(body, content_type)`` for a ``GET /metrics``: every metric of this process's registry,
    or, in multiprocess mode, of every worker that shares ``$PROMETHEUS_MULTIPROC_DIR`` (the
    application's own metrics included)."""
    prometheus_client = _require()
    flush()
    if os.environ.get(MULTIPROC_ENV) and _is_multiprocess():
        from prometheus_client import multiprocess

        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = prometheus_client.REGISTRY
    return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST
