"""details.md: every measurement of a run as tables, after the headline's own lines with their
noise (summary.md, report.py, is the one screen before it)."""

from __future__ import annotations

import math
from typing import Any

from benchmark import auto_chat, workloads
from benchmark.auto_chat import WORKERS
from benchmark.figures import FIGURES, drawn_figures
from benchmark.headline import verdict_line

__all__ = ["details", "number"]


def number(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


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
                f"| {name} | {number(s['median_us'])} | {number(s['p90_us'])} | {number(s['p99_us'])} | "
                f"{number(cell['ratio_vs_tiktoken'][name])}x |"
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
            f"| {name} | {number(total)} | {number(chat['total_ratio_vs_tiktoken'][name])}x | {number(s['median_us'])} "
            f"| {number(s['p90_us'])} | {number(s['p99_us'])} | {number(chat['flatness_last_over_first'][name], 2)} |"
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
        f"{number(mem['bytes_per_distinct_token'], 2)} bytes a token, "
        f"**{number(mem['ratio_vs_4_bytes_per_token'], 2)}x** 4 bytes a token.",
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
            f"| {name} | {number(s['median_us'])} | {number(s['p90_us'])} | {number(s['p99_us'])} | "
            f"{number(data['total_ms'][name])} | {number(data['total_ratio_vs_tiktoken'][name])}x |"
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
            f"| {r['strategy']} | {r['workers']} | {number(r['requests_per_s'], 0)} | "
            f"{number(r['throughput_ratio_vs_tiktoken'])}x | {number(r['cold_requests_per_s'], 0)} | "
            f"{number(lat['median_us'])} | {number(lat['p90_us'])} | {number(lat['p99_us'])} | "
            f"{number(r.get('host_pss_mib'), 0)} | {number(r['rss_mib_median_worker'])} | "
            f"{number(d / 1024 if d else None)} |"
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
            f"| {r['strategy']} | {r['mode']} | {number(r['requests_per_s'], 0)} | "
            f"{number(r.get('throughput_ratio_vs_tiktoken'))}x | {number(ms['median_us'], 2)} | "
            f"{number(ms['p90_us'], 2)} | {number(ms['p99_us'], 2)} | {r['non_200']} | {r['checked']} | "
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
                        f"{number(r['stats'][workloads.FT_ENCODE]['median_us'])} | "
                        f"{number(r['ratio_vs_tiktoken'][workloads.FT_ENCODE])}x | {r['boundary_mismatches']} |"
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
                f"| {r['l1_bytes']:,} | {r['l1_hit_rate']:.2f} | {number(s['median_us'])} | "
                f"{number(s['p90_us'])} | {number(s['p99_us'])} |"
            )
    elif l1.get("skipped"):
        lines += ["", f"Sweep L1 size skipped: {l1['skipped']}"]
    return lines
