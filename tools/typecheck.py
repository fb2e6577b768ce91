"""mypy over the project as it installs: ``flashtoken`` with ``client/`` and ``daemon/`` inside.

    python tools/typecheck.py          # what `make lint` runs
    python tools/typecheck.py --help   # mypy's own options pass through

The checkout keeps ``client/`` and ``daemon/`` beside ``flashtoken/`` and the build maps them to
``flashtoken.client`` and ``flashtoken.daemon`` (pyproject's ``package-dir``). mypy knows no such
mapping, and cannot follow the editable install's import hook either, so it would find no
``flashtoken.client``. This script builds the installed layout out of symbolic links in a
temporary directory (nothing is copied, nothing written into the checkout) and runs mypy there
with the project's own configuration (pyproject's ``[tool.mypy]``, which lists what is checked);
the paths mypy reports are turned back into the checkout's. Rejected: an editable install in
setuptools' "strict" mode, whose link tree must be rebuilt for every new module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where each package of the checkout sits in the installed layout.
LAYOUT = {"flashtoken": "flashtoken", "client": "flashtoken/client", "daemon": "flashtoken/daemon"}
TOP_LEVEL = ("tiktoken_ext", "benchmark", "tools", "tests", "examples")


def link_tree(into: Path) -> None:
    """``into`` holds the packages as they install, every file a link to the checkout's."""
    package = into / "flashtoken"
    package.mkdir()
    for entry in (ROOT / "flashtoken").iterdir():
        os.symlink(entry, package / entry.name)
    for source, target in LAYOUT.items():
        if source != "flashtoken":
            os.symlink(ROOT / source, into / target)
    for name in TOP_LEVEL:
        if (ROOT / name).exists():
            os.symlink(ROOT / name, into / name)


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="flashtoken-mypy-") as tmp:
        tree = Path(tmp)
        link_tree(tree)
        command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
        done = subprocess.run(command + argv, cwd=tree, capture_output=True, text=True, check=False)
        for line in (done.stdout + done.stderr).splitlines():
            print(_checkout_path(line))
        return done.returncode


def _checkout_path(line: str) -> str:
    """``flashtoken/client/sync.py:3: ...`` as the checkout names it: ``client/sync.py:3: ...``."""
    for source, target in sorted(LAYOUT.items(), key=lambda kv: -len(kv[1])):
        if line.startswith(target + "/"):
            return source + line[len(target) :]
    return line


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
