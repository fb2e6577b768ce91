"""End to end over HTTP: the gunicorn example app with 4 workers, sidecar vs plain tiktoken.

The server is ``examples/gunicorn/gunicorn.conf.py`` (4 sync workers; the master runs the
daemon through ``flashtoken.client.gunicorn``). The same app runs twice, once per strategy
(``FLASHTOKEN_EXAMPLE_STRATEGY``): ``tiktoken`` encodes ``prefix + suffix`` on every request,
``sidecar`` goes through the worker's ``Client`` (L1, the daemon, local). Load comes from
``LOAD_PROCESSES`` separate processes (spawned, nothing inherited), each with ``THREADS`` closed
loop connections: a request, its full response, the next. Two response modes: the token list
(``{"tokens": [...]}``, the JSON of ~8k ints costs the server as much as a cache hit saves) and
``?return=count`` (the count only, what a rate limiter or a context-window check needs).

Workload: ``PREFIXES`` system prompts of ``PREFIX_KIB`` KiB, a 40-200 character user question
each request. A warm-up window is excluded; then requests/s and latency percentiles over the
measured window. Sampled responses are checked against tiktoken after the window.

Load generator and server share the machine's cores: absolute requests/s are what this box does
with both on it; the ratio between strategies in the same run is what to compare.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import multiprocessing as mp
import os
import queue as queue_mod
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmark import corpus, sidecar, timing
from benchmark.config import KiB, Settings

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "examples" / "gunicorn" / "gunicorn.conf.py"
STRATEGIES = ("tiktoken", "sidecar")
LABELS = {"tiktoken": "tiktoken per request", "sidecar": "FlashToken sidecar (Client: L1 + daemon)"}
MODES = ("tokens", "count")
WORKERS = 4
PREFIXES = 4
PREFIX_KIB = 32
SUFFIXES = 64
LOAD_PROCESSES = 2
THREADS = 4
WARMUP_S = 1.5
MEASURE_S = 4.0
START_TIMEOUT_S = 60.0
CHECK_EVERY = 37
CHECK_MAX = 40


def unavailable_reason() -> str | None:
    if importlib.util.find_spec("gunicorn") is None:
        return "gunicorn is not installed (it is in the 'dev' extra)"
    if not CONF.exists():
        return f"{CONF} is missing"
    return sidecar.unavailable_reason()


def _inputs(seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    prefixes = [corpus.system_prompt(PREFIX_KIB * KiB, rng, tenant=i + 1) for i in range(PREFIXES)]
    suffixes = [corpus.suffix(rng.randint(40, 200), rng) for _ in range(SUFFIXES)]
    return prefixes, suffixes


class Server:
    """The example app under gunicorn on 127.0.0.1:PORT; always stopped (group SIGKILL last)."""

    def __init__(self, strategy: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="flashtoken-http-")
        self.log_path = os.path.join(self.dir, "gunicorn.log")
        args = [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(CONF),
            "-b",
            f"127.0.0.1:{self.port}",
            "-w",
            str(WORKERS),
            "--graceful-timeout",
            "5",
        ]
        try:
            if tuple(int(x) for x in metadata.version("gunicorn").split(".")[:2]) >= (25, 1):
                args.append("--no-control-socket")
        except ValueError:
            pass
        env = {**os.environ, "FLASHTOKEN_EXAMPLE_STRATEGY": strategy}
        env.pop("FLASHTOKEN_ADDRESS", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.dir,
                start_new_session=True,
            )
        self.daemon_pid: int | None = None

    def wait_ready(self, strategy: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited with {self.proc.returncode}: {self.log_tail()}"
                )
            try:
                stats = self.stats()
                if strategy != "sidecar" or stats.get("daemon"):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not answer within {START_TIMEOUT_S} s: {self.log_tail()}")

    def stats(self) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/stats")
            body = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        if body.get("daemon"):
            self.daemon_pid = body["daemon"]["stats"]["pid"]
        return body

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        if self.daemon_pid is not None:  # its own session; it exits with its master anyway
            try:
                os.kill(self.daemon_pid, 0)
                time.sleep(1.5)
                os.kill(self.daemon_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _load(args: dict[str, Any], barrier: Any, out: Any) -> None:
    """One load process: THREADS closed-loop connections; warm-up, then the measured window."""
    try:
        prefixes, suffixes = _inputs(args["seed"])
        bodies = [
            json.dumps({"prefix": p, "suffix": s}).encode() for p in prefixes for s in suffixes
        ]
        path = "/tokenize?return=count" if args["mode"] == "count" else "/tokenize"
        lat: list[array] = [array("q") for _ in range(THREADS)]
        kept: list[tuple[int, Any, str]] = []
        statuses: Counter = Counter()
        errors: list[str] = []
        lock = threading.Lock()

        def loop(t: int, start: float, end: float) -> None:
            rng = random.Random(args["seed"] * 100 + args["process"] * 10 + t)
            conn = http.client.HTTPConnection("127.0.0.1", args["port"], timeout=30)
            n = 0
            try:
                while True:
                    i = rng.randrange(len(bodies))
                    t0 = time.perf_counter_ns()
                    try:
                        conn.request(
                            "POST",
                            path,
                            body=bodies[i],
                            headers={"Content-Type": "application/json"},
                        )
                        response = conn.getresponse()
                        data = response.read()
                        status = response.status
                    except (OSError, http.client.HTTPException) as exc:
                        conn.close()
                        status, data = 0, repr(exc).encode()
                    t1 = time.perf_counter_ns()
                    if t1 > end:
                        return
                    if t0 >= start:
                        lat[t].append(t1 - t0)
                        n += 1
                        with lock:
                            statuses[status] += 1
                            if status != 200 and len(errors) < 5:
                                errors.append(f"{status}: {data[:200]!r}")
                            elif n % CHECK_EVERY == 0 and len(kept) < CHECK_MAX:
                                kept.append((i, data, ""))
            finally:
                conn.close()

        barrier.wait(timeout=START_TIMEOUT_S)
        now = time.perf_counter_ns()
        start = now + int(WARMUP_S * 1e9)
        end = start + int(MEASURE_S * 1e9)
        threads = [threading.Thread(target=loop, args=(t, start, end)) for t in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        import flashtoken

        enc = flashtoken.get_encoding("cl100k_base")
        mismatches, sources = 0, Counter()
        for i, data, _ in kept:
            reply = json.loads(data)
            p, s = prefixes[i // len(suffixes)], suffixes[i % len(suffixes)]
            want = enc.encode(p + s)
            got = reply["count"] if args["mode"] == "count" else reply["tokens"]
            mismatches += got != (len(want) if args["mode"] == "count" else want)
            sources[reply["source"]] += 1
        out.put(
            {
                "ok": True,
                "lat": b"".join(a.tobytes() for a in lat),
                "statuses": dict(statuses),
                "errors": errors,
                "checked": len(kept),
                "mismatches": mismatches,
                "sources": dict(sources),
            }
        )
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, never a hang
        out.put({"ok": False, "error": repr(exc)})


def run_load(port: int, mode: str, seed: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(LOAD_PROCESSES)
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_load,
            args=({"port": port, "mode": mode, "seed": seed, "process": k}, barrier, out),
            daemon=True,
        )
        for k in range(LOAD_PROCESSES)
    ]
    for p in procs:
        p.start()
    results = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S + WARMUP_S + MEASURE_S + 60
        while len(results) < LOAD_PROCESSES:
            try:
                results.append(out.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue_mod.Empty:
                raise RuntimeError("http load: no result within the timeout") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    failed = [r["error"] for r in results if not r["ok"]]
    if failed:
        raise RuntimeError(f"http load process failed: {failed[0]}")
    lat = [x for r in results for x in array("q", r["lat"])]
    statuses: Counter = Counter()
    sources: Counter = Counter()
    for r in results:
        statuses.update({int(k): v for k, v in r["statuses"].items()})
        sources.update(r["sources"])
    return {
        "requests": len(lat),
        "requests_per_s": len(lat) / MEASURE_S,
        "latency": timing.summarize(lat) if lat else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "non_200": sum(v for k, v in statuses.items() if k != 200),
        "errors": [e for r in results for e in r["errors"]][:5],
        "checked": sum(r["checked"] for r in results),
        "mismatches": sum(r["mismatches"] for r in results),
        "sources": dict(sources),
    }


def run(
    settings: Settings,
    checker: Any,
    progress: Callable[[str], None],
    daemon_skip: str | None = None,
) -> dict[str, Any]:
    """Both strategies, both response modes; a fresh server (and daemon) per strategy."""
    skip = daemon_skip or unavailable_reason()
    if skip:
        progress(f"http_e2e skipped: {skip}")
        return {"skipped": skip}
    runs = []
    for strategy in STRATEGIES:
        server = Server(strategy)
        try:
            server.wait_ready(strategy)
            for mode in MODES:
                result = run_load(server.port, mode, settings.seed)
                result.update(strategy=LABELS[strategy], strategy_key=strategy, mode=mode)
                runs.append(result)
                kind = "flashtoken" if strategy == "sidecar" else "baseline"
                entry = checker.by_strategy.setdefault(
                    f"http_e2e: {LABELS[strategy]}",
                    {"kind": kind, "cases": 0, "mismatches": 0, "examples": []},
                )
                entry["cases"] += result["checked"]
                entry["mismatches"] += result["mismatches"]
                if result["mismatches"]:
                    entry["examples"].append(
                        f"{mode}: {result['mismatches']} sampled responses differ"
                    )
                lat = result["latency"] or {}
                progress(
                    f"http_e2e: {strategy} ({mode}): {result['requests_per_s']:.0f} req/s, "
                    f"p50 {lat.get('median_us', 0) / 1000:.2f} ms, "
                    f"p99 {lat.get('p99_us', 0) / 1000:.2f} ms, non-200 {result['non_200']}"
                )
            if strategy == "sidecar":
                final = server.stats()
                runs[-1]["daemon_stats"] = (final.get("daemon") or {}).get("stats")
        finally:
            server.stop()
    for mode in MODES:
        base = next(
            (
                r["requests_per_s"]
                for r in runs
                if r["mode"] == mode and r["strategy_key"] == "tiktoken"
            ),
            None,
        )
        for r in runs:
            if r["mode"] == mode:
                r["throughput_ratio_vs_tiktoken"] = r["requests_per_s"] / base if base else None
    return {
        "encoding": "cl100k_base",
        "workers": WORKERS,
        "worker_class": "sync",
        "prefixes": PREFIXES,
        "prefix_kib": PREFIX_KIB,
        "suffix_chars": [40, 200],
        "load_processes": LOAD_PROCESSES,
        "connections": LOAD_PROCESSES * THREADS,
        "windows_s": {"warmup": WARMUP_S, "measure": MEASURE_S},
        "modes": list(MODES),
        "runs": runs,
    }


if __name__ == "__main__":  # python -m benchmark.http_e2e: this workload alone, printed as JSON
    from benchmark import correctness
    from benchmark.config import FULL

    def _progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    print(json.dumps(run(FULL, correctness.Checker(), _progress), indent=1))
