"""The figures plot.py draws from results.json: each with the one line the reports print for
it, and what it needs in results.json (a figure is drawn only when its data is there)."""

from __future__ import annotations

from typing import Any

__all__ = ["FIGURES", "drawn_figures"]

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
