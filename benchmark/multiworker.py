"""Multi-worker throughput: one OS process per worker, like gunicorn or uvicorn workers.

Workers are started with multiprocessing's *spawn* (a fresh interpreter each, nothing inherited),
build their inputs, then wait on a barrier so they all start together. Then each worker:

- cold window (``mw_cold_s``): requests back to back with every cache empty (a fresh daemon, empty
  in-process caches, FlashToken's one-time tables not built yet); what every tokenizer pays once
  per process is paid before it (FlashToken's backend gate, a peer's first call);
- primes its cache with one request per distinct prefix (not timed), then waits on the barrier
  again, so the measured window starts with every worker's caches as full as their bounds allow;
- warm-up window (``mw_warmup_s``): not reported;
- measured window (``mw_measure_s``): the steady-state figures.

Requests draw a prefix from ``mw_prefixes`` distinct system prompts (Zipf popularity, 4-64 KiB,
size independent of rank) and a short user suffix. A sample of responses is checked against
tiktoken after the measured window, outside the timing.

Memory: after the windows every worker reports and then waits, still alive, while the parent
reads the PSS of all of them and of the daemon at one moment. PSS splits a shared page among
the processes that map it, so their sum, the host's total, counts the daemon's map (and the
pages inherited from a common parent) once; a worker that measured itself after another had
exited would count that worker's share as its own.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import random
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from benchmark import corpus, sidecar, timing
from benchmark.config import KiB, Settings

TIKTOKEN = "tiktoken per request"
LOCAL = "FixedPrefixTokenCache per process (LRU dict)"
DAEMON = "shared daemon via Client (L1 + L2)"
LOCAL_FAST = f"{LOCAL} [backend=fastest]"
DAEMON_FAST = f"{DAEMON} [backend=fastest]"  # the Client's and the daemon's backend
_CHECK_EVERY = 97
_CHECK_MAX = 40


def _inputs(args: dict[str, Any]) -> tuple[list[str], list[str], list[int]]:
    rng = random.Random(args["seed"])
    lo, hi = args["prefix_kib"]
    prefixes = [
        corpus.system_prompt(rng.randint(lo * KiB, hi * KiB), rng, tenant=i + 1)
        for i in range(args["prefixes"])
    ]
    suffixes = [corpus.suffix(rng.randint(40, 200), rng) for _ in range(64)]
    order = list(range(args["prefixes"]))
    rng.shuffle(order)  # popularity rank independent of prefix size
    wrng = random.Random(args["seed"] * 1000 + args["worker"])
    picks = [order[i] for i in corpus.zipf_indices(wrng, args["prefixes"], 20000, args["zipf_s"])]
    return prefixes, suffixes, picks


def _strategy(
    args: dict[str, Any], enc: Any
) -> tuple[Callable[[str, str], list[int]], Callable[[], dict]]:
    import flashtoken
    from benchmark import baselines

    if args["strategy"] == TIKTOKEN:
        return (lambda p, s: enc.encode_ordinary(p + s)), dict
    if args["strategy"] not in (LOCAL, LOCAL_FAST, DAEMON, DAEMON_FAST):
        peer = baselines.peer_named(args["encoding"], args["strategy"])
        if peer is None:
            raise ValueError(f"no strategy or installed peer called {args['strategy']!r}")
        whole = peer.encode_ordinary
        # A start-up cost, before the cold window, like FlashToken's gate below: gigatoken
        # builds its tables on its first call (~0.7 s here), which outlasted the quick run's
        # cold window and showed as 0 cold req/s.
        whole("a text of no prefix: the tokenizer's first call")
        return (lambda p, s: whole(p + s)), dict
    if args["strategy"] in (LOCAL, LOCAL_FAST):
        backend = "fastest" if args["strategy"] == LOCAL_FAST else "tiktoken"
        from flashtoken.backends import get_encoder

        get_encoder(enc, backend)  # the load-time gate: a start-up cost, before the cold window
        caches: OrderedDict[str, Any] = OrderedDict()
        cap = args["local_entries"]
        counters = {"hits": 0, "misses": 0}

        def local(p: str, s: str) -> list[int]:
            cache = caches.get(p)
            if cache is None:
                counters["misses"] += 1
                cache = caches[p] = flashtoken.FixedPrefixTokenCache(enc, p, backend=backend)
                if len(caches) > cap:
                    caches.popitem(last=False)
            else:
                counters["hits"] += 1
                caches.move_to_end(p)
            return cache.encode_ordinary(s)

        return local, lambda: dict(counters, entries=len(caches))
    backend = "fastest" if args["strategy"] == DAEMON_FAST else "tiktoken"
    client = sidecar.make_client(args["address"], args["encoding"], backend=backend)
    return (lambda p, s: client.encode_ordinary(s, prefix=p)), lambda: sidecar.client_stats(client)


def _window(
    encode: Callable[[str, str], list[int]],
    prefixes: list[str],
    suffixes: list[str],
    picks: list[int],
    first: int,
    seconds: float,
    kept: list[Any] | None,
) -> array:
    """Requests back to back for ``seconds``; the latencies (ns) of those that finished in time."""
    lat = array("q")
    end = time.perf_counter_ns() + int(seconds * 1e9)
    i = first
    while True:
        p, s = picks[i % len(picks)], i % len(suffixes)
        t0 = time.perf_counter_ns()
        tokens = encode(prefixes[p], suffixes[s])
        t1 = time.perf_counter_ns()
        if t1 > end:
            return lat
        lat.append(t1 - t0)
        if kept is not None and i % _CHECK_EVERY == 0 and len(kept) < _CHECK_MAX:
            kept.append((p, s, tokens))
        i += 1


def _worker(args: dict[str, Any], barrier: Any, out: Any, measured: Any) -> None:
    """One worker process: set up, wait on the barrier, run the windows, report, then stay
    alive until the parent has ``measured`` every worker's memory."""
    try:
        import flashtoken

        enc = flashtoken.get_encoding(args["encoding"])
        prefixes, suffixes, picks = _inputs(args)
        encode, stats = _strategy(args, enc)
        barrier.wait(timeout=args["timeout_s"])
        cold = _window(encode, prefixes, suffixes, picks, 0, args["cold_s"], None)
        if args["strategy"] in (LOCAL, LOCAL_FAST, DAEMON, DAEMON_FAST):
            for p in range(len(prefixes)):  # prime every cache: the measured window is steady state
                encode(prefixes[p], suffixes[p % len(suffixes)])
        barrier.wait(timeout=args["timeout_s"])
        _window(encode, prefixes, suffixes, picks, len(cold), args["warmup_s"], None)
        kept: list[tuple[int, int, list[int]]] = []
        measure = _window(encode, prefixes, suffixes, picks, 2 * len(cold), args["measure_s"], kept)
        mismatches = sum(
            enc.encode_ordinary(prefixes[p] + suffixes[s]) != list(t) for p, s, t in kept
        )
        out.put(
            {
                "worker": args["worker"],
                "ok": True,
                "cold_ns": cold.tobytes(),
                "measure_ns": measure.tobytes(),
                "checked": len(kept),
                "mismatches": mismatches,
                "rss_kib": sidecar.rss_kib(),
                "strategy_stats": stats(),
            }
        )
        measured.wait(timeout=args["timeout_s"])
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, never a hang
        out.put({"worker": args.get("worker"), "ok": False, "error": repr(exc)})


