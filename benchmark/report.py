"""results.json and summary.md: the machine, the settings, every measurement, the headline ratios."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmark import auto_chat, workloads
from benchmark.auto_chat import WORKERS
from benchmark.headline import headlines, verdict_line

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

# The figures plot.py draws from results.json, each with the one line summary.md prints for it.
FIGURES = (
    (
        "speedup_vs_prefix_length.png",
        "Speed-up over tiktoken on the whole text against prefix length (suffix ~100 characters), "
        "per encoding: FlashToken's best list path and best count (any backend) and the fastest "
        "peer; the saving grows with the prefix.",
    ),
    (
        "chat_per_turn_latency.png",
        "Per-turn latency over a 200-turn chat: tiktoken re-encoding the history grows with it; the "
        "append-only cache should stay flat.",
    ),
    (
        "multiworker_throughput.png",
        "Aggregate requests/s against the number of worker processes, per strategy (2 cores: beyond 2 "
        "workers there is no more CPU).",
    ),
    (
        "latency_percentiles.png",
        "p50/p90/p99 request latency per strategy in the 4-worker (or largest) multi-worker run, log scale.",
    ),
    (
        "memory_per_strategy.png",
        "The host's memory per strategy at the largest worker count: the workers' PSS summed "
        "plus the daemon's, stacked, read at one moment with every process alive (PSS counts a "
        "page shared by n processes 1/n in each, so the total counts the daemon's map once); "
        "the sum of RSS beside it for comparison.",
    ),
    (
        "http_e2e.png",
        "End to end over HTTP: the gunicorn example app, 4 sync workers, 32 KiB system prompts: "
        "requests/s and p50/p99 latency, plain tiktoken vs the FlashToken sidecar, returning the "
        "token list or only the count.",
    ),
    (
        "auto_chat_per_turn_latency.png",
        "Automatic reuse: per-turn latency against history length for a 200-turn chat routed at random "
        "over 4 worker processes, each request the whole conversation with a rewritten generation "
        "prompt: tiktoken, the declared-prefix API, the automatic API and the peers; the conversation "
        "is played twice, so tiktoken is timed twice, beside each API.",
    ),
    (
        "fixed_prefix_heatmap.png",
        "For every prefix size x suffix size of the fixed-system-prompt workload, log colour scale: "
        "FixedPrefixTokenCache.encode_ordinary over tiktoken, and FlashToken's best list path over "
        "the fastest exact peer.",
    ),
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


def _f(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


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
            f"| {h['what']} | {h['target']:.2f}x | {_f(h['value'], 2)}x | {verdict} | {h['reason']} |"
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


# What each figure needs in results.json (plot.py draws it only then).
_FIGURE_DATA = {
    "speedup_vs_prefix_length.png": ("sweeps", "prefix_length"),
    "chat_per_turn_latency.png": ("workloads", "chat"),
    "multiworker_throughput.png": ("workloads", "multiworker", "runs"),
    "latency_percentiles.png": ("workloads", "multiworker", "runs"),
    "memory_per_strategy.png": ("workloads", "multiworker", "runs"),
    "http_e2e.png": ("workloads", "http_e2e", "runs"),
    "auto_chat_per_turn_latency.png": ("workloads", "auto_chat", "per_turn_median_us"),
    "fixed_prefix_heatmap.png": ("workloads", "fixed_prefix", "cells"),
}


def drawn_figures(results: dict[str, Any]) -> list[str]:
    """The figures this run has data for (a ``--quick`` run has no http_e2e, ``--only`` fewer)."""
    out = []
    for name, _ in FIGURES:
        node: Any = results
        for key in _FIGURE_DATA[name]:
            node = node.get(key) if isinstance(node, dict) else None
        if node:
            out.append(name)
    return out


def details(results: dict[str, Any]) -> str:
    """Every measurement as tables, after the headline's own lines."""
    c, w = results["correctness"], results["workloads"]
    lines = [
        "# FlashToken benchmark: details",
        "",
        "The headline is in summary.md. Here: the headline's noise, the correctness of every "
        "strategy, then each workload's and sweep's tables.",
        "",
        "## Headline figures, with their noise",
        "",
    ]
    lines += [
        f"- {h['what']}: {verdict_line(h)} ({h['noise'] or 'n/a'})"
        for h in results["headlines"].values()
    ]
    lines += [
        "",
        "## Correctness",
        "",
        "| strategy | kind | cases | mismatches | examples |",
        "|---|---|---:|---:|---|",
    ]
    for name, e in sorted(c["by_strategy"].items()):
        ex = "; ".join(e["examples"][:2]) if e["mismatches"] else ""
        lines.append(f"| {name} | {e['kind']} | {e['cases']:,} | {e['mismatches']:,} | {ex} |")
    lines += _fixed_prefix_tables(w.get("fixed_prefix"))
    lines += _chat_table(w.get("chat"))
    lines += _auto_chat_table(w.get("auto_chat"))
    lines += _stats_table("RAG template", w.get("rag"), "median per request")
    lines += _multiworker_table(w.get("multiworker"))
    lines += _http_e2e_table(w.get("http_e2e"))
    lines += _sweep_tables(results.get("sweeps", {}))
    drawn = drawn_figures(results)
    lines += ["", "## Figures", ""] + [
        f"- `{name}`: {what}" for name, what in FIGURES if name in drawn
    ]
    return "\n".join(lines) + "\n"


