"""A randomized adversarial check of automatic prefix reuse (no ``prefix=``), against tiktoken.

    python -m benchmark.stress_auto --encoding cl100k_base --sequences 300 --seed 1
    python -m benchmark.stress_auto --mode daemon --sequences 200 --workers 4 --kill

Automatic reuse is exact only if every block it takes (cut at a byte offset, found by a digest,
confirmed by its bytes, perhaps computed by another process and published by the daemon) holds
exactly the tokens tiktoken gives the whole text there. benchmark/stress.py checks the
declared-prefix core; this checks the automatic path where it can go wrong: texts that share an
earlier text's prefix and then diverge inside a block, a few bytes in, inside a UTF-8 character
or with the tail rewritten; caches small enough to evict in mid-conversation; worker processes
that adopt each other's chains from a daemon that may be SIGKILLed and restarted.

Each sequence is a random "conversation": texts made of stress.py's adversarial pieces (boundary
atoms, any code point including unassigned ones and lone surrogates, documentation slices,
whitespace runs) and special-token strings, each next one a prefix of an earlier one cut
somewhere awkward plus new material; then half of them again, in random order. Every text is
checked token for token with ``encode_ordinary`` and with ``encode`` under a random special-token
policy (where tiktoken raises its ValueError, the same message).

- ``in-process``: one AutoPrefixCache per sequence, blocks of 16-128 bytes, sometimes a
  ``max_bytes`` of a few KiB (or 0) to force evictions.
- ``daemon``: a real daemon subprocess and ``--workers`` spawned processes, each with its own
  ``flashtoken.client.Client`` (``follow=True``); ``--workers`` sequences at a time, turn by turn,
  every text to a random worker, which checks its own answer. ``--kill`` SIGKILLs the daemon
  a third of the way in and restarts it on the same address ``--down-seconds`` later.

Prints a JSON summary (problems also go to stderr as they are found, with the whole text);
exits 1 on any mismatch or error (an exception other than tiktoken's own ValueError).
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import flashtoken
from benchmark.stress import POLICIES, outcome
from benchmark.stress import text as piece

BLOCKS = [16, 17, 24, 32, 50, 64, 100, 128]
MAX_BYTES = [64 * 2**20, 64 * 2**20, 0, 1500, 6000]  # the default, then evictions
SPECIALS = ["<|endoftext|>", "<|endofprompt|>", "<|fim_middle|>", "<|endof", "<|im_start|>user\n"]
EDGES = [-3, -2, -1, 0, 1, 2, 3, 5]  # bytes around a block's end
SUMMED = ["lookups", "reused_bytes", "encoded_bytes", "blocks_added", "evictions"]
KEPT = 10  # problems kept in the summary


def material(rng: random.Random) -> str:
    parts = [piece(rng) for _ in range(rng.randint(1, 5))]
    if rng.random() < 0.3:
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(SPECIALS))
    out = "".join(parts)
    if rng.random() < 0.95:  # else every text after the first lone surrogate would skip caching
        out = out.encode("utf-8", "surrogatepass").decode("utf-8", "ignore")
    return out


def chars_within(text: str, size: int) -> int:
    """The length of the longest prefix of ``text`` whose UTF-8 has at most ``size`` bytes."""
    ends = itertools.accumulate(len(c.encode("utf-8", "surrogatepass")) for c in text)
    return bisect.bisect_right(list(ends), size)


def cut(rng: random.Random, text: str, block: int) -> str:
    """A prefix of ``text`` that ends somewhere awkward for ``block``-byte blocks."""
    how = rng.random()
    if how < 0.25:
        return text  # the whole text: a conversation that grows
    if how < 0.45:
        return text[: rng.randint(0, len(text))]
    if how < 0.75:  # just before, at or after a block's end
        size = len(text.encode("utf-8", "surrogatepass"))
        return text[: chars_within(text, rng.randint(0, size // block) * block + rng.choice(EDGES))]
    if how < 0.85:
        return text[: chars_within(text, rng.randint(0, 8))]  # a few bytes only
    # The tail rewritten; its last character swapped for a neighbour, which mostly shares its
    # leading UTF-8 bytes: the texts diverge inside a character.
    head = text[: len(text) - rng.randint(0, min(24, len(text)))]
    return head[:-1] + chr(ord(head[-1]) ^ 1) if head else head


def conversation(seed: int, index: int, block: int) -> list[str]:
    """Sequence ``index`` of run ``seed`` (its own generator: reproducible alone)."""
    rng = random.Random(f"{seed}/{index}")
    texts = ["".join(material(rng) for _ in range(rng.randint(1, 6)))]
    for _ in range(rng.randint(3, 20)):
        base = texts[-1] if rng.random() < 0.6 else rng.choice(texts)
        texts.append(cut(rng, base, block) + material(rng))
    return texts


def schedule(rng: random.Random, texts: list[str]) -> list[int]:
    """Every turn in order, then half of them again in random order."""
    return [*range(len(texts)), *rng.sample(range(len(texts)), len(texts) // 2)]


def check(subject: Any, enc: Any, text: str, policy: Any) -> tuple[str, str | None]:
    """``subject`` (an AutoPrefixCache or a Client) against tiktoken on ``text``: encode_ordinary
    if ``policy`` is None, else encode. Returns the case's mode and None, or what differed."""
    if policy is None:
        mode = "encode_ordinary"
        got, want = ("tokens", subject.encode_ordinary(text)), ("tokens", enc.encode_ordinary(text))
    else:
        kw = {"allowed_special": policy[0], "disallowed_special": policy[1]}
        got = outcome(lambda: subject.encode(text, **kw))
        want = outcome(lambda: enc.encode(text, **kw))
        mode = "encode" if want[0] == "tokens" else "encode_raised"
    if got == want:
        return mode, None
    if got[0] == want[0] == "tokens":
        a, b = got[1], want[1]
        i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
        i = min(i, len(b))
        return mode, f"token {i}: got {a[i : i + 4]} want {b[i : i + 4]} ({len(a)} vs {len(b)})"
    return mode, f"got {str(got)[:300]} want {str(want)[:300]}"


