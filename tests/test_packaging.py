"""How flashtoken installs: light imports, subpackages mapped from daemon/ and client/, metadata.

Each check runs a fresh interpreter in isolated mode (``-I``) from a directory that is not the
repository, so it sees the installed project, not the checkout on ``sys.path``.
"""

from __future__ import annotations

import email
import email.message
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

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


# -- the sdist and the wheel, built as a user builds them ------------------------------------------

_NOT_SOURCES = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", "out", ".hypothesis",
    ".ruff_cache", ".mypy_cache", ".pytest_cache",
)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An sdist of a copy of the checkout, a wheel built from the unpacked sdist (so the sdist
    is shown to be complete), and that wheel installed, non-editable, into a directory.

    setuptools >= 77 (the build requirement) goes into a directory of its own with pip, as
    pip's isolated build would fetch it; the dev venv's own setuptools may be older.
    """
    base = tmp_path_factory.mktemp("built")
    tools, source, dist, site = (base / d for d in ("tools", "source", "dist", "site"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--target", str(tools), "setuptools>=77"], check=True)
    shutil.copytree(REPO, source, ignore=_NOT_SOURCES)
    env = {**os.environ, "PYTHONPATH": str(tools)}

    def backend(hook: str, cwd: Path) -> str:
        code = f"from setuptools import build_meta as b; print(b.{hook}({str(dist)!r}))"
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.strip().splitlines()[-1]

    sdist = dist / backend("build_sdist", source)
    with tarfile.open(sdist) as tar:
        tar.extractall(base / "unpacked", filter="data")
    (unpacked,) = (base / "unpacked").iterdir()
    wheel = dist / backend("build_wheel", unpacked)
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True,
    )
    return {"sdist": sdist, "wheel": wheel, "site": site}


def test_sdist_carries_what_the_readme_and_tests_use(built: dict[str, Path]) -> None:
    with tarfile.open(built["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in (
        "Makefile",
        "CHANGELOG.md",
        "run_benchmark.cmd",
        "tools/bootstrap.py",
        "docs/INTEGRATION.md",
        "docs/ALGORITHM.md",
        "examples/gunicorn/gunicorn.conf.py",
        "examples/asgi/app.py",
        "benchmark/__main__.py",
        "tests/conftest.py",
        "tests/test_cli.py",
        "deploy/flashtoken.service",
        "deploy/Containerfile",
        "client/sync.py",
        "daemon/server.py",
    ):
        assert needed in names, needed
    assert not any("__pycache__" in n or n.startswith((".venv", "benchmark/out")) for n in names)


def _wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(zf.read(meta))


def test_wheel_metadata_states_the_supported_pythons_and_urls(built: dict[str, Path]) -> None:
    meta = _wheel_metadata(built["wheel"])
    classifiers = meta.get_all("Classifier") or []
    versions = sorted(
        c.rsplit(" ", 1)[1] for c in classifiers if re.fullmatch(r".*Python :: 3\.\d+", c)
    )
    assert versions == ["3.10", "3.11", "3.12", "3.13"]
    assert meta["Requires-Python"] == ">=3.10"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Documentation", "Source", "Issues", "Changelog"} <= set(urls)
    assert all(u.startswith("https://") for u in urls.values())
    assert "daemon" in (meta.get_all("Provides-Extra") or [])


def _installed_python(site: Path, cwd: Path, code: str) -> subprocess.CompletedProcess:
    """``code`` run by this Python against ``site`` (the installed wheel) plus this venv's
    third-party packages, without ``site`` processing: this venv's editable-install hook (a
    .pth file) stays off, so flashtoken comes only from the wheel, or from ``cwd``."""
    deps = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), deps])
    return subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


_WHERE = (
    "import json, flashtoken, flashtoken.client, flashtoken.daemon\n"
    "from flashtoken.client import Client\n"
    "print(json.dumps([m.__file__ for m in (flashtoken, flashtoken.client, flashtoken.daemon)]))\n"
)


def test_installed_wheel_imports_from_the_repository_root(built: dict[str, Path]) -> None:
    """From the root, ``flashtoken/`` of the checkout shadows the installed copy; its client and
    daemon must then be found too (the checkout's own, never a mix of two trees)."""
    proc = _installed_python(built["site"], REPO, _WHERE)
    assert proc.returncode == 0, proc.stderr
    core, client, daemon = map(Path, json.loads(proc.stdout.splitlines()[-1]))
    assert core == REPO / "flashtoken" / "__init__.py"
    assert client == REPO / "client" / "__init__.py"
    assert daemon == REPO / "daemon" / "__init__.py"


def test_installed_wheel_imports_from_elsewhere(built: dict[str, Path], tmp_path: Path) -> None:
    proc = _installed_python(built["site"], tmp_path, _WHERE)
    assert proc.returncode == 0, proc.stderr
    for path in json.loads(proc.stdout.splitlines()[-1]):
        assert Path(path).is_relative_to(built["site"]), path


# -- without the [daemon] extra ------------------------------------------------------------------

_BLOCK_ZMQ = (
    "import sys\n"
    "class _NoExtra:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('zmq', 'msgpack'):\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, _NoExtra())\n"
)


def _without_extra(code: str) -> subprocess.CompletedProcess:
    # Run from an empty directory: the installed package, not the checkout, and nothing else
    # (a stray empty `flashtoken/` beside the checkout once shadowed it as a namespace package).
    with tempfile.TemporaryDirectory() as empty:
        return subprocess.run(
            [sys.executable, "-c", _BLOCK_ZMQ + code],
            cwd=empty,
            capture_output=True,
            text=True,
            timeout=60,
        )


def test_without_the_daemon_extra_the_cli_says_what_to_install() -> None:
    run_cli = "from flashtoken.daemon.__main__ import main\nsys.exit(main({!r}))\n"
    helped = _without_extra(run_cli.format(["--help"]))
    assert helped.returncode == 0 and "serve" in helped.stdout, helped.stderr
    assert _without_extra(run_cli.format(["serve", "--help"])).returncode == 0
    for argv in (["serve", "--bind", "ipc:///tmp/ft-none/d.sock"], ["stats"]):
        proc = _without_extra(run_cli.format(argv))
        assert proc.returncode == 1, (argv, proc.stderr)
        assert "pip install 'flashtoken[daemon]'" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_without_the_daemon_extra_the_client_says_what_to_install() -> None:
    proc = _without_extra("import flashtoken\nfrom flashtoken.client import Client\n")
    assert proc.returncode == 1
    assert "ModuleNotFoundError" in proc.stderr
    assert "pip install 'flashtoken[daemon]'" in proc.stderr.splitlines()[-1]


# -- deploy/: the systemd unit and the container recipe ------------------------------------------

DEPLOY = REPO / "deploy"


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit's sections as (key, value) lists (keys repeat: Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None and "=" in line, line
        key, value = line.split("=", 1)
        current.append((key, value))
    return sections


def _check_flashtoken_environment(pairs: list[str]) -> dict[str, str]:
    """Every FLASHTOKEN_* variable set is a setting, and its value parses."""
    from flashtoken.daemon.settings import SETTINGS

    by_env = {s.env: s for s in SETTINGS}
    found = {}
    for pair in pairs:
        name, value = pair.split("=", 1)
        if name.startswith("FLASHTOKEN_"):
            assert name in by_env, f"{name} is not a daemon setting"
            by_env[name].parse(value)
            found[name] = value
    return found


def test_systemd_unit() -> None:
    unit = _unit(DEPLOY / "flashtoken.service")
    service = dict(unit["Service"])
    assert int(service["LimitNOFILE"]) >= 16384
    assert service["RuntimeDirectory"] == "flashtoken"
    assert service["RuntimeDirectoryMode"] == "0700"
    assert service["ExecStart"].split()[1:] == ["serve"]
    env = _check_flashtoken_environment([v for k, v in unit["Service"] if k == "Environment"])
    assert env["FLASHTOKEN_ADDRESS"] == "ipc:///run/flashtoken/daemon.sock"
    assert service["RestartPreventExitStatus"] == "2"  # a usage error is not retried
    assert "WantedBy" in dict(unit["Install"])


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # The unit names a placeholder venv and user: point them at this machine's.
    daemon = Path(sys.executable).with_name("flashtoken-daemon")
    text = (DEPLOY / "flashtoken.service").read_text()
    text = text.replace("/srv/myapp/venv/bin/flashtoken-daemon", str(daemon))
    text = re.sub(r"^(User|Group)=myapp$", r"\1=root", text, flags=re.M)
    unit = tmp_path / "flashtoken.service"
    unit.write_text(text)
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    complaints = [line for line in proc.stderr.splitlines() if "flashtoken.service" in line]
    assert proc.returncode == 0 and not complaints, proc.stderr


def test_container_recipe() -> None:
    """No container engine runs here: check the recipe's instructions and what it runs."""
    lines, current = [], ""
    for raw in (DEPLOY / "Containerfile").read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.endswith("\\"):
            lines.append(current.strip())
            current = ""
    instructions = [line.split(" ", 1) for line in lines]
    known = {"FROM", "COPY", "RUN", "USER", "ENV", "VOLUME", "STOPSIGNAL", "HEALTHCHECK",
             "ENTRYPOINT", "CMD"}  # fmt: skip
    assert all(word in known for word, _ in instructions), instructions
    assert instructions[0][0] == "FROM"
    by_word = {word: rest for word, rest in instructions}
    assert "[daemon]" in by_word["RUN"]
    assert by_word["USER"].split(":")[0] != "0" and by_word["USER"] != "root"
    assert json.loads(by_word["ENTRYPOINT"]) == ["flashtoken-daemon"]
    assert json.loads(by_word["CMD"]) == ["serve"]
    env = re.findall(r"(\w+)=(\S+)", by_word["ENV"])
    found = _check_flashtoken_environment([f"{k}={v}" for k, v in env])
    assert found["FLASHTOKEN_ADDRESS"] == "ipc:///run/flashtoken/daemon.sock"
    # The health check is a real command line of ours.
    check = json.loads(by_word["HEALTHCHECK"].split("CMD", 1)[1])
    proc = subprocess.run(
        [sys.executable, "-m", "flashtoken.daemon", *check[1:], "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


# -- make-free ways to run the tests and the benchmark -------------------------------------------


def test_bootstrap_plans_what_the_makefile_does() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bootstrap.py"), "--dry-run", "bench", "--quick"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    commands = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert commands[-1].endswith("-m benchmark --quick")
    assert str(REPO / ".venv") in commands[-1]


def test_windows_runner_calls_the_bootstrap() -> None:
    data = (REPO / "run_benchmark.cmd").read_bytes()
    assert data.count(b"\r\n") == data.count(b"\n"), "a .cmd file needs CRLF line endings"
    assert b"tools\\bootstrap.py bench %*" in data


# -- the CI matrix over the Pythons on the machine (make pythons, from .ci/run) -----------------


def test_ci_runs_the_python_matrix_and_the_tests() -> None:
    steps = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert "make pythons" in steps and any(s.endswith("make test") for s in steps)
    makefile = (REPO / "Makefile").read_text()
    assert "\npythons: $(STAMP)\n\t$(VPY) tools/check_pythons.py $(PYTHONS_ARGS)\n" in makefile


def test_python_matrix_with_no_interpreter_fails_and_names_what_it_skipped(tmp_path: Path) -> None:
    """A matrix that found nothing must not pass: each version is named SKIP, the exit is 1."""
    env = {**os.environ, "PATH": str(tmp_path), "PYENV_ROOT": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "check_pythons.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 1
    for version in ("3.10", "3.11", "3.12", "3.13"):
        assert f"SKIP {version}: no python{version}" in proc.stdout
    assert "nothing was checked" in proc.stderr
