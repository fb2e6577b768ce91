"""The ``flashtoken-daemon`` command (also ``python -m flashtoken.daemon``).

    flashtoken-daemon [serve] [--bind ADDRESS] [--max-bytes 512MiB] [--encodings a,b]
                      [--fill-threads N] [--max-prefix-bytes 4MiB] [--log-level INFO]
                      [--log-format text|json] [--metrics-port PORT] [--exit-with-parent]
                      [--fleet-url URL --fleet-secret-file PATH] [--fleet-timeout-ms 50] ...
    flashtoken-daemon stats [--bind ADDRESS] [--format memcached|json|prometheus]
    flashtoken-daemon --version

Every ``serve`` flag is a setting of daemon/settings.py and may also come from its
``FLASHTOKEN_*`` environment variable (a flag wins over the variable).

Exit status: 0 after a clean shutdown (SIGTERM / SIGINT) or a stats reply; 1 when the daemon
cannot start (another daemon serves the address, an unsafe directory, an unloadable encoding,
a missing ``[daemon]`` extra) or no daemon answers ``stats``; 2 for a usage error (a bad flag
or environment variable).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import flashtoken
from flashtoken.settings import Setting

from .settings import SETTINGS, Config

_COMMANDS = ("serve", "stats", "settings")
_EXTRA_HINT = "install the daemon's extra: pip install 'flashtoken[daemon]'"
_METAVARS = {"size": "SIZE", "count": "N", "ms": "MS", "names": "NAMES", "address": "ADDRESS"}


def _typed(setting: Setting) -> Any:
    def parse(text: str) -> Any:
        try:
            return setting.parse(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = setting.kind  # argparse names the type in "invalid <type> value"
    return parse


def _help(setting: Setting) -> str:
    # argparse %-formats help strings: a literal % must be doubled.
    text = f"{setting.help} (default: {setting.show(setting.default)}; env: {setting.env})"
    return text.replace("%", "%%")


def _add_setting(parser: argparse.ArgumentParser, setting: Setting) -> None:
    flags = [setting.flag] + (["--address"] if setting.name == "bind" else [])
    if setting.kind == "flag":
        parser.add_argument(
            *flags, action="store_true", default=None, dest=setting.name, help=_help(setting)
        )
        return
    parser.add_argument(
        *flags,
        dest=setting.name,
        type=_typed(setting),
        default=None,  # None: not given, so the environment variable or the default applies
        metavar=_METAVARS.get(setting.kind, "|".join(setting.choices) or "VALUE"),
        help=_help(setting),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashtoken-daemon",
        description="The FlashToken sidecar: one store of prefix tokens shared by every worker"
        " process on this host. `serve` is the default command.",
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="{serve,stats,settings}")
    serve = commands.add_parser(
        "serve",
        help="run the daemon (the default)",
        description="Run the daemon in the foreground until SIGTERM or SIGINT. Every flag may"
        " also be set by its environment variable; a flag wins.",
    )
    for setting in SETTINGS:
        _add_setting(serve, setting)
    # Test-only: truncate keys to N bytes so that tests can force collisions.
    serve.add_argument("--debug-key-bytes", type=_positive, default=None, help=argparse.SUPPRESS)

    stats = commands.add_parser(
        "stats",
        help="print a running daemon's counters and settings",
        description="Print a running daemon's counters and settings.",
    )
    stats.add_argument(
        "--bind",
        "--address",
        dest="bind",
        metavar="ADDRESS",
        help="address of the daemon (default: $FLASHTOKEN_ADDRESS, else the default address)",
    )
    stats.add_argument(
        "--format",
        choices=("memcached", "json", "prometheus"),
        default="memcached",
        help="memcached-style STAT lines (the default), one JSON object, or the Prometheus"
        " text exposition format",
    )
    stats.add_argument("--json", action="store_true", help="the same as --format json")
    stats.add_argument(
        "--timeout-ms",
        type=_positive,
        default=2000,
        metavar="MS",
        help="how long to wait for the reply (default: 2000)",
    )
    shown = commands.add_parser(
        "settings",
        help="print every setting of the daemon and of the clients, and where it comes from",
        description="Print the effective value of every setting (flashtoken-daemon serve, and"
        " Client / AsyncClient) in this environment: the FLASHTOKEN_* variable if set, else"
        " the default.",
    )
    shown.add_argument(
        "--markdown", action="store_true", help="print the tables of docs/INTEGRATION.md"
    )
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _version() -> str:
    import platform

    import tiktoken

    return (
        f"flashtoken-daemon {flashtoken.__version__} (tiktoken"
        f" {getattr(tiktoken, '__version__', '?')}, Python {platform.python_version()})"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in _COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "stats":
            return _stats(args)
        if args.command == "settings":
            return _settings(args)
        return _serve(args, parser)
    except BrokenPipeError:
        # `stats | head`, `settings | head`: the reader has gone, which is not an error. Point
        # stdout at /dev/null so that the interpreter's own flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except PermissionError as exc:  # an unsafe runtime directory
        print(f"flashtoken-daemon: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if exc.name not in ("zmq", "msgpack"):
            raise
        print(f"flashtoken-daemon: {exc.name} is not installed; {_EXTRA_HINT}", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    given = {s.name: getattr(args, s.name) for s in SETTINGS}
    try:
        config = Config.from_settings(given, debug_key_bytes=args.debug_key_bytes)
    except (TypeError, ValueError) as exc:  # a bad FLASHTOKEN_* (the flags are parsed above)
        parser.error(str(exc))
    from .server import Server, StartupError

    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s flashtoken-daemon %(levelname)s %(message)s")
        )
    logging.basicConfig(level=config.log_level, handlers=[handler])
    metrics = None
    if config.metrics_port:
        from .metrics import MetricsServer

        try:  # before the daemon binds: a busy port must not leave a daemon half started
            metrics = MetricsServer(config.bind, config.metrics_port)
        except OSError as exc:
            print(
                f"flashtoken-daemon: cannot serve metrics on 127.0.0.1:{config.metrics_port}:"
                f" {exc}; choose another --metrics-port",
                file=sys.stderr,
            )
            return 1
    server = Server(config)
    try:
        server.start()
    except StartupError as exc:
        print(f"flashtoken-daemon: {exc}", file=sys.stderr)
        if metrics is not None:
            metrics.close()
        return 1
    if metrics is not None:
        metrics.start()
    try:
        server.serve()
    finally:
        if metrics is not None:
            metrics.close()
    return 0


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors: time (UTC, ISO 8601), level, logger,
    pid, message, and the traceback as ``exc`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        from datetime import datetime, timezone

        when = datetime.fromtimestamp(record.created, timezone.utc)
        out = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _stats(args: argparse.Namespace) -> int:
    from flashtoken.errors import DaemonError
    from flashtoken.settings import check_address
    from flashtoken.wire import default_address
    from flashtoken.wire.admin import request_stats

    from .metrics import prometheus_text

    address = args.bind or os.environ.get("FLASHTOKEN_ADDRESS") or default_address()
    try:
        check_address(address)
    except ValueError as exc:
        print(f"flashtoken-daemon stats: {exc}", file=sys.stderr)
        return 2
    try:
        reply = request_stats(address, timeout_ms=args.timeout_ms)
    except DaemonError as exc:
        print(f"flashtoken-daemon stats: {exc}", file=sys.stderr)
        return 1
    fmt = "json" if args.json else args.format
    if fmt == "json":
        text = json.dumps(reply, sort_keys=True) + "\n"
    elif fmt == "prometheus":
        text = prometheus_text(reply)
    else:
        text = _memcached_text(reply)
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0


def _tables() -> list[tuple[str, tuple[Setting, ...]]]:
    from flashtoken.client.settings import CLIENT_SETTINGS

    return [
        ("flashtoken-daemon serve (flag --name-with-dashes)", SETTINGS),
        ("Client() and AsyncClient() (keyword)", CLIENT_SETTINGS),
    ]


def settings_markdown() -> str:
    """The settings tables of docs/INTEGRATION.md (tests/test_cli.py compares them)."""
    from flashtoken.settings import markdown_table

    return "\n".join(f"**{title}**\n\n{markdown_table(table)}" for title, table in _tables())


def _settings(args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(settings_markdown())
        return 0
    status = 0
    for title, table in _tables():
        print(f"# {title}")
        for setting in table:
            raw = os.environ.get(setting.env)
            if not raw:
                print(f"{setting.name} = {setting.show(setting.default)}  (default)")
                continue
            try:
                print(f"{setting.name} = {setting.show(setting.parse(raw))}  (from {setting.env})")
            except (TypeError, ValueError) as exc:
                print(f"{setting.name}: {setting.env}={raw!r} is invalid: {exc}")
                status = 2
    sys.stdout.flush()  # a closed pipe raises here, inside main's handler, not at exit
    return status


def _memcached_text(reply: dict[str, Any]) -> str:
    """memcached's `stats` format: one "STAT name value" line each, counters then settings."""
    lines = []
    for section, word in (("stats", "STAT"), ("settings", "SETTING")):
        values: dict[str, Any] = reply.get(section, {})
        for name in sorted(values):
            value = values[name]
            if isinstance(value, (list, tuple)):
                value = ",".join(map(str, value))
            lines.append(f"{word} {name} {value}\n")
    return "".join(lines)


if __name__ == "__main__":
    sys.exit(main())