def _fixed_prefix_tables(
    fp: dict[str, Any] | None, title: str = "Fixed system prompt"
) -> list[str]:
    if not fp or not fp.get("cells"):
        return []
    lines = [
        "",
        f"## {title} ({fp['encoding']})",
        "",
        "Median / p90 / p99 in microseconds per call; ratio = tiktoken median / strategy median.",
        "",
    ]
    for cell in fp["cells"]:
        lines += [
            f"**prefix {cell['prefix_kib']} KiB ({cell['prefix_tokens']:,} tokens) + suffix "
            f"{cell['suffix_chars']} chars**",
            "",
            "| strategy | median µs | p90 µs | p99 µs | ratio vs tiktoken |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, s in cell["stats"].items():
            lines.append(
                f"| {name} | {_f(s['median_us'])} | {_f(s['p90_us'])} | {_f(s['p99_us'])} | "
                f"{_f(cell['ratio_vs_tiktoken'][name])}x |"
            )
        lines.append("")
    return lines


def _chat_table(chat: dict[str, Any] | None, title: str = "Append-only chat") -> list[str]:
    if not chat or not chat.get("total_ms"):
        return []
    lines = [
        "",
        f"## {title} ({chat['encoding']}, {chat['turns']} turns, "
        f"{chat['history_chars'][-1]:,} chars / {chat['history_tokens'][-1]:,} tokens at the end)",
        "",
        "| strategy | total ms | ratio vs tiktoken | per-turn median µs | p90 µs | p99 µs | last/first turns |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, total in chat["total_ms"].items():
        s = chat["per_turn_stats"][name]
        lines.append(
            f"| {name} | {_f(total)} | {_f(chat['total_ratio_vs_tiktoken'][name])}x | {_f(s['median_us'])} "
            f"| {_f(s['p90_us'])} | {_f(s['p99_us'])} | {_f(chat['flatness_last_over_first'][name], 2)} |"
        )
    lines.append(
        f"\n`last/first turns`: mean per-turn cost of the last {chat['flatness_window_turns']} turns over "
        "the first (after turn 0); ~1 means flat."
    )
    return lines


def _auto_chat_table(ac: dict[str, Any] | None) -> list[str]:
    lines = _chat_table(ac, f"Automatic reuse, a chat routed at random over {WORKERS} workers")
    if not lines:
        return []
    mem, clients = ac["memory"], ac["client_stats"][auto_chat.AUTO]  # type: ignore[index]
    daemon = ac["daemon_stats"]["automatic"]  # type: ignore[index]
    return lines + [
        "",
        f"Daemon memory after the run: {mem['daemon_bytes']:,} bytes in {mem['daemon_blocks']:,} "
        f"blocks for {mem['distinct_tokens']:,} distinct tokens: "
        f"{_f(mem['bytes_per_distinct_token'], 2)} bytes a token, "
        f"**{_f(mem['ratio_vs_4_bytes_per_token'], 2)}x** 4 bytes a token.",
        "",
        f"Workers (automatic API, summed): {clients['l1_hits']:,} requests answered from their own "
        f"cache plus a local encode of the rest, {clients['l2_hits']:,} daemon hits, "
        f"{clients['auto_l1_adopted']:,} blocks taken from other workers' turns "
        f"({clients['auto_l1_refused']} refused), {clients['auto_told']:,} TELLs; the daemon "
        f"published {daemon['blocks_published']:,} blocks ({daemon['tells_unplaced']} TELLs "
        "unplaced).",
    ]


def _stats_table(title: str, data: dict[str, Any] | None, what: str) -> list[str]:
    if not data:
        return []
    lines = [
        "",
        f"## {title} ({data['encoding']}, {data['requests']} requests, {data['documents']} documents)",
        "",
        f"| strategy | {what} µs | p90 µs | p99 µs | total ms | ratio vs tiktoken (total) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in data["stats"].items():
        lines.append(
            f"| {name} | {_f(s['median_us'])} | {_f(s['p90_us'])} | {_f(s['p99_us'])} | "
            f"{_f(data['total_ms'][name])} | {_f(data['total_ratio_vs_tiktoken'][name])}x |"
        )
    return lines


def _multiworker_table(mw: dict[str, Any] | None) -> list[str]:
    if not mw:
        return []
    lines = [
        "",
        f"## Multi-worker ({mw['encoding']}, {mw['prefixes']} prefixes of {mw['prefix_kib'][0]}-"
        f"{mw['prefix_kib'][1]} KiB, Zipf s={mw['zipf_s']}, one process per worker)",
        "",
        "Memory: host PSS is every worker's PSS plus the daemon's, read at one moment with all of "
        "them alive, so a page they share (the daemon's map, inherited pages) counts once; RSS "
        "counts it in every process that maps it.",
        "",
        "| strategy | workers | req/s | ratio vs tiktoken | cold req/s | p50 µs | p90 µs | p99 µs | "
        "host PSS MiB | RSS/worker MiB | daemon RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in mw["runs"]:
        d = r.get("daemon_rss_kib")
        lat = r["latency"]
        lines.append(
            f"| {r['strategy']} | {r['workers']} | {_f(r['requests_per_s'], 0)} | "
            f"{_f(r['throughput_ratio_vs_tiktoken'])}x | {_f(r['cold_requests_per_s'], 0)} | "
            f"{_f(lat['median_us'])} | {_f(lat['p90_us'])} | {_f(lat['p99_us'])} | "
            f"{_f(r.get('host_pss_mib'), 0)} | {_f(r['rss_mib_median_worker'])} | "
            f"{_f(d / 1024 if d else None)} |"
        )
    return lines


def _http_e2e_table(h: dict[str, Any] | None) -> list[str]:
    if not h:
        return []
    if h.get("skipped"):
        return ["", f"HTTP end to end skipped: {h['skipped']}"]
    lines = [
        "",
        f"## HTTP end to end (gunicorn example app, {h['workers']} {h['worker_class']} workers, "
        f"{h['prefixes']} system prompts of {h['prefix_kib']} KiB, {h['encoding']})",
        "",
        f"{h['connections']} closed-loop connections from {h['load_processes']} load processes on the same "
        f"machine; {h['windows_s']['measure']:.0f} s measured after {h['windows_s']['warmup']:.1f} s of "
        "warm-up. `tokens`: the reply holds the token list; `count`: only the count.",
        "",
        "| strategy | reply | req/s | ratio vs tiktoken | p50 ms | p90 ms | p99 ms | non-200 | checked | mismatches |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in h["runs"]:
        lat = r["latency"] or {}
        ms = {k: (lat[k] / 1000 if k in lat else None) for k in ("median_us", "p90_us", "p99_us")}
        lines.append(
            f"| {r['strategy']} | {r['mode']} | {_f(r['requests_per_s'], 0)} | "
            f"{_f(r.get('throughput_ratio_vs_tiktoken'))}x | {_f(ms['median_us'], 2)} | "
            f"{_f(ms['p90_us'], 2)} | {_f(ms['p99_us'], 2)} | {r['non_200']} | {r['checked']} | "
            f"{r['mismatches']} |"
        )
    return lines


def _sweep_tables(sweeps: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for fp in (sweeps.get("prefix_length") or {}).values():
        lines += _fixed_prefix_tables(fp, "Sweep: prefix length, suffix 100 chars")
    lines += _fixed_prefix_tables(
        sweeps.get("suffix_length"), "Sweep: suffix length, 32 KiB prefix"
    )
    bt = sweeps.get("backtrack_pieces") or {}
    if bt:
        lines += [
            "",
            "## Sweep: backtrack pieces (32 KiB prefix + 100 chars)",
            "",
            "| encoding | pieces | cut (chars from end) | median µs | ratio vs tiktoken | boundary mismatches |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for enc, rows in bt.items():
            for r in rows:
                if "rejected" in r:
                    lines.append(
                        f"| {enc} | {r['backtrack_pieces']} | rejected: {r['rejected'][:60]} | | | |"
                    )
                elif "raised_to" in r:
                    lines.append(
                        f"| {enc} | {r['backtrack_pieces']} | below the proof: uses "
                        f"{r['raised_to']} | | | |"
                    )
                else:
                    lines.append(
                        f"| {enc} | {r['backtrack_pieces']} | {r['cut_offset_from_end']} | "
                        f"{_f(r['stats'][workloads.FT_ENCODE]['median_us'])} | "
                        f"{_f(r['ratio_vs_tiktoken'][workloads.FT_ENCODE])}x | {r['boundary_mismatches']} |"
                    )
    l1 = sweeps.get("l1_size") or {}
    if l1.get("rows"):
        lines += [
            "",
            f"## Sweep: client L1 size (one process, {l1['requests']} requests, daemon holds every prefix)",
            "",
            "| l1_bytes | L1 hit rate | median µs | p90 µs | p99 µs |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in l1["rows"]:
            s = r["latency"]
            lines.append(
                f"| {r['l1_bytes']:,} | {r['l1_hit_rate']:.2f} | {_f(s['median_us'])} | "
                f"{_f(s['p90_us'])} | {_f(s['p99_us'])} |"
            )
    elif l1.get("skipped"):
        lines += ["", f"Sweep L1 size skipped: {l1['skipped']}"]
    return lines
