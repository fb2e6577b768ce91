"""A soak of the daemon under hostile load: ``python -m benchmark.soak [--seconds 60]``.

For ``--seconds``, ``--workers`` worker processes encode random texts through a ``Client``
(declared prefixes and automatic reuse) and compare every answer with tiktoken, while threads
in this process attack the same daemon: fuzzed frames, clients that never read their replies
(AUTO and GET floods of 1 MiB), connection storms, AUTO requests of a 1 MiB text in 64-byte
blocks, and ``kill -9`` of the daemon every ``--kill-every`` seconds (restarted at once on the same
socket). Reports wrong ids and failed requests (both must be 0), calls made, the daemon's peak RSS
against its budget (``limit_rss_bytes``), its peak descriptor count, and the restarts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import zmq

from flashtoken import get_encoding
from flashtoken.encodings import encoding_id
from flashtoken.wire import (
    AutoRequest,
    GetRequest,
    StatsRequest,
    make_chain_seed,
    namespace_tag,
    parse_reply,
)

MiB = 1024 * 1024

WORKER = r"""
import json, os, random, sys
from flashtoken import get_encoding
from flashtoken.client import Client
address, stop, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
enc = get_encoding("cl100k_base")
rng = random.Random(seed)
words = ["alpha", " beta", "  ", "\n", "'s", " 123", "中文", "é", "!!", "Z", " don't", "\t"]
prompts = ["".join(rng.choice(words) for _ in range(rng.randrange(50, 800))) for _ in range(20)]
wrong = failed = calls = 0
with Client(address, timeout_ms=20) as client:
    chat = prompts[0]
    while not os.path.exists(stop):
        calls += 1
        try:
            if rng.random() < 0.5:
                prompt, suffix = rng.choice(prompts), rng.choice(words)
                ok = client.encode_ordinary(suffix, prefix=prompt) == enc.encode_ordinary(prompt + suffix)
            else:
                chat = chat + rng.choice(words) * rng.randrange(1, 40)
                if len(chat) > 60000 or rng.random() < 0.05:
                    chat = rng.choice(prompts)
                ok = client.encode_ordinary(chat) == enc.encode_ordinary(chat)
            wrong += not ok
        except BaseException:
            failed += 1
    print(json.dumps({"wrong": wrong, "failed": failed, "calls": calls, "stats": client.stats()}))
