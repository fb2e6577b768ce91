"""Sweeps: one parameter varied, the rest fixed. (The worker-count sweep is ``multiworker``.)"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import flashtoken
from benchmark import corpus, multiworker, sidecar, timing, workloads
from benchmark.config import KiB, Settings
from benchmark.correctness import TRICKY, Checker

Progress = Callable[[str], None]


def prefix_length(settings: Settings, checker: Checker, progress: Progress) -> dict[str, Any]:
    """Speed-up against prefix length (suffix ~100 characters), for each encoding."""
    return {
        name: workloads.fixed_prefix(
            settings,
            checker,
            progress,
            None,
            name,
            settings.sweep_prefix_kib,
            (100,),
            scope="sweep prefix_length",
        )
        for name in settings.encodings
    }


def suffix_length(settings: Settings, checker: Checker, progress: Progress) -> dict[str, Any]:
    """Speed-up against suffix length on a 32 KiB prefix: the suffix's own encode dominates."""
    return workloads.fixed_prefix(
        settings,
        checker,
        progress,
        None,
        settings.encodings[0],
        (32,),
        settings.sweep_suffix_chars,
        scope="sweep suffix_length",
    )


def backtrack_pieces(settings: Settings, checker: Checker, progress: Progress) -> dict[str, Any]:
    """Cost and exactness against the number of regex pieces re-encoded before the join."""
    out: dict[str, Any] = {}
    for name in settings.encodings:
        enc = flashtoken.get_encoding(name)
        rng = random.Random(settings.seed + 5)
        prefix = corpus.system_prompt(32 * KiB, rng)
        suffixes = [corpus.suffix(100, rng) for _ in range(8)]
        rows = []
        for k in settings.sweep_backtrack:
            try:
                cache = flashtoken.FixedPrefixTokenCache(enc, prefix, backtrack_pieces=k)
            except ValueError as exc:
                rows.append({"backtrack_pieces": k, "rejected": str(exc)})
                continue
            if cache.backtrack_pieces != k:  # below the proof: the cache uses the proven minimum
                rows.append({"backtrack_pieces": k, "raised_to": cache.backtrack_pieces})
                continue
            before = _mismatches(checker)
            for text in TRICKY:
                lead = corpus.slice_of(rng, 200)
                for i in range(len(text) + 1):
                    p, s = lead + text[:i], text[i:]
                    got = flashtoken.FixedPrefixTokenCache(
                        enc, p, backtrack_pieces=k
                    ).encode_ordinary(s)
                    checker.check(
                        f"sweep backtrack_pieces={k}: FixedPrefixTokenCache.encode_ordinary",
                        got,
                        enc.encode_ordinary(p + s),
                        f"{name} {p[-20:]!r}|{s!r}",
                    )
            it = iter(range(1 << 62))
            fns = {
                workloads.TIKTOKEN: lambda: enc.encode_ordinary(prefix + suffixes[next(it) % 8]),
                workloads.FT_ENCODE: lambda: cache.encode_ordinary(suffixes[next(it) % 8]),
            }
            stats = {
                n: timing.summarize(xs)
                for n, xs in timing.interleaved(
                    fns,
                    warmup=settings.warmup,
                    min_reps=settings.min_reps,
                    max_reps=settings.max_reps,
                    budget_s=settings.cell_budget_s,
                ).items()
            }
            rows.append(
                {
                    "backtrack_pieces": k,
                    "cut_offset_from_end": len(prefix) - cache.cut,
                    "stats": stats,
                    "ratio_vs_tiktoken": timing.ratios(stats, workloads.TIKTOKEN),
                    "boundary_mismatches": _mismatches(checker) - before,
                }
            )
        out[name] = rows
        progress(f"sweep backtrack_pieces: {name}: {[r['backtrack_pieces'] for r in rows]}")
    return out


def _mismatches(checker: Checker) -> int:
    return sum(e["mismatches"] for e in checker.by_strategy.values() if e["kind"] == "flashtoken")


def l1_size(
    settings: Settings, checker: Checker, progress: Progress, daemon_skip: str | None
) -> dict[str, Any]:
    """One process, many prefixes (Zipf): the client's L1 budget against hit rate and latency."""
    if daemon_skip:
        return {"skipped": daemon_skip}
    encoding = settings.encodings[0]
    enc = flashtoken.get_encoding(encoding)
    args = {
        "seed": settings.seed,
        "prefix_kib": settings.mw_prefix_kib,
        "prefixes": settings.mw_prefixes,
        "worker": 0,
        "zipf_s": settings.mw_zipf_s,
    }
    prefixes, suffixes, picks = multiworker._inputs(args)
    n = settings.sweep_l1_requests
    rows = []
    with sidecar.Daemon(encodings=(encoding,)) as daemon:
        filler = sidecar.make_client(daemon.address, encoding, l1_bytes=0)
        try:
            for p in sorted(set(picks[:n])):  # the daemon holds every prefix: L2 always hits
                sidecar.warm(filler, prefixes[p])
        finally:
            filler.close()
        for budget in settings.sweep_l1_bytes:
            client = sidecar.make_client(daemon.address, encoding, l1_bytes=budget)
            try:
                for i in range(n):  # one pass to fill L1, not measured
                    client.encode_ordinary(suffixes[i % len(suffixes)], prefix=prefixes[picks[i]])
                before = sidecar.client_stats(client)
                samples = []
                for i in range(n):
                    p, s = prefixes[picks[i]], suffixes[i % len(suffixes)]
                    t0 = time.perf_counter_ns()
                    got = client.encode_ordinary(s, prefix=p)
                    samples.append(time.perf_counter_ns() - t0)
                    if i % 10 == 0:
                        checker.check(
                            "sweep l1_size: Client.encode_ordinary",
                            got,
                            enc.encode_ordinary(p + s),
                            f"l1_bytes={budget} request {i}",
                        )
                after = sidecar.client_stats(client)
            finally:
                client.close()
            delta = {
                k: after.get(k, 0) - before.get(k, 0)
                for k in after
                if isinstance(after.get(k), int)
            }
            hits = delta.get("l1_hits", 0)
            rows.append(
                {
                    "l1_bytes": budget,
                    "latency": timing.summarize(samples),
                    "l1_hit_rate": hits / n,
                    "client_stats_delta": delta,
                }
            )
            progress(
                f"sweep l1_size: {budget} bytes: L1 hit rate {hits / n:.2f}, "
                f"median {rows[-1]['latency']['median_us']:.0f} us"
            )
        rows_daemon = {"rss_kib": daemon.rss_kib()}
    return {"encoding": encoding, "requests": n, "rows": rows, "daemon": rows_daemon}
