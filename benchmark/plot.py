"""Figures from results.json, a step apart from the measurements.

    python -m benchmark.plot benchmark/out/results.json [--out DIR]

matplotlib (Agg backend, no display) is imported here and nowhere else.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmark import workloads  # noqa: E402


def _wrap(label: str, width: int = 18) -> str:
    return textwrap.fill(label, width, break_long_words=False)


SMOOTH_TURNS = 9


def _rolling_median(values: list[float], window: int = SMOOTH_TURNS) -> list[float]:
    """Each point the median of the ``window`` turns around it: the trend, without the one-off
    spikes a busy machine puts into single timings (the raw values are in results.json)."""
    half = window // 2
    out = []
    for i in range(len(values)):
        part = sorted(values[max(0, i - half) : i + half + 1])
        out.append(part[len(part) // 2])
    return out


def _baseline_style(name: str) -> dict[str, Any] | None:
    """Baselines drawn apart from FlashToken's lines: tiktoken black or grey and dashed,
    the peers dotted; None for FlashToken's own (solid, in colour)."""
    if name.startswith("tiktoken"):
        second = name != "tiktoken"  # tiktoken timed again in another pass
        return {"color": "grey" if second else "black", "ls": "--" if second else "-", "lw": 1.6}
    if "(whole text)" in name:
        return {"ls": ":", "lw": 1.6}
    return None


def _per_turn_lines(ax: Any, xs: list[Any], series: dict[str, list[float]]) -> None:
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for name, us in series.items():
        style = _baseline_style(name) or {"lw": 1.4}
        style.setdefault("color", next(colours))
        ax.plot(xs[: len(us)], _rolling_median(us), label=name, **style)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def speedup_vs_prefix(results: dict[str, Any], out: Path) -> Path | None:
    sweep = results.get("sweeps", {}).get("prefix_length") or {}
    if not sweep:
        return None
    fig, ax = plt.subplots(figsize=(11, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (enc, fp) in enumerate(sweep.items()):
        # Per encoding, one colour: FlashToken's best list path and best count (any backend),
        # and the fastest peer on the whole text, each the best of its kind at each size.
        xs = [c["prefix_kib"] for c in fp["cells"]]
        colour = colours[i % len(colours)]
        for kind, style, label in (
            ("list", "-o", "FlashToken, best list path"),
            ("count", "--s", "FlashToken, best count"),
            ("peer list", ":^", "fastest peer, whole text"),
        ):
            ys = []
            for c in fp["cells"]:
                names = [n for n, k in c.get("kinds", {}).items() if k == kind]
                ys.append(max((c["ratio_vs_tiktoken"][n] for n in names), default=float("nan")))
            if any(y == y for y in ys):
                ax.plot(xs, ys, style, color=colour, label=f"{label} ({enc})")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({c["prefix_kib"] for fp in sweep.values() for c in fp["cells"]})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("prefix length (KiB of text)")
    ax.set_ylabel("speed-up over tiktoken (x, median)")
    ax.set_title(
        "Fixed prefix + ~100-char suffix: speed-up over tiktoken vs prefix length\n"
        "(best over backends at each size; the strategies one by one are in details.md)",
        fontsize=10,
    )
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, out / "speedup_vs_prefix_length.png")


def chat_latency(results: dict[str, Any], out: Path) -> Path | None:
    chat = results.get("workloads", {}).get("chat")
    if not chat:
        return None
    fig, ax = plt.subplots(figsize=(11, 5))
    turns = chat["per_turn_median_us"]
    _per_turn_lines(ax, list(range(1, max(map(len, turns.values())) + 1)), turns)
    ax.set_yscale("log")
    ax.set_xlabel("turn")
    ax.set_ylabel(f"latency per turn (µs, log; rolling median of {SMOOTH_TURNS} turns)")
    ax.set_title(
        f"{chat['turns']}-turn chat ({chat['encoding']}): per-turn cost vs history "
        f"(ends at {chat['history_tokens'][-1]:,} tokens)\n"
        "tiktoken solid black, the peers dotted: both re-encode the whole history each turn",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, out / "chat_per_turn_latency.png")


def _runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    return (results.get("workloads", {}).get("multiworker") or {}).get("runs", [])


def throughput(results: dict[str, Any], out: Path) -> Path | None:
    runs = _runs(results)
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(10, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, strategy in enumerate(dict.fromkeys(r["strategy"] for r in runs)):
        rs = [r for r in runs if r["strategy"] == strategy]
        colour = colours[i % len(colours)]
        xs = [r["workers"] for r in rs]
        ax.plot(xs, [r["requests_per_s"] for r in rs], "-o", color=colour, label=strategy)
        ax.plot(xs, [r["cold_requests_per_s"] for r in rs], ":x", color=colour, alpha=0.7)
    # One entry per strategy (its colour), and one per line style.
    ax.plot([], [], "-o", color="black", label="steady state (caches warm)")
    ax.plot([], [], ":x", color="black", alpha=0.7, label="cold start (caches empty)")
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["workers"] for r in runs})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("worker processes")
    ax.set_ylabel("aggregate throughput (requests/s, log)")
    ax.set_title(
        f"Multi-worker throughput, {results['machine']['cores']} cores\n"
        "a colour per strategy; solid: steady state, dotted: cold start",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, out / "multiworker_throughput.png")


