"""results.json and summary.md: the machine, the settings, the headline ratios on one screen.

details.md (every table) is benchmark/details.py's; the figures' catalogue benchmark/figures.py's.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmark.details import details, number
from benchmark.figures import drawn_figures
from benchmark.headline import headlines, verdict_line

# verdict_line: benchmark/__main__.py prints each headline's through this module.
__all__ = ["details", "drawn_figures", "machine", "summary", "verdict_line", "write"]

_PACKAGES = (
    "tiktoken",
    "flashtoken",
    "regex",
    "pyzmq",
    "msgpack",
    "xxhash",
    "numpy",
    "matplotlib",
    "bpe-openai",
    "toktok-rs",
    "gigatoken",
)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "versions": versions,
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write(results: dict[str, Any], out_dir: Path) -> Path:
    """results.json, summary.md (the headline, scannable) and details.md (every table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results["machine"]["loadavg_end"] = _loadavg()
    results["headlines"] = headlines(results)
    results["summary_path"] = str(out_dir / "summary.md")
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    (out_dir / "summary.md").write_text(summary(results))
    (out_dir / "details.md").write_text(details(results))
    return path


def _json_default(value: object) -> object:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


def summary(results: dict[str, Any]) -> str:
    """One screen: the headline table first, the run's noise, correctness in a sentence."""
    m, c = results["machine"], results["correctness"]
    lines = [
        "# FlashToken benchmark",
        "",
        "| figure | target | measured | verdict | why |",
        "|---|---:|---:|---|---|",
    ]
    for h in results["headlines"].values():
        verdict = "-" if h["met"] is None else ("met" if h["met"] else "**MISSED**")
        lines.append(
            f"| {h['what']} | {h['target']:.2f}x | {number(h['value'], 2)}x | {verdict} | {h['reason']} |"
        )
    if not results["headlines"]:
        lines.append("| (no headline section was run) | | | | |")
    bad = [
        f"{n} ({e['mismatches']} of {e['cases']:,})"
        for n, e in sorted(c["by_strategy"].items())
        if e["kind"] == "flashtoken" and e["mismatches"]
    ]
    peers_bad = [
        f"{n} ({e['mismatches']} of {e['cases']:,})"
        for n, e in sorted(c["by_strategy"].items())
        if e["kind"] == "baseline" and e["mismatches"]
    ]
    settings = results["settings"]
    lines += [
        "",
        f"**Correctness: {c['mismatches']} mismatches in {c['cases']:,} FlashToken cases**"
        + (f" — FAILED: {'; '.join(bad)}" if bad else "")
        + (
            f". Control `naive encode(p)+encode(s)`: {c['control_mismatches']:,} mismatches in "
            f"{c['control_cases']:,} cases (expected > 0)"
            if c["control_cases"]
            else " (the boundary corpus was not run: `--only` without correctness)"
        )
        + f". Peers: {c['baseline_mismatches']} "
        f"mismatches in {c['baseline_cases']:,} cases, {c.get('baseline_refusals', 0):,} texts "
        "refused (the peer raised: a user of it would get an error there)"
        + (
            f" (wrong ids: {'; '.join(peers_bad)}; a peer counts as exact only on the workloads "
            "where it matched every text)"
            if peers_bad
            else ""
        )
        + ".",
        "",
        "**Noise.** Ratios are medians measured in the same run, strategies interleaved in blocks "
        f"({settings['warmup']} warm-up calls, then {settings['min_reps']}-{settings['max_reps']} "
        f"repetitions or {settings['cell_budget_s'] * 1e3:.0f} ms per cell); each row's `n` and "
        "p90/p50 spread are in results.json (`headlines`). "
        f"Load average {m['loadavg_start']} at the start, {m.get('loadavg_end')} at the end "
        f"on {m['cores']} cores: on a shared machine a ratio can move by tens of percent between "
        "runs; compare runs by their ratios, not their microseconds.",
        "",
        f"Mode `{settings['mode']}`, seed {settings['seed']}, {results['duration_s']:.0f} s "
        f"(sections: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in results.get("section_seconds", {}).items())
        + f"). {m['cpu']}, {m['os']}, Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
        + ".",
    ]
    if results.get("daemon_skipped"):
        lines.append(f"\nDaemon strategies skipped: {results['daemon_skipped']}")
    if results.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in results["errors"]]
    lines += [
        "",
        "Every table: details.md. Figures: "
        + ", ".join(f"`{name}`" for name in drawn_figures(results))
        + " (described in details.md). How this was measured and what it does not show: "
        "docs/METHODOLOGY.md.",
        "",
    ]
    return "\n".join(lines)
