"""``python -m benchmark``: correctness, workloads, multi-worker runs, sweeps, then the report and plots.

Exit status: 0 when every FlashToken strategy matched tiktoken everywhere, the naive control
mismatched (as it must) and every headline target measured was met; 1 on a correctness failure
(any FlashToken mismatch); 2 when a headline target was MISSED (not in the test suite's tiny run,
whose timings mean nothing); 3 when a section of the benchmark crashed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmark import (
    auto_chat,
    config,
    correctness,
    http_e2e,
    multiworker,
    report,
    sidecar,
    sweeps,
    workloads,
)

DEFAULT_OUT = Path("benchmark") / "out"
SECTIONS = (
    "correctness",
    "fixed_prefix",
    "chat",
    "rag",
    "multiworker",
    "auto_chat",
    "http_e2e",
    "prefix_length",
    "suffix_length",
    "backtrack_pieces",
    "l1_size",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark",
        description="FlashToken benchmark: exactness against tiktoken, speed against tiktoken and "
        "the fastest exact peer (toktok-rs, gigatoken), multi-worker throughput with the daemon. "
        "Writes results.json, summary.md (headline first), details.md and PNGs.",
        epilog="Exit status: 0 all exact (missed targets are reported, as MISSED, in the "
        "headline); 1 a FlashToken mismatch; 2 a headline target missed, with --strict-targets; "
        "3 a section crashed.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="smaller grid: about 2-3 minutes on 2 busy cores (the full run: 10+ minutes)",
    )
    mode.add_argument(
        "--tiny", action="store_true", help=argparse.SUPPRESS
    )  # the test suite's smoke run
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=config.FULL.seed,
        help="seed for all corpora (default: %(default)s)",
    )
    parser.add_argument("--no-daemon", action="store_true", help="skip the daemon strategies")
    parser.add_argument(
        "--only",
        type=_sections,
        default=None,
        metavar="SECTION[,SECTION...]",
        help=f"run only these sections (of: {', '.join(SECTIONS)})",
    )
    parser.add_argument(
        "--no-plots", action="store_true", help="write results.json and summary.md only"
    )
    parser.add_argument(
        "--strict-targets", action="store_true", help="exit 2 when a headline target is missed"
    )
    return parser.parse_args(argv)


def _sections(value: str) -> frozenset[str]:
    chosen = frozenset(v.strip() for v in value.split(",") if v.strip())
    unknown = sorted(chosen - set(SECTIONS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(unknown) or '(none given)'}; choose from "
            + ", ".join(SECTIONS)
        )
    return chosen


class Progress:
    """Progress lines on stderr, each with the time since the start."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:7.1f}s] {message}", file=sys.stderr, flush=True)


def _warm_up_process(encodings: tuple[str, ...]) -> None:
    """One-time per-process costs (loading encodings, FlashToken's Unicode tables), kept out of timings.

    The multi-worker cold-start phase is where these costs are shown.
    """
    import flashtoken

    for name in encodings:
        enc = flashtoken.get_encoding(name)
        flashtoken.FixedPrefixTokenCache(enc, "Warm-up: é 中文 👋 " * 4).encode_ordinary(" ok")
        flashtoken.AppendOnlyPieceTokenCache(enc, "Warm-up: é 中文").append_ordinary(" 👋")