class Tally:
    """Cases by mode, and the problems (``mismatch`` or ``error``), printed as they come."""

    def __init__(self) -> None:
        self.cases: Counter[str] = Counter()
        self.count: Counter[str] = Counter()
        self.kept: list[dict[str, Any]] = []

    def problem(self, kind: str, text: str, **where: Any) -> None:
        self.count[kind] += 1
        record = {"kind": kind, **where, "text": text}
        print(json.dumps(record, default=repr), file=sys.stderr, flush=True)
        if len(self.kept) < KEPT:
            self.kept.append({**record, "text": repr(text)[:400]})

    def summary(self, started: float, **extra: Any) -> dict[str, Any]:
        return {
            "cases": dict(sorted(self.cases.items())),
            "mismatches": self.count["mismatch"],
            "errors": self.count["error"],
            **extra,
            "problems": self.kept,
            "seconds": round(time.monotonic() - started, 1),
        }


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# -- in-process --------------------------------------------------------------------------------


def run_in_process(encoding: str, sequences: int, seed: int) -> dict[str, Any]:
    enc = flashtoken.get_encoding(encoding)
    tally, stats, started = Tally(), Counter[str](), time.monotonic()
    for i in range(sequences):
        rng = random.Random(f"{seed}/{i}/in-process")
        block, max_bytes = rng.choice(BLOCKS), rng.choice(MAX_BYTES)
        cache = flashtoken.AutoPrefixCache(enc, block_bytes=block, max_bytes=max_bytes)
        texts = conversation(seed, i, block)
        for turn in schedule(rng, texts):
            text = texts[turn]
            tally.cases["texts" if _utf8(text) else "texts_with_lone_surrogates"] += 1
            for policy in rng.sample([None, rng.choice(POLICIES)], 2):
                where = {"sequence": i, "turn": turn, "policy": policy, "block": block}
                try:
                    mode, problem = check(cache, enc, text, policy)
                except Exception:  # tiktoken had an answer (its ValueError is in `check`)
                    tally.problem("error", text, **where, detail=traceback.format_exc())
                    continue
                tally.cases[mode] += 1
                if problem:
                    tally.problem("mismatch", text, **where, max_bytes=max_bytes, detail=problem)
            stats["over_max_bytes"] += cache.stats()["bytes"] > max_bytes
        stats.update({k: v for k, v in cache.stats().items() if k in SUMMED})
    suspicious = [f"over_max_bytes = {stats['over_max_bytes']}"] if stats["over_max_bytes"] else []
    return tally.summary(started, cache_stats=dict(stats), suspicious=suspicious)