"""


class Daemon:
    def __init__(self, directory: str, max_bytes: str) -> None:
        self.address = f"ipc://{directory}/d.sock"
        self.args = [sys.executable, "-m", "flashtoken.daemon", "serve", "--bind", self.address]
        self.args += ["--max-bytes", max_bytes, "--encodings", "cl100k_base"]
        self.log = open(os.path.join(directory, "daemon.log"), "ab")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.rss_max = self.fds_max = self.limit = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = self.stats(500)
            if stats is not None:
                self.limit = stats["limit_rss_bytes"]
                return
            time.sleep(0.05)
        raise RuntimeError("the daemon did not start")

    def stats(self, timeout_ms: int = 2000) -> dict[str, Any] | None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.address)
            sock.send_multipart(StatsRequest(1).frames())
            if sock.poll(timeout_ms):
                return parse_reply(sock.recv_multipart()).stats
            return None
        finally:
            sock.close(0)

    def sample(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            with open(f"/proc/{self.proc.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        self.rss_max = max(self.rss_max, int(line.split()[1]) * 1024)
            self.fds_max = max(self.fds_max, len(os.listdir(f"/proc/{self.proc.pid}/fd")))
        except OSError:
            pass  # killed meanwhile

    def kill9(self) -> None:
        if self.proc is not None:
            self.sample()
            self.proc.kill()
            self.proc.wait()


def _attacker(name: str, address: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """One hostile pattern, repeated until ``stop``."""
    rng = random.Random(name)
    enc = get_encoding("cl100k_base")
    eid = encoding_id(enc)
    text = ("a text to flood the daemon with. " * 40000)[:MiB].encode()
    ctx = zmq.Context.instance()
    while not stop.is_set():
        socks = []
        try:
            if name == "storm":  # many connections at once, then gone
                for _ in range(300):
                    s = ctx.socket(zmq.DEALER)
                    s.setsockopt(zmq.LINGER, 0)
                    s.connect(address)
                    socks.append(s)
                counts[name] += len(socks)  # connections opened
                stop.wait(0.5)
            else:
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDHWM, 50)
                s.setsockopt(zmq.RCVHWM, 1)  # never reads: replies back up into the daemon
                s.connect(address)
                socks.append(s)
                for i in range(50):
                    if name == "fuzz":
                        frames = [
                            os.urandom(rng.randrange(1, 300)) for _ in range(rng.randrange(1, 4))
                        ]
                    elif name == "auto-flood":
                        seed = make_chain_seed(b"", eid, (), 512)
                        frames = AutoRequest(
                            i, seed, enc.name, eid, (), True, 512, 0, text
                        ).frames()
                    elif name == "get-flood":
                        frames = GetRequest(
                            i, namespace_tag(b""), enc.name, eid, (), True, text
                        ).frames()
                    else:  # tiny blocks: the smallest the daemon takes, on a 1 MiB text
                        seed = make_chain_seed(b"tiny", eid, (), 64)
                        cut = len(text) - rng.randrange(0, 4096)
                        frames = AutoRequest(
                            i, seed, enc.name, eid, (), True, 64, 0, text[:cut]
                        ).frames()
                    try:
                        s.send_multipart(frames, zmq.NOBLOCK)
                        counts[name] += 1
                    except zmq.Again:
                        break
                stop.wait(0.2)
        finally:
            for s in socks:
                s.close(0)


def run(seconds: float, workers: int, kill_every: float, max_bytes: str) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix="ft-soak-", dir="/tmp")
    os.chmod(directory, 0o700)
    daemon = Daemon(directory, max_bytes)
    stop_file = os.path.join(directory, "stop")
    stop = threading.Event()
    counts = dict.fromkeys(("fuzz", "auto-flood", "get-flood", "storm", "tiny-blocks"), 0)
    procs: list[subprocess.Popen[str]] = []
    threads: list[threading.Thread] = []
    try:
        daemon.start()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, daemon.address, stop_file, str(i)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(workers)
        ]
        threads = [
            threading.Thread(target=_attacker, args=(name, daemon.address, stop, counts))
            for name in counts
        ]
        for thread in threads:
            thread.start()
        end = time.monotonic() + seconds
        next_kill = time.monotonic() + kill_every
        while time.monotonic() < end:
            daemon.sample()
            if time.monotonic() >= next_kill:
                daemon.kill9()
                daemon.start()  # the same socket path: the clients are not told
                next_kill = time.monotonic() + kill_every
            time.sleep(0.1)  # the sampling period of RSS and descriptors
        daemon.sample()
        final = daemon.stats() or {}
    finally:
        stop.set()
        open(stop_file, "w").close()
        for thread in threads:
            thread.join(30)
        reports = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            reports.append(json.loads(out) if proc.returncode == 0 else {"error": err[-500:]})
        if daemon.proc is not None:
            daemon.proc.send_signal(signal.SIGTERM)
            daemon.proc.wait(30)
        shutil.rmtree(directory, ignore_errors=True)
    done = [r for r in reports if "error" not in r]
    return {
        "seconds": seconds,
        "workers": workers,
        "worker_failures": len(reports) - len(done),
        "calls": sum(r["calls"] for r in done),
        "wrong_ids": sum(r["wrong"] for r in done),
        "failed_requests": sum(r["failed"] for r in done),
        "l1_hits": sum(r["stats"]["l1_hits"] for r in done),
        "l2_hits": sum(r["stats"]["l2_hits"] for r in done),
        "auto_hit_bytes": sum(r["stats"]["auto_hit_bytes"] for r in done),
        "attacks_sent": counts,
        "daemon_restarts": daemon.starts - 1,
        "daemon_rss_max_mib": round(daemon.rss_max / MiB, 1),
        "daemon_rss_budget_mib": round(daemon.limit / MiB, 1),
        "daemon_fds_max": daemon.fds_max,
        "last_daemon": {
            k: final.get(k)
            for k in (
                "replies_dropped",
                "protocol_errors",
                "connections_refused",
                "connections_gated",
                "fills_abandoned",
                "limit_connections",
            )
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--kill-every", type=float, default=15, help="s between kill -9s")
    parser.add_argument("--max-bytes", default="128MiB", help="the daemon's --max-bytes")
    args = parser.parse_args()
    out = run(args.seconds, args.workers, args.kill_every, args.max_bytes)
    print(json.dumps(out, indent=2))
    sys.exit(0 if out["wrong_ids"] == out["failed_requests"] == out["worker_failures"] == 0 else 1)


if __name__ == "__main__":
    main()
