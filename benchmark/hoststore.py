"""Does the host's shared store pay for itself? The figures of the shared-store issue, measured.

    python -m benchmark.hoststore [--quick] [--json PATH]

1. A fresh worker's first request for a 32 KiB prefix the host holds (+ ~100 chars), against
   tiktoken on the whole text in the same process; again with the daemon SIGSTOPped. Each worker
   is a new process that has loaded its encoding and made its client (as a gunicorn worker's
   post_fork does); the request is its first for that prefix.
2. Cold start and warm throughput, 1/2/4/8 worker processes over 200 Zipf-distributed prefixes
   of 4-64 KiB: a per-process dict of FixedPrefixTokenCache, the shared store (Client), tiktoken.
   Cold: fresh daemon, fresh workers, the first requests; warm: the same workers again.
3. Worker recycling (gunicorn ``--max-requests``): each worker replaced every N requests.
4. Host memory at 8 workers: the sum of PSS over the workers and the daemon (a shared mapping
   counts once, split between the processes that map it), per-process dict against shared store.

Answers are checked against tiktoken after the clock stops (every one of the first requests, one
in eight of the throughput runs'); a wrong id makes the run exit 1.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any

from benchmark.sidecar import Daemon

ENCODING = "cl100k_base"
SENTENCES = [
    "You are a careful assistant. Answer in full sentences and cite your sources.",
    "The quarterly report shows revenue of 1,234,567 dollars, up 12% from last year.",
    "def handler(request):\n    return {'status': 200, 'body': request.json()}\n",
    "Les modèles de langue découpent le texte en jetons avant de le traiter.",
    "注意：请用简体中文回答，并在结尾给出总结。",
]


def _text(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    while sum(map(len, out)) < chars:
        out.append(rng.choice(SENTENCES) + " ")
    return "".join(out)[:chars]


def _prefixes(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"[{i}] " + _text(rng.randint(4, 64) * 1024, seed + i) for i in range(count)]


def _pss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


# -- 1. a fresh worker's first request ----------------------------------------------------------

FIRST_REQUEST = textwrap.dedent(
    """
    import json, sys, time
    from flashtoken import get_encoding
    from flashtoken.encodings import encoding_id
    from flashtoken.client import Client
    address, name, prefix, suffix = json.loads(sys.stdin.read())
    enc = get_encoding(name)
    encoding_id(enc)  # the worker's start-up, not its request
    enc.encode_ordinary(prefix[::-1])  # tiktoken warmed on another text of the same size
    client = Client(address=address, encoding=name)
    start = time.perf_counter()
    tokens = client.encode_ordinary(suffix, prefix=prefix)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    expected = enc.encode_ordinary(prefix + suffix)
    theirs = time.perf_counter() - start
    print(json.dumps({"ours": ours, "tiktoken": theirs, "exact": tokens == expected,
                      "stats": client.stats()}))
    client.close()
    """
)


def first_request(daemon: Daemon, prefix: str, suffix: str, workers: int) -> dict[str, Any]:
    runs = []
    for _ in range(workers):
        done = subprocess.run(
            [sys.executable, "-c", FIRST_REQUEST],
            input=json.dumps([daemon.address, ENCODING, prefix, suffix]),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        runs.append(json.loads(done.stdout))
    ratios = [r["tiktoken"] / r["ours"] for r in runs]
    return {
        "workers": workers,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ours_us_median": statistics.median(r["ours"] for r in runs) * 1e6,
        "tiktoken_us_median": statistics.median(r["tiktoken"] for r in runs) * 1e6,
        "wrong": sum(not r["exact"] for r in runs),
        "last_stats": runs[-1]["stats"],
    }


def _hold(daemon: Daemon, prefix: str) -> None:
    """Make the daemon hold ``prefix`` (the host has it)."""
    from benchmark.sidecar import make_client, warm

    client = make_client(daemon.address, ENCODING)
    try:
        if not warm(client, prefix, 30):
            raise RuntimeError("the daemon never held the prefix")
    finally:
        client.close()


# -- 2.-4. worker processes --------------------------------------------------------------------


def _worker(spec: dict[str, Any], barrier: Any, out: Any) -> None:
    from flashtoken import FixedPrefixTokenCache, get_encoding
    from flashtoken.encodings import encoding_id

    enc = get_encoding(ENCODING)
    encoding_id(enc)
    prefixes, order, suffixes = spec["prefixes"], spec["order"], spec["suffixes"]
    strategy = spec["strategy"]
    client = None
    if strategy == "shared":
        from flashtoken.client import Client

        client = Client(address=spec["address"], encoding=ENCODING)
        call = lambda p, s: client.encode_ordinary(s, prefix=p)  # noqa: E731
    elif strategy == "dict":
        caches: dict[str, FixedPrefixTokenCache] = {}

        def call(p: str, s: str) -> list[int]:
            cache = caches.get(p)
            if cache is None:
                cache = caches[p] = FixedPrefixTokenCache(enc, p)
            return cache.encode_ordinary(s)
    else:
        call = lambda p, s: enc.encode_ordinary(p + s)  # noqa: E731
    barrier.wait()
    phases, latencies, kept = [], [], []
    for phase in range(2):  # cold, then warm
        start = time.perf_counter()
        for n, i in enumerate(order):
            t = time.perf_counter()
            tokens = call(prefixes[i], suffixes[i])
            latencies.append(time.perf_counter() - t)
            if n % 8 == phase:  # checked after the clock stops: a sample of either phase
                kept.append((i, tokens))
        phases.append(time.perf_counter() - start)
    pss = _pss_kib()
    wrong = sum(tokens != enc.encode_ordinary(prefixes[i] + suffixes[i]) for i, tokens in kept)
    out.put({"phases": phases, "latencies": latencies, "wrong": wrong, "pss_kib": pss})
    if client is not None:
        client.close()


def _run_workers(
    strategy: str, workers: int, prefixes: list[str], requests: int, seed: int,
    address: str | None,
) -> list[dict[str, Any]]:  # fmt: skip
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(workers), ctx.Queue()
    weights = [1 / (k + 1) ** 1.1 for k in range(len(prefixes))]
    procs = []
    for w in range(workers):
        rng = random.Random(seed + w)
        order = rng.choices(range(len(prefixes)), weights, k=requests)
        suffixes = {i: f" Question {w}-{i}: what does section {i} say?" for i in set(order)}
        spec = {"strategy": strategy, "prefixes": prefixes, "order": order,
                "suffixes": suffixes, "address": address}  # fmt: skip
        procs.append(ctx.Process(target=_worker, args=(spec, barrier, out)))
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return results


def throughput(workers: int, prefixes: list[str], requests: int, seed: int) -> dict[str, Any]:
    row: dict[str, Any] = {"workers": workers}
    for strategy in ("tiktoken", "dict", "shared"):
        daemon = Daemon(encodings=(ENCODING,)) if strategy == "shared" else None
        with daemon or _nothing():
            address = daemon.address if daemon else None
            results = _run_workers(strategy, workers, prefixes, requests, seed, address)
            total = workers * requests
            cold = total / max(r["phases"][0] for r in results)
            warm = total / max(r["phases"][1] for r in results)
            lat = sorted(x for r in results for x in r["latencies"][:requests])
            pss = sum(r["pss_kib"] for r in results) + (_pss_kib(daemon.pid) if daemon else 0)
            row[strategy] = {
                "cold_rps": cold,
                "warm_rps": warm,
                "cold_p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3,
                "host_pss_mib": pss / 1024,
                "wrong": sum(r["wrong"] for r in results),
            }
    return row


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.hoststore", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer workers and requests")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    seed = 20261202
    prefix = _text(32 * 1024, seed)
    suffix = " User: summarise the above in two sentences, please, with one example each."
    results: dict[str, Any] = {"prefix_chars": len(prefix), "suffix_chars": len(suffix)}
    with Daemon(encodings=(ENCODING,)) as daemon:
        _hold(daemon, prefix)
        results["first_request"] = first_request(daemon, prefix, suffix, 3 if args.quick else 7)
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            results["first_request_frozen"] = first_request(
                daemon, prefix, suffix, 3 if args.quick else 7
            )
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
    prefixes = _prefixes(200, seed)
    requests = 150 if args.quick else 400
    results["throughput"] = [
        throughput(w, prefixes, requests, seed) for w in ((1, 4) if args.quick else (1, 2, 4, 8))
    ]
    wrong = results["first_request"]["wrong"] + results["first_request_frozen"]["wrong"]
    wrong += sum(row[s]["wrong"] for row in results["throughput"] for s in ("dict", "shared"))
    results["wrong"] = wrong
    _print(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if wrong else 0


def _print(results: dict[str, Any]) -> None:
    for key in ("first_request", "first_request_frozen"):
        r = results[key]
        print(
            f"{key}: {r['ratio_median']:.1f}x tiktoken (range {r['ratio_min']:.1f}-"
            f"{r['ratio_max']:.1f}, {r['workers']} fresh workers; ours {r['ours_us_median']:.0f}"
            f" us, tiktoken {r['tiktoken_us_median']:.0f} us), wrong {r['wrong']}"
        )
    print("workers  strategy  cold req/s  warm req/s  cold p99 ms  host PSS MiB  wrong")
    for row in results["throughput"]:
        for s in ("tiktoken", "dict", "shared"):
            r = row[s]
            print(
                f"{row['workers']:>7}  {s:8}  {r['cold_rps']:10.0f}  {r['warm_rps']:10.0f}  "
                f"{r['cold_p99_ms']:11.1f}  {r['host_pss_mib']:12.0f}  {r['wrong']:5}"
            )
    print(f"wrong ids in all: {results['wrong']}")


if __name__ == "__main__":
    sys.exit(main())
