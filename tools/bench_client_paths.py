"""The clients' in-process hot paths, this checkout against another revision's ``client/``.

    python tools/bench_client_paths.py 3e29426     # the client of that commit vs this one

Two paths that never leave the process (no daemon: its socket is absent), each timed as the
median of 7 runs, old and new interleaved (a shared machine's noise hits both alike): a call with
a declared prefix held in the L1, and a text with no prefix whose blocks the L1 holds. Only
``client/`` comes from the other revision (extracted to a temporary directory and imported as a
package of another name); the core library is this checkout's for both.
"""

from __future__ import annotations

import functools
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "You are a helpful assistant. " * 200
TEXT = PREFIX + " The question?"


def _old_client(revision: str, into: Path) -> Any:
    package = into / "client_at_revision"
    package.mkdir()
    archive = subprocess.run(
        ["git", "archive", revision, "client"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    for source in (into / "client").glob("*.py"):
        source.rename(package / source.name)
    sys.path.insert(0, str(into))
    return importlib.import_module("client_at_revision")


def _per_call_us(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main(revision: str) -> None:
    import flashtoken.client as new

    with tempfile.TemporaryDirectory() as tmp:
        old = _old_client(revision, Path(tmp))
        clients: dict[str, Any] = {
            name: module.Client(f"ipc://{tmp}/absent.sock", "cl100k_base", min_uses=1, follow=False)
            for name, module in ((revision, old), ("this checkout", new))
        }
        times: dict[tuple[str, str], list[float]] = {}
        for client in clients.values():
            client.encode_ordinary(" hi", prefix=PREFIX)
            client.encode_ordinary(TEXT)
        for _ in range(7):
            for name, client in clients.items():
                declared = functools.partial(client.encode_ordinary, " hi", prefix=PREFIX)
                times.setdefault((name, "prefix"), []).append(_per_call_us(declared, 20000))
                automatic = functools.partial(client.encode_ordinary, TEXT)
                times.setdefault((name, "auto"), []).append(_per_call_us(automatic, 5000))
        for name, client in clients.items():
            client.close()
            print(
                f"{name:>14}: declared prefix, L1 hit"
                f" {statistics.median(times[name, 'prefix']):6.2f} us/call;"
                f" no prefix, chain in the L1 {statistics.median(times[name, 'auto']):6.2f} us/call"
            )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "HEAD")