def _reference_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    counts = sorted({r["workers"] for r in runs})
    n = 4 if 4 in counts else counts[-1]
    return [r for r in runs if r["workers"] == n]


def latency_percentiles(results: dict[str, Any], out: Path) -> Path | None:
    runs = _runs(results)
    if not runs:
        return None
    chosen = _reference_runs(runs)
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.25
    for i, (key, label) in enumerate((("median_us", "p50"), ("p90_us", "p90"), ("p99_us", "p99"))):
        ax.bar(
            [j + (i - 1) * width for j in range(len(chosen))],
            [r["latency"][key] for r in chosen],
            width,
            label=label,
        )
    ax.set_xticks(range(len(chosen)), [_wrap(r["strategy"]) for r in chosen], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("request latency (µs, log)")
    ax.set_title(f"Latency percentiles, {chosen[0]['workers']} workers")
    ax.legend()
    ax.grid(True, axis="y", which="both", alpha=0.3)
    return _save(fig, out / "latency_percentiles.png")


def memory(results: dict[str, Any], out: Path) -> Path | None:
    """The host's memory per strategy at the largest worker count: every worker's PSS plus the
    daemon's, stacked, so the bar is the host's total with a shared page counted once."""
    runs = _runs(results)
    if not runs:
        return None
    most = max(r["workers"] for r in runs)
    chosen = [r for r in runs if r["workers"] == most]
    if not all(r.get("host_pss_mib") is not None for r in chosen):
        return None  # results.json from before PSS was measured, or no /proc
    labels = [_wrap(r["strategy"]) for r in chosen]
    workers = [sum(r["pss_kib_per_worker"]) / 1024 for r in chosen]
    daemon = [(r.get("daemon_pss_kib") or 0) / 1024 for r in chosen]
    rss_sum = [
        (sum(r.get("rss_kib_per_worker") or []) + (r.get("daemon_rss_kib") or 0)) / 1024
        for r in chosen
    ]
    fig, ax = plt.subplots(figsize=(10, 5))
    xs = list(range(len(labels)))
    ax.bar(xs, workers, 0.55, color="tab:blue", label=f"the {most} workers' PSS, summed")
    ax.bar(xs, daemon, 0.55, bottom=workers, color="tab:orange", label="the daemon's PSS")
    for x, r in zip(xs, chosen, strict=True):
        # Inside the bar's top, clear of the RSS marker above it.
        ax.text(
            x,
            r["host_pss_mib"] * 0.97,
            f"{r['host_pss_mib']:.0f}",
            ha="center",
            va="top",
            color="white",
            fontweight="bold",
        )
    ax.plot(
        xs,
        rss_sum,
        "kx",
        markersize=8,
        label="sum of RSS, for comparison (a shared page counted in every process)",
    )
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylabel("host memory (MiB)")
    ax.set_title(
        f"Host memory per strategy, {most} workers + the daemon: the bar is the host's total\n"
        "(PSS: a page shared by n processes counts 1/n in each, so the sum counts it once; "
        "measured at one moment, all alive)",
        fontsize=9,
    )
    ax.set_ylim(0, 1.25 * max(rss_sum + [r["host_pss_mib"] for r in chosen] + [1]))
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, out / "memory_per_strategy.png")


