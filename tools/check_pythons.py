"""Install the wheel into a fresh venv per Python found and check that it works there.

    python tools/check_pythons.py                 # every CPython 3.10-3.13 found
    python tools/check_pythons.py python3.12 /opt/py313/bin/python
    make pythons                                  # the same, from .ci/run

For each interpreter: a venv in a temporary directory, ``pip install 'WHEEL[daemon]'`` (the
dependencies from the package index), then a smoke run outside the repository: exact tokens
against tiktoken, ``from flashtoken.client import Client``, the ``flashtoken-daemon`` console
script, and a real daemon on an ``ipc://`` socket answering a client's GET with a hit.
Interpreters are found on ``PATH`` (``python3.10`` ... ``python3.13``) and under pyenv's
``versions/`` directory.

Every supported version gets one line: PASS, FAIL, or SKIP (not on this machine). Exit status
1 if any failed or if none was found (a matrix that checked nothing must not pass), 0
otherwise; ``--require 3.10,3.13`` also fails when one of those is missing. The classifiers in
pyproject.toml list the versions this passes on.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUPPORTED = ("3.10", "3.11", "3.12", "3.13")

SMOKE = r"""
import os, subprocess, sys, tempfile, time
import tiktoken
from flashtoken import FixedPrefixTokenCache, get_encoding
from flashtoken.client import Client

prefix = "You are a careful assistant. Règles: précis. 规则 " * 40
cache = FixedPrefixTokenCache("cl100k_base", prefix)
enc = get_encoding("cl100k_base")
assert cache.encode_ordinary(" Hi 👋") == enc.encode_ordinary(prefix + " Hi 👋")
directory = tempfile.mkdtemp(prefix="ft-")
address = f"ipc://{directory}/d.sock"
daemon = subprocess.Popen([sys.executable, "-m", "flashtoken.daemon", "serve", "--bind", address,
                           "--encodings", "cl100k_base"])
try:
    deadline = time.monotonic() + 60
    while not os.path.exists(f"{directory}/d.sock"):
        assert daemon.poll() is None and time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.05)
    hits = 0
    while hits == 0 and time.monotonic() < deadline:
        with Client(address, timeout_ms=2000) as client:
            assert client.encode_ordinary(" Hi", prefix=prefix) == cache.encode_ordinary(" Hi")
            hits = client.stats()["l2_hits"]
        time.sleep(0.05)
    assert hits, "the daemon never answered with a hit"
finally:
    daemon.terminate()
    daemon.wait(10)
    import shutil
    shutil.rmtree(directory, ignore_errors=True)
print(f"ok: Python {sys.version.split()[0]}, tiktoken {tiktoken.__version__}")
"""


def find_pythons() -> dict[str, str]:
    """The first interpreter found for each supported version: {"3.12": path, ...}."""
    found: dict[str, str] = {}
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [shutil.which(f"python{v}") for v in SUPPORTED]
    candidates += sorted(glob.glob(os.path.join(pyenv, "versions", "3.*", "bin", "python3")))
    for path in filter(None, candidates):
        version = subprocess.run(
            [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if version in SUPPORTED:
            found.setdefault(version, path)
    return {v: found[v] for v in SUPPORTED if v in found}


def build_wheel(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(out)],
        check=True,
    )
    (wheel,) = out.glob("flashtoken-*.whl")
    return wheel


def check(python: str, wheel: Path, work: Path) -> tuple[str, bool, str]:
    venv = Path(tempfile.mkdtemp(prefix="venv-", dir=work))
    steps = [
        [python, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[daemon]"],
        [str(venv / "bin" / "flashtoken-daemon"), "--version"],
        [str(venv / "bin" / "python"), "-c", SMOKE],
    ]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True, cwd=work, timeout=600)
        if proc.returncode != 0:
            return python, False, (proc.stderr or proc.stdout)[-2000:]
    return python, True, proc.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pythons", nargs="*", help="interpreters (default: every one found)")
    parser.add_argument(
        "--require",
        default="",
        metavar="VERSIONS",
        help="comma-separated versions that must be found, e.g. 3.10,3.13 (default: none)",
    )
    args = parser.parse_args(argv)
    required = [v.strip() for v in args.require.split(",") if v.strip()]
    found = find_pythons() if not args.pythons else {}
    pythons = args.pythons or list(found.values())
    missing = [v for v in SUPPORTED if not args.pythons and v not in found]
    for version in missing:
        print(f"SKIP {version}: no python{version} on PATH or under pyenv's versions/")
    if not pythons:
        print("FAIL: no CPython 3.10-3.13 found, nothing was checked", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="flashtoken-pythons-") as tmp:
        work = Path(tmp)
        wheel = build_wheel(work / "dist")
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda p: check(p, wheel, work), pythons))
    passed = failed = 0
    for python, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'} {python}: {detail}")
        passed += ok
        failed += not ok
    for version in required:
        if version in missing:
            print(f"FAIL {version}: required (--require) but not found")
            failed += 1
    print(f"{passed} passed, {failed} failed, {len(missing)} skipped (absent)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