def run_one(
    settings: Settings,
    strategy: str,
    workers: int,
    encoding: str,
    address: str | None,
    daemon_pid: int | None = None,
) -> dict[str, Any]:
    """``workers`` processes of one strategy; aggregate throughput, latency and memory."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers)
    out = ctx.Queue()
    measured = ctx.Event()
    base = {
        "strategy": strategy,
        "encoding": encoding,
        "address": address,
        "seed": settings.seed,
        "prefixes": settings.mw_prefixes,
        "prefix_kib": settings.mw_prefix_kib,
        "zipf_s": settings.mw_zipf_s,
        "local_entries": settings.mw_local_entries,
        "cold_s": settings.mw_cold_s,
        "warmup_s": settings.mw_warmup_s,
        "measure_s": settings.mw_measure_s,
        "timeout_s": settings.mw_timeout_s,
    }
    procs = [
        ctx.Process(
            target=_worker, args=(dict(base, worker=w), barrier, out, measured), daemon=True
        )
        for w in range(workers)
    ]
    for proc in procs:
        proc.start()
    results = []
    try:
        deadline = (
            time.monotonic()
            + settings.mw_timeout_s
            + base["cold_s"]
            + base["warmup_s"]
            + base["measure_s"]
        )
        while len(results) < workers:
            try:
                results.append(out.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue_mod.Empty:
                raise RuntimeError(
                    f"{strategy}: {workers} workers: no result within the timeout"
                ) from None
        # Every worker is alive and idle now: one snapshot of the host's memory.
        pss = [sidecar.pss_kib(proc.pid) if proc.pid else None for proc in procs]
        daemon_pss = sidecar.pss_kib(daemon_pid) if daemon_pid is not None else None
    finally:
        measured.set()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = [r["error"] for r in results if not r["ok"]]
    if errors:
        raise RuntimeError(f"{strategy}: worker failed: {errors[0]}")
    measure = [x for r in results for x in array("q", r["measure_ns"])]
    cold = [x for r in results for x in array("q", r["cold_ns"])]
    rss = [r["rss_kib"] for r in results if r["rss_kib"] is not None]
    known = [p for p in pss if p is not None]
    return {
        "strategy": strategy,
        "workers": workers,
        "requests_per_s": len(measure) / settings.mw_measure_s,
        "cold_requests_per_s": len(cold) / settings.mw_cold_s,
        "latency": timing.summarize(measure),
        "cold_latency": timing.summarize(cold),
        "rss_kib_per_worker": rss,
        "rss_mib_median_worker": (sorted(rss)[len(rss) // 2] / 1024) if rss else None,
        "pss_kib_per_worker": known,
        "daemon_pss_kib": daemon_pss,
        # Every worker + the daemon, a page shared among them counted once (None: no /proc).
        "host_pss_mib": (sum(known) + (daemon_pss or 0)) / 1024 if len(known) == workers else None,
        "checked": sum(r["checked"] for r in results),
        "mismatches": sum(r["mismatches"] for r in results),
        "strategy_stats": [r["strategy_stats"] for r in results],
    }


def run(
    settings: Settings,
    checker: Any,
    progress: Callable[[str], None],
    encoding: str,
    workers: tuple[int, ...],
    daemon_skip: str | None,
) -> dict[str, Any]:
    """Every strategy at every worker count; the daemon strategy gets a fresh daemon each time."""
    from benchmark import baselines, workloads

    peers = [label for label in baselines.peers(encoding) if "bpe-openai" not in label]
    fast = [LOCAL_FAST] if workloads.fast_backends(encoding) else []
    fast_daemon = [DAEMON_FAST] if fast and settings.mw_fast_daemon else []
    daemons = [] if daemon_skip else [DAEMON, *fast_daemon]
    strategies = [TIKTOKEN, *peers, LOCAL, *fast, *daemons]
    runs = []
    for strategy in strategies:
        for n in workers:
            if strategy in (DAEMON, DAEMON_FAST):
                backend = "fastest" if strategy == DAEMON_FAST else "tiktoken"
                with sidecar.Daemon(encodings=(encoding,), backend=backend) as daemon:
                    result = run_one(settings, strategy, n, encoding, daemon.address, daemon.pid)
                    result["daemon_rss_kib"] = daemon.rss_kib()
                    try:
                        result["daemon_stats"] = daemon.stats()
                    except Exception as exc:  # noqa: BLE001 - informative only
                        result["daemon_stats"] = {"error": repr(exc)}
            else:
                result = run_one(settings, strategy, n, encoding, None)
            runs.append(result)
            kind = "baseline" if strategy == TIKTOKEN or strategy in peers else "flashtoken"
            entry = checker.by_strategy.setdefault(
                f"multiworker: {strategy}",
                {"kind": kind, "cases": 0, "mismatches": 0, "examples": []},
            )
            entry["cases"] += result["checked"]
            entry["mismatches"] += result["mismatches"]
            if result["mismatches"]:
                entry["examples"].append(
                    f"{n} workers: {result['mismatches']} sampled responses differ"
                )
            progress(
                f"multiworker: {strategy}: {n} workers: {result['requests_per_s']:.0f} req/s "
                f"(cold {result['cold_requests_per_s']:.0f} req/s), "
                f"p99 {result['latency']['p99_us']:.0f} us"
            )
    base = {r["workers"]: r["requests_per_s"] for r in runs if r["strategy"] == TIKTOKEN}
    for r in runs:
        r["throughput_ratio_vs_tiktoken"] = (
            r["requests_per_s"] / base[r["workers"]] if base.get(r["workers"]) else None
        )
    return {
        "encoding": encoding,
        "strategies": strategies,
        "workers": list(workers),
        "prefixes": settings.mw_prefixes,
        "prefix_kib": list(settings.mw_prefix_kib),
        "zipf_s": settings.mw_zipf_s,
        "local_entries": settings.mw_local_entries,
        "windows_s": {
            "cold": settings.mw_cold_s,
            "warmup": settings.mw_warmup_s,
            "measure": settings.mw_measure_s,
        },
        "daemon_skipped": daemon_skip,
        "runs": runs,
    }