def run(
    settings: config.Settings,
    out_dir: Path,
    use_daemon: bool,
    plots: bool,
    only: frozenset[str] | None = None,
    strict_targets: bool = False,
) -> int:
    progress = Progress()
    chosen = frozenset(SECTIONS) if only is None else only
    results: dict[str, Any] = {
        "settings": settings.as_dict(),
        "seeds": {"corpus": settings.seed},
        "machine": report.machine(),
        "workloads": {},
        "sweeps": {},
        "errors": [],
        "sections_run": [name for name in SECTIONS if name in chosen],
        "section_seconds": {},
    }
    if not chosen & {"fixed_prefix", "rag"}:
        use_daemon = use_daemon and bool(chosen & {"multiworker", "auto_chat", "l1_size"})
    daemon_skip = sidecar.unavailable_reason() if use_daemon else "disabled with --no-daemon"
    results["daemon_skipped"] = daemon_skip
    if daemon_skip:
        progress(f"daemon strategies skipped: {daemon_skip}")
    checker = correctness.Checker()
    enc0 = settings.encodings[0]

    def section(name: str, fn: Callable[[], Any], store: dict[str, Any]) -> None:
        if name not in chosen:
            return
        progress(f"{name} ...")
        start = time.monotonic()
        try:
            store[name] = fn()
        except Exception:  # noqa: BLE001 - one broken section must not hide the others' results
            results["errors"].append(
                f"{name}: {traceback.format_exc(limit=3).strip().splitlines()[-1]}"
            )
            progress(f"{name} FAILED:\n{traceback.format_exc()}")
        results["section_seconds"][name] = round(time.monotonic() - start, 1)

    _warm_up_process(settings.encodings)
    section(
        "correctness",
        lambda: correctness.run(
            checker,
            settings.encodings,
            settings.seed,
            settings.random_splits,
            settings.boundary_context,
            progress,
        ),
        {},
    )
    w = results["workloads"]
    daemon_ctx = None
    if not daemon_skip and chosen & {"fixed_prefix", "rag"}:
        try:
            daemon_ctx = sidecar.Daemon(encodings=settings.encodings).__enter__()
        except Exception as exc:  # noqa: BLE001 - a daemon that cannot start is reported, then skipped
            daemon_skip = results["daemon_skipped"] = f"the daemon did not start: {exc}"
            results["errors"].append(daemon_skip)
            progress(daemon_skip)
    address = daemon_ctx.address if daemon_ctx else None
    try:
        section(
            "fixed_prefix",
            lambda: workloads.fixed_prefix(
                settings,
                checker,
                progress,
                address,
                enc0,
                settings.prefix_kib,
                settings.suffix_chars,
            ),
            w,
        )
        section("chat", lambda: workloads.chat(settings, checker, progress, enc0), w)
        section("rag", lambda: workloads.rag(settings, checker, progress, address, enc0), w)
        if daemon_ctx is not None:
            results["daemon_single_process"] = {
                "rss_kib": daemon_ctx.rss_kib(),
                "stats": daemon_ctx.stats(),
            }
    finally:
        if daemon_ctx is not None:
            daemon_ctx.stop()
    section(
        "multiworker",
        lambda: multiworker.run(settings, checker, progress, enc0, settings.workers, daemon_skip),
        w,
    )
    section("auto_chat", lambda: auto_chat.run(settings, checker, progress, enc0, daemon_skip), w)
    if settings.mode == "full":  # real gunicorn servers and HTTP load: ~30 s, full runs only
        section("http_e2e", lambda: http_e2e.run(settings, checker, progress, daemon_skip), w)
    s = results["sweeps"]
    section("prefix_length", lambda: sweeps.prefix_length(settings, checker, progress), s)
    section("suffix_length", lambda: sweeps.suffix_length(settings, checker, progress), s)
    section("backtrack_pieces", lambda: sweeps.backtrack_pieces(settings, checker, progress), s)
    section("l1_size", lambda: sweeps.l1_size(settings, checker, progress, daemon_skip), s)
    if "multiworker" in chosen:
        s["workers"] = "see workloads.multiworker"
    results["correctness"] = checker.totals()
    results["duration_s"] = time.monotonic() - progress.start
    path = report.write(results, out_dir)
    progress(f"wrote {path} and {out_dir / 'summary.md'}")
    if plots:
        try:
            from benchmark import plot

            for png in plot.draw(path):
                progress(f"wrote {png}")
        except ImportError as exc:
            progress(
                f"no figures: {exc} (install the 'bench' extra, then python -m benchmark.plot {path})"
            )
    return _verdict(results, progress, settings.mode, "correctness" in chosen, strict_targets)


def _verdict(
    results: dict[str, Any], progress: Progress, mode: str, corpus_ran: bool, strict: bool
) -> int:
    c = results["correctness"]
    missed = []
    for h in results["headlines"].values():
        progress(f"headline {h['what']}: {report.verdict_line(h)}")
        if h["met"] is False:
            missed.append(h["what"])
    progress(
        f"correctness: {c['mismatches']} mismatches in {c['cases']} FlashToken cases; "
        f"control: {c['control_mismatches']} mismatches in {c['control_cases']} cases"
    )
    if c["mismatches"]:
        bad = [
            n for n, e in c["by_strategy"].items() if e["kind"] == "flashtoken" and e["mismatches"]
        ]
        progress(f"FAIL: FlashToken strategies differ from tiktoken: {bad}")
        return 1
    if corpus_ran and not c["control_mismatches"]:
        progress(
            "FAIL: the naive control never mismatched: the boundary corpus no longer reaches the joins"
        )
        return 1
    if results["errors"]:
        progress(f"FAIL: {len(results['errors'])} section(s) crashed: {results['errors']}")
        return 3
    if missed and mode != "tiny":
        progress(f"MISSED {len(missed)} headline target(s): see {results['summary_path']}")
        return 2 if strict else 0
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = config.TINY if args.tiny else config.QUICK if args.quick else config.FULL
    settings = dataclasses.replace(preset, seed=args.seed)
    return run(
        settings,
        args.out,
        use_daemon=not args.no_daemon,
        plots=not args.no_plots,
        only=args.only,
        strict_targets=args.strict_targets,
    )


if __name__ == "__main__":
    sys.exit(main())
