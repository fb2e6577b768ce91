"""Does the host's shared store pay for itself? The figures of the shared-store issue, measured.

    python -m benchmark.hoststore [--quick] [--json PATH] [--only first|changing|throughput|recycling]

1. A fresh worker's first request for a 32 KiB prefix the host holds (+ ~100 chars), against
   tiktoken on the whole text in the same process; again with the daemon SIGSTOPped. Each worker
   is a new process that has loaded its encoding and made its client (as a gunicorn worker's
   post_fork does); the request is its first for that prefix. With the client's defaults, the
   prefix is one of the host's hot ones, which the client took into its L1 when it started
   (``preload_bytes``); with ``preload_bytes=0`` the request reads it from the map.
2. Cold start and warm throughput, 1/2/4/8 worker processes over 200 Zipf-distributed prefixes
   of 4-64 KiB: a per-process dict of FixedPrefixTokenCache, the shared store (Client) with its
   default admission (``min_uses=2``: a prefix is cached on the host's second sight of it) and
   with ``min_uses=1`` (cached from the first), tiktoken. Three passes over the same requests:
   cold (fresh daemon, fresh workers), second (the shared store's second sights: admitted now)
   and warm (every strategy's caches hold what the requests use; it goes over the requests 5
   times, as one go takes ~30 ms). All workers start each pass together (a barrier per pass),
   so a pass's req/s, its slowest worker's, is that pass alone.
   A declared prefix that changes every request (a chat's whole history as ``prefix=``):
   the client against tiktoken on the whole text (the miss path must cost nothing).
3. Worker recycling (gunicorn ``--max-requests``): 4 worker slots, each worker replaced every
   50 requests by a fresh process (empty caches; the shared store's client takes the host's
   hot prefixes when it starts): throughput and p99, per strategy.
4. Host memory at 8 workers: the sum of PSS over the workers and the daemon (a shared mapping
   counts once, split between the processes that map it), per-process dict against shared store,
   each worker's read after a garbage collection and ``malloc_trim`` (its caches, not its freed
   buffers); beside it the floor, the same workers after one request each. Every worker is
   forked from a process that has loaded the encoding, the client and the shared ints (as
   gunicorn ``--preload``), so every strategy starts from the same floor.

Then each of the issue's targets: goal, measured, met or MISSED. Answers are checked against
tiktoken after the clock stops (every one of the first requests, one in eight of the throughput
and recycling runs'); a wrong id makes the run exit 1.

This module chooses the parts, reports them and checks the targets; the measurements themselves
(the worker processes and the daemons they run against) are benchmark/hostworkers.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from benchmark.hostworkers import (
    ENCODING,
    STRATEGIES,
    changing_prefix,
    first_request,
    hold,
    make_prefixes,
    make_text,
    recycling,
    throughput,
)
from benchmark.sidecar import Daemon

PARTS = ("first", "changing", "throughput", "recycling")
# The first request's clients: the defaults (hot prefixes preloaded), and the map read alone.
FIRSTS = (("first_request", {}), ("first_request_map", {"preload_bytes": 0}))
FIRST_KEYS = tuple(name + end for name, _ in FIRSTS for end in ("", "_frozen"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.hoststore", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer workers and requests")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument(
        "--only", choices=PARTS, action="append", help="run only this part (repeatable)"
    )
    args = parser.parse_args(argv)
    parts = args.only or PARTS
    seed = 20261202
    prefix = make_text(32 * 1024, seed)
    suffix = " User: summarise the above in two sentences, please, with one example each."
    results: dict[str, Any] = {"prefix_chars": len(prefix), "suffix_chars": len(suffix)}
    if "first" in parts:
        fresh = 3 if args.quick else 7
        with Daemon(encodings=(ENCODING,)) as daemon:
            hold(daemon, prefix)
            for frozen in (False, True):
                if frozen:
                    os.kill(daemon.pid, signal.SIGSTOP)
                try:
                    for name, options in FIRSTS:
                        key = name + ("_frozen" if frozen else "")
                        results[key] = first_request(daemon, prefix, suffix, fresh, **options)
                finally:
                    if frozen:
                        os.kill(daemon.pid, signal.SIGCONT)
    if "changing" in parts:
        with Daemon(encodings=(ENCODING,)) as daemon:
            results["changing_prefix"] = changing_prefix(
                daemon, 60 if args.quick else 150, 3 if args.quick else 5
            )
    prefixes = make_prefixes(200, seed)
    if "throughput" in parts:
        requests = 150 if args.quick else 400
        results["throughput"] = [
            throughput(w, prefixes, requests, seed)
            for w in ((1, 4) if args.quick else (1, 2, 4, 8))
        ]
    if "recycling" in parts:
        workers = 4
        results["recycling"] = recycling(workers, prefixes, 150 if args.quick else 400, 50, seed)
    results["wrong"] = _wrong(results)
    results["targets"] = targets(results)
    _print(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if results["wrong"] else 0


def _wrong(results: dict[str, Any]) -> int:
    firsts = (*FIRST_KEYS, "changing_prefix")
    wrong = sum(results[k]["wrong"] for k in firsts if k in results)
    rows = results.get("throughput", []) + (
        [results["recycling"]] if "recycling" in results else []
    )
    return wrong + sum(row[s]["wrong"] for row in rows for s in STRATEGIES)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The shared-store issue's figures: target, measured, met or missed."""
    out = []

    def check(name: str, measured: float, target: float, higher: bool, unit: str = "x") -> None:
        met = measured >= target if higher else measured <= target
        goal = f"{'>=' if higher else '<='} {target:g}{unit}"
        out.append({"target": name, "goal": goal, "measured": round(measured, 2), "met": met})

    for key, what in (("first_request", "preloaded"), ("first_request_map", "map read")):
        if key in results:
            check(
                f"fresh worker's first request vs tiktoken ({what})",
                results[key]["ratio_median"],
                15,
                True,
            )
            check(
                f"the same, daemon SIGSTOPped ({what})",
                results[key + "_frozen"]["ratio_median"],
                10,
                True,
            )
    if "changing_prefix" in results:
        check(
            "a prefix new every request vs tiktoken",
            results["changing_prefix"]["ratio_median"],
            0.95,
            True,
        )
    for row in results.get("throughput", []):
        w = row["workers"]
        if w >= 4:
            for s, how in (("shared", "default min_uses=2"), ("shared-m1", "min_uses=1")):
                check(
                    f"cold req/s shared ({how}) vs dict, {w} workers",
                    row[s]["cold_rps"] / row["dict"]["cold_rps"],
                    3,
                    True,
                )
            check(
                f"warm req/s shared vs dict, {w} workers (third pass)",
                row["shared"]["warm_rps"] / row["dict"]["warm_rps"],
                1,
                True,
            )
        if w == 8:
            check(
                "host PSS shared vs dict, 8 workers",
                row["shared"]["host_pss_mib"] / row["dict"]["host_pss_mib"],
                0.5,
                False,
            )
        if "daemon" in row and w == max(r["workers"] for r in results["throughput"]):
            check(
                f"daemon map bytes per stored token ({w} workers' run)",
                row["daemon"]["map_bytes_per_token"],
                5,
                False,
                " B",
            )
    return out


