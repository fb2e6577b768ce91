"""Timing: warm-up excluded, interleaved repetitions, medians and tail percentiles in nanoseconds.

Strategies compared in one cell are timed round-robin in blocks (``block`` consecutive calls of
one, then of the next, and again), so a burst of load from other processes on a shared machine hits
all of them alike and their ratio, not the absolute time, is what stays meaningful. The order of
the blocks is shuffled every round (a fixed seed): in a fixed order, the strategy that always
follows an expensive one (tiktoken on the whole text, or a peer whose thread pool keeps spinning
after its call) was measured up to 2x slower than the same call placed elsewhere. Within a block
the CPU caches are warm after the first call, so the median is a warm-cache figure; the first call
of each block follows another strategy's work and lands in the tail (p90/p99).

The garbage collector is off while a cell is timed (and run before), as ``timeit`` does: a
collection pass, triggered by whichever strategy happens to allocate the container that crosses
the threshold, otherwise lands on that strategy and not on the one that made the garbage.
"""

from __future__ import annotations

import gc
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence

Timer = Callable[[], object]
_ORDER_SEED = 1729


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; ``sorted_values`` must be sorted."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples_ns: Sequence[int | float]) -> dict[str, float]:
    """Percentiles of a list of durations, in microseconds (``n`` is the sample count)."""
    xs = sorted(samples_ns)
    us = 1e-3
    return {
        "n": len(xs),
        "median_us": percentile(xs, 50) * us,
        "p90_us": percentile(xs, 90) * us,
        "p99_us": percentile(xs, 99) * us,
        "max_us": (xs[-1] * us) if xs else math.nan,
        "min_us": (xs[0] * us) if xs else math.nan,
    }


def time_once(fn: Timer) -> int:
    start = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - start


def interleaved(
    fns: Mapping[str, Timer],
    *,
    warmup: int,
    min_reps: int,
    max_reps: int,
    budget_s: float,
    block: int = 8,
) -> dict[str, list[int]]:
    """Time every function round-robin; return the raw samples (ns) per name.

    ``warmup`` calls of each are run first and thrown away (they also estimate the cost); then
    as many calls as fit in ``budget_s``, at least ``min_reps`` and at most ``max_reps`` of each.
    """
    estimate = 0
    for fn in fns.values():
        estimate += min(time_once(fn) for _ in range(max(1, warmup)))
    reps = int(budget_s * 1e9 / max(estimate, 1))
    reps = max(min_reps, min(max_reps, reps))
    block = max(1, min(block, reps))
    samples: dict[str, list[int]] = {name: [] for name in fns}
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        order = list(fns)
        shuffle = random.Random(_ORDER_SEED).shuffle
        while len(samples[order[0]]) < reps:
            shuffle(order)
            for name in order:
                fn = fns[name]
                for _ in range(block):
                    samples[name].append(time_once(fn))
    finally:
        if was_enabled:
            gc.enable()
    return samples


def ratios(stats: Mapping[str, Mapping[str, float]], baseline: str) -> dict[str, float]:
    """Each strategy's speed-up over ``baseline``: baseline median / strategy median."""
    base = stats[baseline]["median_us"]
    return {
        name: base / s["median_us"] if s["median_us"] > 0 else math.inf for name, s in stats.items()
    }
