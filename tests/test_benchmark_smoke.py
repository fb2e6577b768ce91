"""The benchmark's tiny configuration end to end, so ``python -m benchmark`` cannot rot.

Runs in a subprocess (the benchmark spawns worker processes and its own daemon) with a timeout.
Timings are never asserted: only that every section ran, FlashToken matched tiktoken everywhere,
the naive control did not, and the report and figures were written.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _daemon_importable() -> bool:
    try:
        return (
            importlib.util.find_spec("flashtoken.daemon.__main__") is not None
            and importlib.util.find_spec("flashtoken.client") is not None
        )
    except ImportError:
        return False


# A hang guard, not a speed bound: the tiny run takes ~30 s alone and ~80 s on two busy cores.
@pytest.mark.timeout(660)
def test_benchmark_tiny_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark", "--tiny", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())

    correctness = results["correctness"]
    assert correctness["cases"] > 1000
    assert correctness["mismatches"] == 0
    assert correctness["control_mismatches"] > 0
    assert results["errors"] == []
    assert set(results["workloads"]) == {"fixed_prefix", "chat", "rag", "multiworker", "auto_chat"}
    assert {"prefix_length", "suffix_length", "backtrack_pieces", "l1_size"} <= set(
        results["sweeps"]
    )
    assert results["machine"]["versions"]["tiktoken"]
    assert (out / "summary.md").read_text().startswith("# FlashToken benchmark")
    from benchmark.report import drawn_figures

    assert sorted(p.name for p in out.glob("*.png")) == sorted(drawn_figures(results))
    # The memory figure's host total: every worker's PSS and the daemon's, read at one moment.
    assert all(r["host_pss_mib"] > 0 for r in results["workloads"]["multiworker"]["runs"])

    strategies = {r["strategy"] for r in results["workloads"]["multiworker"]["runs"]}
    if _daemon_importable():
        # Once the daemon exists, the smoke run must cover it.
        assert results["daemon_skipped"] is None
        assert any("daemon" in s for s in strategies)
        assert any("Client" in name for name in correctness["by_strategy"])
    else:
        assert results["daemon_skipped"]


def test_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "--quick" in proc.stdout and "--out" in proc.stdout and "--seed" in proc.stdout


def test_stress_run_finds_no_mismatch():
    from benchmark import stress

    assert stress.run("o200k_base", 300, seed=7, backtrack_pieces=None) == (0, 0)
    assert stress.run("cl100k_base", 300, seed=8, backtrack_pieces=1) == (0, 0)
