"""gunicorn server hooks: the master runs ``flashtoken-daemon`` as a supervised child; every
worker gets its own client after the fork.

Two lines in ``gunicorn.conf.py``::

    from flashtoken.client.gunicorn import hooks
    on_starting, when_ready, post_fork, worker_exit, on_exit = hooks()

and in the application, per request (a dict lookup)::

    from flashtoken.client.gunicorn import get_client, get_async_client
    tokens = get_client().encode_ordinary(question, prefix=SYSTEM_PROMPT)               # WSGI
    tokens = await get_async_client().encode_ordinary(question, prefix=SYSTEM_PROMPT)   # ASGI

What each hook does:

- ``on_starting`` (master): picks the socket (``address``, or ``daemon.sock`` in a fresh 0700
  directory of its own under ``$XDG_RUNTIME_DIR`` or the temp dir) and starts
  ``python -m flashtoken.daemon serve --bind ... --exit-with-parent`` as a child process;
  then loads the workers' encodings and ``warm_prefixes`` (client/warmup.py).
- ``when_ready`` (master): waits (bounded by ``start_timeout_s``) until the daemon has bound its
  socket, then starts the supervisor thread, which restarts the daemon whenever it exits
  (backing off from 0.1 s to 10 s while it keeps dying).
- ``post_fork`` (worker): makes the worker's client: an ``AsyncClient`` for asyncio workers
  (uvicorn's ``UvicornWorker``, gunicorn's ``asgi``), a ``Client`` otherwise.
- ``worker_exit`` (worker): closes the worker's clients (``max_requests`` recycling, shutdown).
- ``on_exit`` (master): stops the supervisor, then the daemon (SIGTERM, SIGKILL after
  ``stop_timeout_s``), and removes the directory it made.

If the master dies without ``on_exit`` (SIGKILL, OOM), the daemon notices that its parent is
gone (``--exit-with-parent``) and exits within about a second. The daemon is an optimisation:
while it is down or restarting, every worker still returns tiktoken's exact tokens, encoding
locally (see docs/INTEGRATION.md).

``hooks(spawn=False, address=...)`` runs no daemon and only gives the workers their clients: for
a daemon run by systemd or by hand.

Works with and without ``--preload``: the clients are made per process, and a client made in
the master (an application that calls ``get_client()`` at import) is fork-safe anyway. gunicorn
re-executes the config file on SIGHUP; the hooks keep their state in this module, so the running
daemon is kept (changed daemon settings take effect at the next restart of gunicorn).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

from flashtoken.settings import MAX_IPC_PATH_BYTES
from flashtoken.wire import default_address, ipc_path

from . import warmup
from .sidecar_settings import SidecarSettings
from .supervisor import Supervisor, install_fork_guard

__all__ = [
    "ADDRESS_ENV",
    "Hooks",
    "SidecarSettings",
    "Supervisor",
    "address",
    "close_clients",
    "get_async_client",
    "get_client",
    "hooks",
    "on_exit",
    "on_starting",
    "post_fork",
    "when_ready",
    "worker_exit",
]

# Set by the master for its children (and read by ``get_client`` where no hooks ran, e.g. under
# ``uvicorn --workers`` with a daemon run by systemd).
ADDRESS_ENV = "FLASHTOKEN_ADDRESS"


# -- module state (the master's, inherited by every worker through fork) ------------------------


class _State:
    def __init__(self) -> None:
        self.settings = SidecarSettings()
        self.configured = False  # hooks() was called in this process tree
        self.address: str | None = None
        self.made_dir: str | None = None  # the private directory this master created
        self.supervisor: Supervisor | None = None
        self.clients: dict[tuple[str, str], Any] = {}
        self.clients_pid = os.getpid()
        self.inherited: list[Any] = []  # clients made before a fork: kept, never closed here
        self.warm: list[Any] = []  # FixedPrefixTokenCache of each warm prefix, made in the master
        self.metrics_dir: tuple[str, int] | None = None  # (PROMETHEUS_MULTIPROC_DIR made, by pid)


_state = _State()
_CLIENTS_LOCK = threading.Lock()


def address() -> str:
    """The daemon's address in this server: the configured one, the master's private socket, or
    ``$FLASHTOKEN_ADDRESS``, else the daemon's default address.

    In the master the private directory is made on the first call (``--preload`` applications
    may ask before ``on_starting`` runs); workers inherit the answer.
    """
    if _state.address is None:
        settings = _state.settings
        if settings.address is not None:
            _state.address = settings.address
        elif _state.configured and settings.spawn:
            _state.made_dir = _private_dir()
            _state.address = "ipc://" + os.path.join(_state.made_dir, "daemon.sock")
        else:
            _state.address = os.environ.get(ADDRESS_ENV) or default_address()
    return _state.address


def _private_dir() -> str:
    """A fresh 0700 directory for this server's socket (mkdtemp), short enough for sun_path."""
    bases = [os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir(), "/tmp"]
    for base in bases:
        if not base or not os.path.isdir(base) or not os.access(base, os.W_OK | os.X_OK):
            continue
        # mkdtemp's name is 8 random characters; the socket adds "/daemon.sock.lock".
        if (
            len(os.path.join(base, "flashtoken-gunicorn-xxxxxxxx", "daemon.sock").encode())
            > MAX_IPC_PATH_BYTES
        ):
            continue
        return tempfile.mkdtemp(prefix="flashtoken-gunicorn-", dir=base)
    raise RuntimeError(
        "no writable directory with a path short enough for a unix socket;"
        " pass hooks(address='ipc:///run/yourapp/flashtoken.sock')"
    )


