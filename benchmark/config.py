"""The benchmark's settings as declared data: one preset per mode, every size with its unit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

KiB = 1024
"""Prefix sizes are in characters; the corpus is mostly ASCII, so 1 KiB is ~1024 UTF-8 bytes."""


@dataclass(frozen=True)
class Settings:
    mode: str
    seed: int = 20240601
    # The open models' encodings need flashtoken[llama] and [mistral] (both in [bench]).
    encodings: tuple[str, ...] = ("cl100k_base", "o200k_base", "llama3", "llama4", "tekken")
    # Timing: warm-up calls excluded, then repetitions until the budget (seconds) or the cap.
    warmup: int = 3
    # At least 3 blocks of 8 per strategy: with 20+ strategies in a cell (peers, backends) the
    # budget alone gave the 32 KiB cells 5 calls each, one block, not interleaved at all.
    min_reps: int = 24
    max_reps: int = 200
    cell_budget_s: float = 0.25
    # Correctness: random split points of corpus text per encoding, on top of the boundary corpus.
    random_splits: int = 300
    boundary_context: tuple[int, ...] = (0, 300)
    # Workload 1: fixed system prompt (timed on the first encoding).
    prefix_kib: tuple[int, ...] = (1, 4, 16, 32, 64, 128)
    suffix_chars: tuple[int, ...] = (20, 100, 500, 2000)
    # Workload 2: append-only chat.
    chat_turns: int = 200
    chat_sequences: int = 3
    # Workload 3: RAG template.
    rag_documents: int = 20
    rag_requests: int = 200
    # Workload 4: multi-worker throughput.
    workers: tuple[int, ...] = (1, 2, 4, 8)
    mw_prefixes: int = 200
    mw_prefix_kib: tuple[int, int] = (4, 64)
    mw_zipf_s: float = 1.1
    mw_local_entries: int = 128
    mw_cold_s: float = 1.0
    mw_warmup_s: float = 1.0
    mw_measure_s: float = 3.0
    # The shared-daemon run again with backend="fastest" on the clients and the daemon (each
    # worker count: a fresh daemon and workers, each gating its backend at start-up).
    mw_fast_daemon: bool = True
    mw_timeout_s: float = 120.0
    # Sweeps.
    sweep_prefix_kib: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    sweep_suffix_chars: tuple[int, ...] = (10, 50, 100, 500, 1000, 2000, 8000)
    sweep_backtrack: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    sweep_l1_bytes: tuple[int, ...] = (0, 1 << 20, 4 << 20, 16 << 20, 64 << 20)
    sweep_l1_requests: int = 600
    daemon: bool = True
    extra: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


FULL = Settings(mode="full")

QUICK = dataclasses.replace(
    FULL,
    mode="quick",
    max_reps=60,
    cell_budget_s=0.06,
    random_splits=100,
    prefix_kib=(1, 4, 32, 128),
    suffix_chars=(20, 100, 2000),
    chat_sequences=1,
    rag_documents=8,
    rag_requests=60,
    workers=(1, 2, 4),
    mw_prefixes=100,
    mw_cold_s=0.5,
    mw_warmup_s=0.5,
    mw_measure_s=1.0,
    sweep_prefix_kib=(1, 4, 16, 32, 128),
    sweep_suffix_chars=(10, 100, 1000, 8000),
    sweep_backtrack=(1, 2, 3, 8),
    sweep_l1_bytes=(0, 4 << 20, 64 << 20),
    sweep_l1_requests=200,
)

# For the test suite: every code path, seconds not minutes.
TINY = dataclasses.replace(
    QUICK,
    mode="tiny",
    warmup=1,
    min_reps=2,
    max_reps=5,
    cell_budget_s=0.005,
    random_splits=20,
    boundary_context=(0,),
    prefix_kib=(1, 32),
    suffix_chars=(100,),
    chat_turns=20,
    rag_documents=3,
    rag_requests=10,
    workers=(1, 2),
    mw_prefixes=10,
    mw_prefix_kib=(4, 8),
    mw_cold_s=0.2,
    mw_warmup_s=0.2,
    mw_measure_s=0.3,
    mw_fast_daemon=False,
    sweep_prefix_kib=(1, 8),
    sweep_suffix_chars=(10, 1000),
    sweep_backtrack=(2, 3),
    sweep_l1_bytes=(0, 4 << 20),
    sweep_l1_requests=30,
)

PRESETS = {"full": FULL, "quick": QUICK, "tiny": TINY}
