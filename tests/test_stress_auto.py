"""benchmark/stress_auto.py in a few seconds, so the stress cannot rot: its in-process mode and a
tiny daemon mode (two spawned workers, a SIGKILL and a restart), both exact, both reusing."""

from __future__ import annotations

import pytest

from benchmark import stress_auto


def test_in_process_mode_is_exact_and_reuses() -> None:
    out = stress_auto.run_in_process("cl100k_base", sequences=25, seed=3)
    assert out["mismatches"] == out["errors"] == 0, out["problems"]
    assert out["cases"]["encode_ordinary"] > 200 and out["cases"]["encode_raised"] > 0
    assert out["cases"]["texts_with_lone_surrogates"] > 0
    assert out["cache_stats"]["reused_bytes"] > 0 and out["cache_stats"]["evictions"] > 0


@pytest.mark.timeout(120)
def test_daemon_mode_is_exact_and_reuses() -> None:
    pytest.importorskip("zmq")
    out = stress_auto.run_daemon(
        "cl100k_base", sequences=6, seed=3, workers=2, block=64, kill=True, down_seconds=0.3
    )
    assert out["mismatches"] == out["errors"] == 0, out["problems"]
    assert out["daemon_starts"] == 2 and sum(out["cases"].values()) > 50
    stats = out["worker_stats"]
    assert stats["auto_l1_adopted"] + stats["auto_hit_bytes"] + stats["l1_reused_bytes"] > 0