def _clients() -> dict[tuple[str, str], Any]:
    """This process's clients; after a fork, a fresh dict (the parent's are kept, untouched)."""
    pid = os.getpid()
    if _state.clients_pid != pid:
        _state.inherited.extend(_state.clients.values())
        _state.clients = {}
        _state.clients_pid = pid
    return _state.clients


def _client(kind: str, encoding: str | None) -> Any:
    name = encoding or _state.settings.encoding_name()
    clients = _clients()
    found = clients.get((kind, name))
    if found is not None:
        return found
    with _CLIENTS_LOCK:
        found = clients.get((kind, name))
        if found is None:
            if kind == "async":
                from .aio import AsyncClient as cls
            else:
                from .sync import Client as cls  # type: ignore[assignment]
            found = clients[(kind, name)] = cls(
                address(), encoding=name, **_state.settings.client_options
            )
            if _state.settings.prometheus:
                from . import prometheus

                prometheus.track(found)
    return found


def get_client(encoding: str | None = None) -> Any:
    """This process's ``Client`` for ``encoding`` (default: the hooks' ``encoding``).

    Made on first use, once per process and encoding; cheap to call on every request. Raises
    what ``Client`` raises for an unknown encoding (ValueError).
    """
    return _client("sync", encoding)


def get_async_client(encoding: str | None = None) -> Any:
    """This process's ``AsyncClient`` for ``encoding``; like ``get_client``."""
    return _client("async", encoding)


def close_clients() -> None:
    """Close this process's clients (LINGER=0). They still answer afterwards, locally."""
    for client in list(_clients().values()):
        try:
            client.close()
        except Exception:  # noqa: BLE001 - closing at exit must never raise
            pass


def _is_async_worker(worker: Any) -> bool:
    setting = _state.settings.client
    if setting in ("sync", "async"):
        return setting == "async"
    for cls in type(worker).__mro__:
        module = cls.__module__ or ""
        if (
            module.startswith(("uvicorn", "uvicorn_worker"))
            or cls.__name__ in ("UvicornWorker", "ASGIWorker")
            or module == "gunicorn.workers.gasgi"
        ):
            return True
    return False


# -- the hooks ----------------------------------------------------------------------------------


def _reset_clients_lock() -> None:
    global _CLIENTS_LOCK
    _CLIENTS_LOCK = threading.Lock()  # a parent's thread may have held it at the fork


def on_starting(server: Any) -> None:
    """Master, before anything else: start the daemon (unless ``spawn=False``), then load the
    workers' encodings and warm prefixes while the daemon loads its own."""
    _state.configured = True
    bind = address()
    os.environ[ADDRESS_ENV] = bind
    if _state.settings.prometheus:
        from .prometheus import MULTIPROC_ENV

        server.log.info(
            "flashtoken: workers' counters for Prometheus in %s", os.environ[MULTIPROC_ENV]
        )
    if not _state.settings.spawn:
        server.log.info("flashtoken: workers use the daemon at %s (not started here)", bind)
    elif _state.supervisor is None:  # else already running (the config was re-read)
        install_fork_guard(_reset_clients_lock)
        path = ipc_path(bind)
        if path is not None and not os.path.isdir(os.path.dirname(path)):
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        supervisor = _state.supervisor = Supervisor(_state.settings, bind, server.log)
        _collect_before_gunicorn_reaps(server, supervisor)
        supervisor.spawn()
        atexit.register(_stop_at_exit)
    # After the spawn: both load encodings at once (~0.5 s each), so when_ready's wait for the
    # daemon's socket, during which gunicorn queues the first requests, is mostly over by then.
    _warm(server)


def _collect_before_gunicorn_reaps(server: Any, supervisor: Supervisor) -> None:
    """Wrap the arbiter's ``reap_workers`` (called on every SIGCHLD) so that the daemon's exit
    status is read before gunicorn's ``waitpid(-1)`` discards it. Rejected: our own SIGCHLD
    handler (gunicorn installs its own, and replacing it breaks worker reaping), and a wrapper
    process around the daemon (one more process whose status gunicorn would discard)."""
    reap = getattr(server, "reap_workers", None)
    if reap is None or getattr(reap, "flashtoken_collects", False):
        return

    def reap_workers() -> Any:
        current = _state.supervisor
        if current is not None:
            current.collect()
        return reap()

    reap_workers.flashtoken_collects = True  # type: ignore[attr-defined]
    server.reap_workers = reap_workers


