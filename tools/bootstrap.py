"""``make test`` / ``make bench`` without make, on any OS: ``python tools/bootstrap.py bench``.

    python tools/bootstrap.py test [pytest args]       # the test suite
    python tools/bootstrap.py bench [benchmark args]   # the benchmark (python -m benchmark)
    python tools/bootstrap.py install                  # only set up .venv
    python tools/bootstrap.py --dry-run bench          # print the commands, run nothing

Does what the Makefile does: creates ``.venv`` with the Python that runs this script, installs
the project editable with its ``dev`` extra (again only when pyproject.toml is newer than the
last install, the same stamp file the Makefile uses), then runs the command in that venv.
run_benchmark.cmd (Windows) calls it. Standard library only: it runs before anything is
installed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
STAMP = VENV / ".installed-stamp"
MIN_PYTHON = (3, 10)


def venv_python(venv: Path = VENV) -> Path:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def has_unix_sockets() -> bool:
    """What the daemon needs today: unix sockets (ipc://) and fcntl locks."""
    import socket

    try:
        import fcntl  # noqa: F401
    except ImportError:
        return False
    return hasattr(socket, "AF_UNIX")


def plan(command: str, extra: list[str]) -> list[list[str]]:
    """The commands to run, in order."""
    python = str(venv_python())
    steps: list[list[str]] = []
    if not venv_python().exists():
        steps.append([sys.executable, "-m", "venv", str(VENV)])
        # A current pip: the editable install of a pyproject-only project needs pip >= 21.3.
        steps.append([python, "-m", "pip", "install", "--upgrade", "pip"])
    pyproject = ROOT / "pyproject.toml"
    if not STAMP.exists() or STAMP.stat().st_mtime < pyproject.stat().st_mtime:
        steps.append([python, "-m", "pip", "install", "-e", f"{ROOT}[dev]"])
        steps.append(["<touch>", str(STAMP)])
    if command == "test":
        steps.append([python, "-m", "pytest", *extra])
    elif command == "bench":
        if not has_unix_sockets() and "--no-daemon" not in extra:
            # The sidecar binds an ipc:// (unix) socket and takes an fcntl lock.
            print("bootstrap: no unix sockets here: running the benchmark with --no-daemon")
            extra = [*extra, "--no-daemon"]
        steps.append([python, "-m", "benchmark", *extra])
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/bootstrap.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("command", choices=("test", "bench", "install"))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed to pytest / benchmark")
    args = parser.parse_args(argv)
    if sys.version_info < MIN_PYTHON:
        print(
            f"bootstrap: Python {'.'.join(map(str, MIN_PYTHON))} or newer is needed, this is"
            f" {sys.version.split()[0]}; run this script with a newer python",
            file=sys.stderr,
        )
        return 2
    for step in plan(args.command, args.args):
        print("+ " + " ".join(step), flush=True)
        if args.dry_run:
            continue
        if step[0] == "<touch>":
            Path(step[1]).touch()
            continue
        status = subprocess.call(step, cwd=ROOT)
        if status != 0:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
