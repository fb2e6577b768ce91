"""The ``flashtoken-daemon`` command (also ``python -m flashtoken.daemon``).

    flashtoken-daemon [serve] [--bind ADDRESS] [--max-bytes 512MiB] [--encodings a,b]
                      [--fill-threads N] [--max-prefix-bytes 4MiB] [--log-level INFO]
                      [--exit-with-parent] [--fleet-url URL --fleet-secret-file PATH]
                      [--fleet-key-prefix flashtoken:] [--fleet-timeout-ms 50]
                      [--fleet-wait-ms 5] [--fleet-queue-bytes 64MiB]
    flashtoken-daemon stats [--bind ADDRESS] [--json] [--timeout-ms 2000]

Exit status: 0 after a clean shutdown (SIGTERM / SIGINT) or a stats reply; 1 when the daemon
cannot start (another daemon serves the address, an unsafe directory, an unloadable encoding)
or no daemon answers ``stats``; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from flashtoken.protocol import default_address

from .settings import DEFAULTS, SETTINGS, Config, parse_size

_HELP = {s.name: f"{s.help} (default: {s.default}; unit: {s.unit})" for s in SETTINGS}


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashtoken-daemon",
        description="The FlashToken sidecar: one store of prefix tokens shared by every worker"
        " process on this host. `serve` is the default command.",
    )
    commands = parser.add_subparsers(dest="command", metavar="{serve,stats}")
    serve = commands.add_parser(
        "serve",
        help="run the daemon (the default)",
        description="Run the daemon in the foreground until SIGTERM or SIGINT.",
    )
    serve.add_argument("--bind", metavar="ADDRESS", help=_HELP["bind"])
    serve.add_argument(
        "--max-bytes",
        type=_size,
        default=DEFAULTS["max_bytes"],
        metavar="SIZE",
        help=_HELP["max_bytes"] + "; e.g. 512MiB, 1GiB, 1048576",
    )
    serve.add_argument(
        "--encodings",
        type=_names,
        default=DEFAULTS["encodings"],
        metavar="NAMES",
        help="comma-separated " + _HELP["encodings"] + "; '' for none",
    )
    serve.add_argument(
        "--fill-threads",
        type=_positive,
        default=DEFAULTS["fill_threads"],
        metavar="N",
        help=_HELP["fill_threads"],
    )
    serve.add_argument(
        "--max-prefix-bytes",
        type=_size,
        default=DEFAULTS["max_prefix_bytes"],
        metavar="SIZE",
        help=_HELP["max_prefix_bytes"],
    )
    serve.add_argument(
        "--max-pending-fills",
        type=_positive,
        default=DEFAULTS["max_pending_fills"],
        metavar="N",
        help=_HELP["max_pending_fills"],
    )
    serve.add_argument(
        "--hwm", type=_positive, default=DEFAULTS["hwm"], metavar="N", help=_HELP["hwm"]
    )
    serve.add_argument(
        "--log-level",
        default=DEFAULTS["log_level"],
        metavar="LEVEL",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help=_HELP["log_level"],
    )
    serve.add_argument("--exit-with-parent", action="store_true", help=_HELP["exit_with_parent"])
    fleet = serve.add_argument_group("fleet tier", "share fills across hosts (docs/FLEET.md)")
    fleet.add_argument("--fleet-url", metavar="URL", help=_HELP["fleet_url"])
    fleet.add_argument("--fleet-secret-file", metavar="PATH", help=_HELP["fleet_secret_file"])
    fleet.add_argument(
        "--fleet-key-prefix",
        default=DEFAULTS["fleet_key_prefix"],
        metavar="STRING",
        help=_HELP["fleet_key_prefix"],
    )
    fleet.add_argument(
        "--fleet-timeout-ms",
        type=_positive,
        default=DEFAULTS["fleet_timeout_ms"],
        metavar="MS",
        help=_HELP["fleet_timeout_ms"],
    )
    fleet.add_argument(
        "--fleet-wait-ms",
        type=_non_negative,
        default=DEFAULTS["fleet_wait_ms"],
        metavar="MS",
        help=_HELP["fleet_wait_ms"],
    )
    fleet.add_argument(
        "--fleet-queue-bytes",
        type=_size,
        default=DEFAULTS["fleet_queue_bytes"],
        metavar="SIZE",
        help=_HELP["fleet_queue_bytes"],
    )
    # Test-only: truncate keys to N bytes so that tests can force collisions.
    serve.add_argument("--debug-key-bytes", type=_positive, default=None, help=argparse.SUPPRESS)

    stats = commands.add_parser(
        "stats",
        help="print a running daemon's counters and settings",
        description="Print a running daemon's counters and settings.",
    )
    stats.add_argument(
        "--bind",
        metavar="ADDRESS",
        help="address of the daemon (default: the daemon's default address)",
    )
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.add_argument(
        "--timeout-ms",
        type=_positive,
        default=2000,
        metavar="MS",
        help="how long to wait for the reply (default: 2000)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in ("serve", "stats") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")
    args = _parser().parse_args(argv)
    try:
        if args.command == "stats":
            return _stats(args)
        return _serve(args)
    except PermissionError as exc:  # an unsafe runtime directory
        print(f"flashtoken-daemon: {exc}", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace) -> int:
    from .server import Server, StartupError

    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s flashtoken-daemon %(levelname)s %(message)s",
    )
    config = Config(
        bind=args.bind or default_address(),
        max_bytes=args.max_bytes,
        encodings=args.encodings,
        fill_threads=args.fill_threads,
        max_prefix_bytes=args.max_prefix_bytes,
        max_pending_fills=args.max_pending_fills,
        hwm=args.hwm,
        log_level=args.log_level,
        exit_with_parent=args.exit_with_parent,
        debug_key_bytes=args.debug_key_bytes,
        fleet_url=args.fleet_url,
        fleet_secret_file=args.fleet_secret_file,
        fleet_key_prefix=args.fleet_key_prefix,
        fleet_timeout_ms=args.fleet_timeout_ms,
        fleet_queue_bytes=args.fleet_queue_bytes,
        fleet_wait_ms=args.fleet_wait_ms,
    )
    server = Server(config)
    try:
        server.start()
    except StartupError as exc:
        print(f"flashtoken-daemon: {exc}", file=sys.stderr)
        return 1
    server.serve()
    return 0


def _stats(args: argparse.Namespace) -> int:
    from flashtoken.client.sync import request_stats

    from flashtoken.errors import DaemonError

    address = args.bind or default_address()
    try:
        reply = request_stats(address, timeout_ms=args.timeout_ms)
    except DaemonError as exc:
        print(f"flashtoken-daemon stats: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, sort_keys=True))
        return 0
    # memcached's `stats` format: one "STAT name value" line each, counters then settings.
    for section in ("stats", "settings"):
        values: dict[str, Any] = reply.get(section, {})
        for name in sorted(values):
            value = values[name]
            if isinstance(value, (list, tuple)):
                value = ",".join(map(str, value))
            print(f"STAT {name} {value}" if section == "stats" else f"SETTING {name} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