def _warm(server: Any) -> None:
    """In the master: load the workers' encodings, encode the warm prefixes (client/warmup.py)."""
    settings = _state.settings
    warmup.load_encodings(warmup.encoding_names(settings), server.log)
    if settings.warm_prefixes and not _state.warm:
        _state.warm = warmup.prefix_caches(
            settings.encoding_name(), settings.warm_prefixes, server.log
        )


def when_ready(server: Any) -> None:
    """Master, listeners bound, before the workers start: wait for the daemon, then supervise."""
    supervisor = _state.supervisor
    if supervisor is None:
        return
    if not supervisor.wait_ready(_state.settings.start_timeout_s):
        server.log.warning(
            "flashtoken-daemon is not serving %s after %.1f s; workers encode"
            " locally until it does",
            supervisor.bind,
            _state.settings.start_timeout_s,
        )
    supervisor.start_watching()


def post_fork(server: Any, worker: Any) -> None:
    """Worker, just forked: make its client, its in-process cache seeded with the master's
    warm prefixes (the encodings were loaded in the master)."""
    _clients()
    kind = "async" if _is_async_worker(worker) else "sync"
    try:
        warmup.seed(_client(kind, None), _state.warm)
    except Exception as exc:  # noqa: BLE001 - the application will meet the same error itself
        server.log.warning("flashtoken: cannot make the worker's client: %s", exc)


def worker_exit(server: Any, worker: Any) -> None:
    """Worker, exiting: copy its counters for Prometheus one last time, close its clients."""
    if _state.settings.prometheus:
        from . import prometheus

        prometheus.flush()
    close_clients()


def on_exit(server: Any) -> None:
    """Master, exiting: stop the daemon and remove the directory this master made."""
    _stop_at_exit()


def _stop_at_exit() -> None:
    made = _state.metrics_dir
    if made is not None and made[1] == os.getpid():
        shutil.rmtree(made[0], ignore_errors=True)
        _state.metrics_dir = None
    supervisor = _state.supervisor
    if supervisor is None or supervisor.owner != os.getpid():
        return
    supervisor.stop()
    _state.supervisor = None
    if _state.made_dir is not None:
        shutil.rmtree(_state.made_dir, ignore_errors=True)
        _state.made_dir = None


class Hooks(NamedTuple):
    on_starting: Callable[[Any], None]
    when_ready: Callable[[Any], None]
    post_fork: Callable[[Any, Any], None]
    worker_exit: Callable[[Any, Any], None]
    on_exit: Callable[[Any], None]


def hooks(**settings: Any) -> Hooks:
    """Configure the sidecar; returns the five hooks to assign in ``gunicorn.conf.py``.

    Takes the fields of ``SidecarSettings`` as keywords (``address``, ``spawn``, ``encoding``,
    ``client``, ``client_options``, ``max_bytes``, ``encodings``, ``daemon_args``, ...). Calling
    it again (gunicorn re-reads its config on SIGHUP) updates the settings for what starts
    later; a running daemon keeps running. Raises TypeError for an unknown keyword and
    ValueError for an unusable value.
    """
    try:
        new = replace(SidecarSettings(), **settings)
    except TypeError as exc:
        raise TypeError(f"hooks(): {exc}; see flashtoken.client.gunicorn.SidecarSettings") from None
    if new.client not in ("auto", "sync", "async"):
        raise ValueError(f"client must be 'auto', 'sync' or 'async', not {new.client!r}")
    # Checked here, when gunicorn reads its config, rather than in each worker or the daemon.
    from flashtoken.daemon.settings import SETTINGS as DAEMON_SETTINGS

    from flashtoken.settings import check_address

    if new.address is not None:
        check_address(new.address)
    daemon = {s.name: s for s in DAEMON_SETTINGS}
    if new.max_bytes is not None:
        max_bytes = daemon["max_bytes"]
        if isinstance(new.max_bytes, str):
            max_bytes.parse(new.max_bytes)
        else:
            max_bytes.check(new.max_bytes)
    if new.encodings is not None:
        daemon["encodings"].check(new.encodings)
    if isinstance(new.warm_prefixes, str) or not all(isinstance(p, str) for p in new.warm_prefixes):
        raise TypeError("warm_prefixes must be a list of str, e.g. warm_prefixes=[SYSTEM_PROMPT]")
    from .settings import client_settings

    client_settings("hooks(client_options=...)", dict(new.client_options, encoding=new.encoding))
    if new.prometheus and _state.metrics_dir is None:
        # Here, while gunicorn reads its config: before a --preload application (or anything
        # else in the master) imports prometheus_client, which picks its storage at import.
        from . import prometheus

        path, made = prometheus.multiprocess_dir()
        if made:
            _state.metrics_dir = (path, os.getpid())
    _state.settings = new
    _state.configured = True
    return Hooks(on_starting, when_ready, post_fork, worker_exit, on_exit)
