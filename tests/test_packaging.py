"""How flashtoken installs: light imports, subpackages mapped from daemon/ and client/, metadata.

Each check runs a fresh interpreter in isolated mode (``-I``) from a directory that is not the
repository, so it sees the installed project, not the checkout on ``sys.path``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> dict:
    """Run ``code`` in a fresh isolated interpreter; it prints one JSON value as its last line."""
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_flashtoken_stays_light(tmp_path: Path) -> None:
    heavy = [
        "zmq",
        "msgpack",
        "xxhash",
        "matplotlib",
        "numpy",
        "bpe_openai",
        "flashtoken.daemon",
        "flashtoken.client",
    ]
    code = (
        "import json, sys\n"
        "import flashtoken\n"
        f"print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))\n"
    )
    assert _run(code, tmp_path) == []


def test_daemon_and_client_are_subpackages(tmp_path: Path) -> None:
    code = (
        "import importlib, importlib.util, json\n"
        "out = {}\n"
        "for name in ('flashtoken.daemon', 'flashtoken.client'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    module = importlib.import_module(name)\n"
        "    out[name] = [spec.origin, spec.submodule_search_locations is not None,\n"
        "                 module.__name__]\n"
        "print(json.dumps(out))\n"
    )
    found = _run(code, tmp_path)
    for name, folder in (("flashtoken.daemon", "daemon"), ("flashtoken.client", "client")):
        origin, is_package, module_name = found[name]
        assert is_package, f"{name} is not a package"
        assert module_name == name
        assert Path(origin).name == "__init__.py"
        assert Path(origin).parent.name == folder


def test_no_top_level_daemon_or_client_module(tmp_path: Path) -> None:
    # find_spec may find another distribution's `daemon` (python-daemon); never ours.
    code = (
        "import importlib.util, json\n"
        "out = {}\n"
        "for name in ('daemon', 'client'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    out[name] = None if spec is None else (spec.origin or str(\n"
        "        list(spec.submodule_search_locations or [])))\n"
        "print(json.dumps(out))\n"
    )
    for name, origin in _run(code, tmp_path).items():
        if origin is not None:
            assert not Path(origin).resolve().is_relative_to(REPO), (name, origin)


def test_metadata(tmp_path: Path) -> None:
    code = (
        "import importlib.metadata as md, importlib.resources, json\n"
        "import flashtoken\n"
        "dist = md.distribution('flashtoken')\n"
        "eps = md.entry_points()\n"
        "scripts = (eps.select(group='console_scripts') if hasattr(eps, 'select')\n"
        "           else eps.get('console_scripts', []))\n"
        "print(json.dumps({\n"
        "    'version': dist.version,\n"
        "    '__version__': flashtoken.__version__,\n"
        "    'top_level': (dist.read_text('top_level.txt') or '').split(),\n"
        "    'scripts': {ep.name: ep.value for ep in scripts\n"
        "                if ep.name.startswith('flashtoken')},\n"
        "    'py_typed': importlib.resources.files('flashtoken').joinpath('py.typed').is_file(),\n"
        "    'requires': dist.requires or [],\n"
        "}))\n"
    )
    meta = _run(code, tmp_path)
    assert meta["version"] == meta["__version__"]
    # Never "daemon" or "client"; tiktoken_ext is tiktoken's plugin namespace (our module).
    assert set(meta["top_level"]) <= {"flashtoken", "tiktoken_ext"}
    assert meta["scripts"] == {"flashtoken-daemon": "flashtoken.daemon.__main__:main"}
    assert meta["py_typed"]
    core = [r for r in meta["requires"] if "extra ==" not in r]
    assert sorted(r.split(">")[0] for r in core) == ["regex", "tiktoken", "xxhash"]