# -- through the daemon ------------------------------------------------------------------------


class Daemon:
    """``flashtoken.daemon serve`` on ``ipc://{directory}/d.sock``; signalled by its pid only."""

    def __init__(self, directory: Path, encoding: str, max_bytes: str | None) -> None:
        self.address = f"ipc://{directory}/d.sock"
        self.log = directory / "daemon.log"
        self.command = [
            *(sys.executable, "-m", "flashtoken.daemon", "serve", "--bind", self.address),
            *("--encodings", encoding, "--exit-with-parent"),
            *(("--max-bytes", max_bytes) if max_bytes else ()),
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Daemon:
        from flashtoken.wire.admin import request_stats

        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited:\n{self.log.read_text(errors='replace')}")
            try:
                request_stats(self.address, timeout_ms=200)
                break
            except flashtoken.DaemonError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.starts += 1
        return self

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM to this pid
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def worker(index: int, address: str, encoding: str, options: dict, tasks: Any, out: Any) -> None:
    """One worker process: its own Client, checking each of its answers against tiktoken."""
    from flashtoken.client import Client

    enc = flashtoken.get_encoding(encoding)
    with Client(address, encoding, follow=True, **options) as client:
        while (task := tasks.get()) is not None:
            sequence, turn, text, policy = task
            try:
                out.put(("case", sequence, turn, policy, text, *check(client, enc, text, policy)))
            except Exception:
                out.put(("error", sequence, turn, policy, text, "", traceback.format_exc()))
        stats = client.stats()
        auto = client._core.chains.auto.stats()  # a private peek: the L1's own counters
        stats["l1_reused_bytes"] = auto["reused_bytes"]
        stats["l1_over_max_bytes"] = max(0, auto["bytes"] - auto["limit_maxbytes"])
        out.put(("stats", index, stats))


# (auto_local_bytes, auto_l1_bytes) by worker, in turn; None: the default. A local budget of 0
# always asks the daemon; the default mostly encodes here and tells it. 4 KiB of L1 evicts.
WORKER_OPTIONS = [(0, None), (None, 4096), (0, 4096), (None, None), (None, 32 * 1024)]


def worker_options(index: int, block: int, timeout_ms: int) -> dict[str, Any]:
    local, l1 = WORKER_OPTIONS[index % len(WORKER_OPTIONS)]
    options = {"auto_block_bytes": block, "timeout_ms": timeout_ms}
    for name, value in (("auto_local_bytes", local), ("auto_l1_bytes", l1)):
        if value is not None:
            options[name] = value
    return options


def run_daemon(
    encoding: str,
    sequences: int,
    seed: int,
    *,
    workers: int = 4,
    block: int = 64,
    kill: bool = False,
    down_seconds: float = 1.5,
    timeout_ms: int = 200,
    daemon_max_bytes: str | None = None,
) -> dict[str, Any]:
    from flashtoken.wire.admin import request_stats

    tally, started, rng = Tally(), time.monotonic(), random.Random(f"{seed}/daemon")
    directory = Path(tempfile.mkdtemp(prefix="ft-", dir="/tmp" if os.path.isdir("/tmp") else None))
    directory.chmod(0o700)
    daemon = Daemon(directory, encoding, daemon_max_bytes)
    ctx = mp.get_context("spawn")
    out, tasks = ctx.Queue(), [ctx.Queue() for _ in range(workers)]
    options = [worker_options(i, block, timeout_ms) for i in range(workers)]
    procs = [
        ctx.Process(target=worker, args=(i, daemon.address, encoding, options[i], tasks[i], out))
        for i in range(workers)
    ]
    restart: threading.Thread | None = None
    restart_failed: list[str] = []

    def take() -> tuple:
        deadline = time.monotonic() + 300
        while True:
            try:
                return out.get(timeout=1)
            except queue.Empty:
                if time.monotonic() > deadline or not all(p.is_alive() for p in procs):
                    raise RuntimeError("a worker died or hung") from None

    def restart_later() -> None:
        time.sleep(down_seconds)
        try:
            daemon.start()
        except Exception:
            restart_failed.append(traceback.format_exc())

    try:
        daemon.start()
        for p in procs:
            p.start()
        batches = [range(s, min(s + workers, sequences)) for s in range(0, sequences, workers)]
        # Killed a third of the way in, with requests in flight; back on the same address
        # down_seconds later, and by two thirds of the way at the latest.
        kill_at, back_by = len(batches) // 3, max(len(batches) // 3 + 1, 2 * len(batches) // 3)
        for b, batch in enumerate(batches):
            if restart is not None and b == back_by:
                restart.join()
            texts = {i: conversation(seed, i, block) for i in batch}
            turns = {i: schedule(rng, texts[i]) for i in batch}
            for step in range(max(map(len, turns.values()))):
                sent = 0
                for i in batch:
                    if step < len(turns[i]):
                        policy = None if rng.random() < 0.5 else rng.choice(POLICIES)
                        text = texts[i][turns[i][step]]
                        tasks[rng.randrange(workers)].put((i, turns[i][step], text, policy))
                        sent += 1
                if kill and restart is None and b == kill_at and step == 4:
                    daemon.kill()  # while the workers are at this step's requests
                    restart = threading.Thread(target=restart_later)
                    restart.start()
                for _ in range(sent):
                    kind, i, turn, policy, text, mode, problem = take()
                    where = {"sequence": i, "turn": turn, "policy": policy}
                    if kind == "error":
                        tally.problem("error", text, **where, detail=problem)
                        continue
                    tally.cases[mode] += 1
                    tally.cases["texts" if _utf8(text) else "texts_with_lone_surrogates"] += 1
                    if problem:
                        tally.problem("mismatch", text, **where, detail=problem)
        for q in tasks:
            q.put(None)
        stats: Counter[str] = Counter()
        for _ in procs:
            stats.update({k: v for k, v in take()[2].items() if type(v) is int and k != "l1_limit"})
        if restart is not None:
            restart.join()
        for failure in restart_failed:
            tally.problem("error", "", detail=f"restarting the daemon: {failure}")
        try:
            daemon_stats = request_stats(daemon.address, timeout_ms=5000)["stats"]
        except flashtoken.DaemonError as exc:
            daemon_stats = {"unavailable": str(exc)}
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()  # by its pid
        if restart is not None:
            restart.join()
        daemon.stop()
        shutil.rmtree(directory, ignore_errors=True)
    suspicious = [  # an honest daemon: nothing published or answered should fail a check
        f"{k} = {stats[k]}"
        for k in ("auto_l1_refused", "published_refused", "rejected_hits", "l1_over_max_bytes")
        if stats[k]
    ] + [f"daemon {k} = {daemon_stats[k]}" for k in ("protocol_errors",) if daemon_stats.get(k)]
    return tally.summary(
        started,
        workers=workers,
        block_bytes=block,
        daemon_starts=daemon.starts,
        worker_options=options,
        worker_stats=dict(sorted(stats.items())),
        daemon_stats=daemon_stats,
        suspicious=suspicious,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.stress_auto", description=__doc__)
    parser.add_argument("--encoding", default="cl100k_base")
    parser.add_argument("--sequences", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mode", choices=["all", "in-process", "daemon"], default="all")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--block-bytes", type=int, default=64, help="the daemon mode's blocks")
    parser.add_argument("--kill", action="store_true", help="SIGKILL and restart the daemon")
    parser.add_argument("--down-seconds", type=float, default=1.5)
    parser.add_argument("--timeout-ms", type=int, default=200, help="the clients' budget")
    parser.add_argument("--daemon-max-bytes", default=None, help="e.g. 64KiB: daemon evictions")
    args = parser.parse_args(argv)
    summary: dict[str, Any] = {"encoding": args.encoding, "seed": args.seed}
    summary["sequences"] = args.sequences
    if args.mode in ("all", "in-process"):
        summary["in_process"] = run_in_process(args.encoding, args.sequences, args.seed)
    if args.mode in ("all", "daemon"):
        summary["daemon"] = run_daemon(
            args.encoding,
            args.sequences,
            args.seed,
            workers=args.workers,
            block=args.block_bytes,
            kill=args.kill,
            down_seconds=args.down_seconds,
            timeout_ms=args.timeout_ms,
            daemon_max_bytes=args.daemon_max_bytes,
        )
    runs = [summary[k] for k in ("in_process", "daemon") if k in summary]
    summary["mismatches"] = sum(r["mismatches"] for r in runs)
    summary["errors"] = sum(r["errors"] for r in runs)
    print(json.dumps(summary, indent=1, default=repr))
    return 1 if summary["mismatches"] or summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
