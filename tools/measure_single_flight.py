"""How many encodes do N workers that miss one new prefix at once cost? (single flight)

    python tools/measure_single_flight.py [--workers 4] [--kib 32] [--rounds 5]

Starts a daemon, then per round N fresh worker processes (``Client``, ``min_uses=1``) that each
load their encoding and ask for a warm-up prefix, are released at once on a new prefix, and ask
for it once. Prints, per
round, the daemon's fills and the GETs that waited for the fill in flight (answered with its hit,
or a miss when their wait ran out), the workers' own encodes of the prefix (misses) and the
slowest worker's call. Every id is checked against tiktoken. With PYTHONPATH pointing at another
checkout it measures that one (the worker script uses the public API only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# Appended, not first: with PYTHONPATH set, that checkout's flashtoken and tests are the ones used.
sys.path.append(str(Path(__file__).resolve().parent.parent))

from tests.daemon_fixtures import DaemonProcess, short_tempdir  # noqa: E402
from tests.polling import wait_until  # noqa: E402

WORKER = textwrap.dedent(
    """
    import json, sys, time
    from flashtoken import get_encoding
    from flashtoken.client import Client

    address, path = sys.argv[1], sys.argv[2]
    prefix = open(path, encoding="utf-8").read()
    enc = get_encoding("cl100k_base")
    expected = enc.encode_ordinary(prefix + " Q?")
    with Client(address, "cl100k_base", timeout_ms=1000, min_uses=1) as client:
        # Another prefix, asked and filled: the socket, the encoding id and the map are ready.
        client.encode_ordinary("warm", prefix="a warm-up prefix, the same every round " * 40)
        print("ready", flush=True)
        sys.stdin.readline()
        misses = client.stats()["misses"]  # the warm-up's
        start = time.perf_counter()
        exact = client.encode_ordinary(" Q?", prefix=prefix) == expected
        took = time.perf_counter() - start
        stats = client.stats()
    print(json.dumps({"exact": exact, "ms": took * 1000, "misses": stats["misses"] - misses}))
    """
)


def one_round(daemon: DaemonProcess, workers: int, prefix: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(prefix)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, daemon.address, f.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    wait_until(lambda: daemon.stats()["fills_pending"] == 0, 60, "the warm-up never filled")
    before = daemon.stats()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    out = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    Path(f.name).unlink()
    after = daemon.stats()
    if not all(r["exact"] for r in out):
        raise SystemExit("a worker's ids differ from tiktoken's")
    return {
        "fills": after["fills"] - before["fills"],
        "waited_hits": after.get("waited_hits", 0) - before.get("waited_hits", 0),
        "waited_misses": after.get("waited_misses", 0) - before.get("waited_misses", 0),
        "worker_encodes": sum(r["misses"] for r in out),
        "slowest_ms": round(max(r["ms"] for r in out), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--kib", type=int, default=32, help="prefix size")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    directory = short_tempdir()
    daemon = DaemonProcess(directory).start()
    try:
        rows = []
        for i in range(args.rounds):
            prefix = (f"round {i}: you are a careful assistant; écrivez clairement. " * 20000)[
                : args.kib * 1024
            ]
            rows.append(one_round(daemon, args.workers, prefix))
            print(json.dumps(rows[-1]), flush=True)
        total = {k: sum(r[k] for r in rows) for k in ("fills", "worker_encodes", "waited_hits")}
        print(
            f"{args.workers} workers x {args.rounds} rounds, {args.kib} KiB:"
            f" {total['fills']} daemon fills, {total['worker_encodes']} worker encodes,"
            f" {total['waited_hits']} waited hits"
        )
    finally:
        daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