def _print(results: dict[str, Any]) -> None:
    for key in FIRST_KEYS:
        if key not in results:
            continue
        r = results[key]
        print(
            f"{key}: {r['ratio_median']:.1f}x tiktoken (range {r['ratio_min']:.1f}-"
            f"{r['ratio_max']:.1f}, {r['workers']} fresh workers; ours {r['ours_us_median']:.0f}"
            f" us, tiktoken {r['tiktoken_us_median']:.0f} us; from {'/'.join(r['sources'])}),"
            f" wrong {r['wrong']}"
        )
    if "changing_prefix" in results:
        r = results["changing_prefix"]
        print(
            f"changing_prefix: {r['ratio_median']:.2f}x tiktoken (range {r['ratio_min']:.2f}-"
            f"{r['ratio_max']:.2f}; {r['turns']} requests, each a new prefix of up to "
            f"{r['last_prefix_chars']} chars, {r['repetitions']} runs), wrong {r['wrong']}"
        )
    if "throughput" in results:
        print(
            "req/s over three passes: cold, second (the default admission caches a prefix on its"
            " second sight), warm"
        )
        print(
            "workers  strategy    cold req/s  second req/s  warm req/s  cold p99 ms  host PSS MiB  wrong"
        )
        for row in results["throughput"]:
            print(
                f"{row['workers']:>7}  floor: host PSS {row['floor_pss_mib']:.0f} MiB with every"
                " worker loaded and one request served (what no cache can save)"
            )
            for s in STRATEGIES:
                r = row[s]
                print(
                    f"{row['workers']:>7}  {s:10}  {r['cold_rps']:10.0f}  {r['second_rps']:12.0f}"
                    f"  {r['warm_rps']:10.0f}  {r['cold_p99_ms']:11.1f}  {r['host_pss_mib']:12.0f}"
                    f"  {r['wrong']:5}"
                )
            if "daemon" in row:
                d = row["daemon"]
                print(
                    f"         daemon: {d['stored_tokens']} tokens stored, map "
                    f"{d['map_bytes_per_token']:.1f} B/token, own PSS "
                    f"{d['daemon_pss_bytes_per_token']:.1f} B/token"
                )
    if "recycling" in results:
        row = results["recycling"]
        print(
            f"recycling ({row['workers']} workers, each replaced every {row['max_requests']} requests)"
        )
        for s in STRATEGIES:
            r = row[s]
            print(f"  {s:10}  {r['rps']:8.0f} req/s  p99 {r['p99_ms']:7.1f} ms  wrong {r['wrong']}")
    for t in results["targets"]:
        print(
            f"  {'met   ' if t['met'] else 'MISSED'}  {t['target']}: {t['measured']} (goal {t['goal']})"
        )
    print(f"wrong ids in all: {results['wrong']}")


if __name__ == "__main__":
    sys.exit(main())