def heatmap(results: dict[str, Any], out: Path) -> Path | None:
    """Two panels, log colour scale: over tiktoken, and FlashToken's best over the fastest peer."""
    from matplotlib.colors import LogNorm

    from benchmark import headline

    fp = results.get("workloads", {}).get("fixed_prefix")
    if not fp or not fp.get("cells"):
        return None
    pks = sorted({c["prefix_kib"] for c in fp["cells"]})
    sks = sorted({c["suffix_chars"] for c in fp["cells"]})
    bad = headline.inexact_tools(results, "fixed_prefix")
    vs_tiktoken = [[float("nan")] * len(sks) for _ in pks]
    vs_peer = [[float("nan")] * len(sks) for _ in pks]
    for c in fp["cells"]:
        i, j = pks.index(c["prefix_kib"]), sks.index(c["suffix_chars"])
        vs_tiktoken[i][j] = c["ratio_vs_tiktoken"][workloads.FT_ENCODE]
        ours, theirs = headline._forms(c, "list")
        best = headline._best(c["stats"], ours)
        peer = headline._fastest(c["stats"], theirs, bad)
        if best and peer:
            vs_peer[i][j] = peer[1] / best[1]
    panels = [
        (vs_tiktoken, f"{workloads.FT_ENCODE} (tiktoken backend)\nover tiktoken"),
        (vs_peer, "FlashToken's best list path (any backend)\nover the fastest exact peer"),
    ]
    panels = [(g, t) for g, t in panels if any(v == v for row in g for v in row)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (grid, title) in zip(axes[0], panels, strict=False):
        values = [v for row in grid for v in row if v == v and v > 0]
        norm = LogNorm(vmin=min(values + [1]), vmax=max(values + [1.01]))
        im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower", norm=norm)
        for i in range(len(pks)):
            for j in range(len(sks)):
                v = grid[i][j]
                colour = "white" if v == v and norm(v) < 0.6 else "black"
                ax.text(j, i, f"{v:.1f}x", ha="center", va="center", color=colour, fontsize=8)
        ax.set_xticks(range(len(sks)), [str(s) for s in sks])
        ax.set_yticks(range(len(pks)), [str(p) for p in pks])
        ax.set_xlabel("suffix length (characters)")
        ax.set_ylabel("prefix length (KiB)")
        ax.set_title(f"{title} ({fp['encoding']})", fontsize=9)
        fig.colorbar(im, ax=ax, label="speed-up (x, log scale)")
    return _save(fig, out / "fixed_prefix_heatmap.png")


def http_e2e(results: dict[str, Any], out: Path) -> Path | None:
    h = results.get("workloads", {}).get("http_e2e") or {}
    runs = h.get("runs") or []
    if not runs:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    labels = [f"{r['strategy_key']}\n({r['mode']})" for r in runs]
    colors = ["tab:grey" if r["strategy_key"] == "tiktoken" else "tab:blue" for r in runs]
    xs = range(len(runs))
    left.bar(xs, [r["requests_per_s"] for r in runs], color=colors)
    for x, r in zip(xs, runs, strict=False):
        ratio = r.get("throughput_ratio_vs_tiktoken")
        if ratio:
            left.text(x, r["requests_per_s"], f"{ratio:.1f}x", ha="center", va="bottom", fontsize=8)
    left.set_xticks(list(xs), labels, fontsize=8)
    left.set_ylabel("requests/s (all workers)")
    left.set_title("Throughput (labels: x tiktoken with the same reply)", fontsize=10)
    width = 0.4
    for i, (key, label) in enumerate((("median_us", "p50"), ("p99_us", "p99"))):
        right.bar(
            [x + (i - 0.5) * width for x in xs],
            [(r["latency"] or {}).get(key, 0) / 1000 for r in runs],
            width,
            label=label,
        )
    right.set_xticks(list(xs), labels, fontsize=8)
    right.set_ylabel("request latency (ms)")
    right.set_title("Latency")
    right.legend()
    fig.suptitle(
        f"HTTP end to end: gunicorn, {h['workers']} workers, {h['prefix_kib']} KiB system prompts, "
        f"{h['connections']} connections",
        fontsize=10,
    )
    return _save(fig, out / "http_e2e.png")


def auto_chat_latency(results: dict[str, Any], out: Path) -> Path | None:
    ac = results.get("workloads", {}).get("auto_chat")
    if not ac or "per_turn_median_us" not in ac:
        return None
    fig, ax = plt.subplots(figsize=(11, 5))
    _per_turn_lines(ax, ac["history_tokens"], ac["per_turn_median_us"])
    ax.set_yscale("log")
    ax.set_xlabel("history length (tokens)")
    ax.set_ylabel(f"latency per turn (µs, log; rolling median of {SMOOTH_TURNS} turns)")
    ax.set_title(
        "Automatic reuse: chat over 4 workers, per-turn cost vs history\n"
        "The conversation is played twice, once per FlashToken API, with tiktoken timed beside "
        "each:\nsolid black beside the automatic API, dashed grey beside the declared prefix",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, out / "auto_chat_per_turn_latency.png")


def draw(results_path: Path, out: Path | None = None) -> list[Path]:
    """Every figure results.json has data for; returns the files written."""
    results = json.loads(Path(results_path).read_text())
    out = Path(results_path).parent if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fn in (
        speedup_vs_prefix,
        chat_latency,
        throughput,
        latency_percentiles,
        memory,
        heatmap,
        http_e2e,
        auto_chat_latency,
    ):
        path = fn(results, out)
        if path is not None:
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.plot", description=__doc__.splitlines()[0]
    )
    parser.add_argument("results", type=Path, help="results.json written by python -m benchmark")
    parser.add_argument(
        "--out", type=Path, default=None, help="directory for the PNGs (default: next to results)"
    )
    args = parser.parse_args(argv)
    for path in draw(args.results, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
