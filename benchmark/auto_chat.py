"""Automatic prefix reuse in a multi-worker chat: no declared prefix, a rewritten generation prompt.

A conversation of ``chat_turns`` turns; each turn is one request routed at random to one of
``WORKERS`` worker processes (multiprocessing *spawn*: a fresh interpreter each, like gunicorn
workers). A request carries the whole rendered conversation and a generation prompt,
``history + "<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n<think>\\n"``; the next
request's history renders that assistant turn without the ``<think>`` line, so the tail of every
request is rewritten by the next one and no declared prefix is the whole reusable part.

The conversation is played twice: once answered by ``tiktoken`` and the automatic API, once by
``tiktoken`` and the declared-prefix API, alternating which goes first (so that load from other
processes hits both alike), timing only the encode call. Two passes, not one with all three:
the declared API re-encodes the whole history on its daemon's fill threads every turn (every
prefix is new), and on a small machine that background work would slow the other strategy.

- ``tiktoken``: ``enc.encode_ordinary(text)``;
- declared prefix: ``Client.encode_ordinary(user_turn + prompt, prefix=history)`` against a daemon
  of its own (the history grows every turn: every prefix is new);
- automatic: ``Client.encode_ordinary(text)`` against another daemon of its own (the worker's
  AutoPrefixCache, then one round trip for the daemon's longest chain, then the rest locally).

Every response is compared with tiktoken's (outside the timing). After the run the automatic
daemon's ``bytes`` stat is reported against 4 bytes x the distinct tokens (those of the longest
request of each conversation: every other request is a prefix of it up to its rewritten tail).

``python -m benchmark.auto_chat [--turns 200] [--sequences 1]`` runs it alone and prints JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmark import corpus, sidecar, timing

TIKTOKEN = "tiktoken"
DECLARED = "declared prefix (Client, prefix=history)"
AUTO = "automatic (Client, no prefix)"
STRATEGIES = (TIKTOKEN, DECLARED, AUTO)
# tiktoken timed again, alongside the declared API in that API's own pass (see above).
BASE_DECLARED = "tiktoken (timed in the declared-prefix pass)"
COLUMNS = (TIKTOKEN, AUTO, BASE_DECLARED, DECLARED)
BASELINE_OF = {
    TIKTOKEN: TIKTOKEN,
    AUTO: TIKTOKEN,
    BASE_DECLARED: BASE_DECLARED,
    DECLARED: BASE_DECLARED,
}
WORKERS = 4
PROMPT = "<|im_start|>assistant\n<think>\n"  # the generation prompt, rewritten by the next turn
_REPLY_TIMEOUT_S = 120.0


def conversation(turns: int, seed: int) -> list[tuple[str, str]]:
    """``(history, user_turn + PROMPT)`` per request; the request's text is their concatenation."""
    rng = random.Random(seed)
    out, history = [], ""
    for rendered in corpus.chat_turns(turns, rng):
        split = rendered.index("<|im_start|>assistant\n")
        user, assistant = rendered[:split], rendered[split:]
        out.append((history, user + PROMPT))
        history += user + assistant  # past assistant turns: no <think> line
    return out


def _worker(args: dict[str, Any], inbox: Any, outbox: Any) -> None:
    from flashtoken.client import Client

    import flashtoken
    from benchmark import baselines

    enc = flashtoken.get_encoding(args["encoding"])
    declared = Client(args["declared_address"], encoding=enc, backend=args["backend"])
    auto = Client(args["auto_address"], encoding=enc, backend=args["backend"])
    # Warm-up, not timed: encodings, FlashToken's tables, both daemon connections.
    warm = "Warm-up: é 中文 👋 " * 200
    for _ in range(3):
        enc.encode_ordinary(warm)
        declared.encode_ordinary(" ok", prefix=warm)
        auto.encode_ordinary(warm + " ok")
    conversations = {seed: conversation(args["turns"], seed) for seed in args["seeds"]}
    peers = {label: baselines.peer_named(args["encoding"], label) for label in args["peers"]}
    peers = {label: peer.encode_ordinary for label, peer in peers.items() if peer is not None}
    for whole in peers.values():
        whole(warm)
    outbox.put(("ready", args["worker"]))
    while True:
        message = inbox.get()
        if message[0] == "stop":
            outbox.put(
                ("stats", args["worker"], {"declared": declared.stats(), "auto": auto.stats()})
            )
            declared.close()
            auto.close()
            return
        _, seed, turn, strategies = message
        history, suffix = conversations[seed][turn]
        text = history + suffix
        calls: dict[str, Callable[[], list[int]]] = {
            TIKTOKEN: lambda: enc.encode_ordinary(text),
            DECLARED: lambda: declared.encode_ordinary(suffix, prefix=history),
            AUTO: lambda: auto.encode_ordinary(text),
        }
        for label, whole in peers.items():
            calls[label] = lambda whole=whole: _attempt(whole, text)
        order = strategies if turn % 2 else strategies[::-1]
        ns: dict[str, int] = {}
        got: dict[str, list[int]] = {}
        for name in order:
            start = time.perf_counter_ns()
            got[name] = calls[name]()
            ns[name] = time.perf_counter_ns() - start
        want = got[TIKTOKEN]
        outbox.put(
            (
                "turn",
                seed,
                turn,
                ns,
                {name: got[name] == want for name in strategies},
                len(text),
                len(want),
            )
        )


def run(
    settings: Any,
    checker: Any,
    progress: Callable[[str], None],
    encoding: str,
    daemon_skip: str | None = None,
) -> dict[str, Any]:
    """The workload; a dict for ``results.json["workloads"]["auto_chat"]``."""
    if daemon_skip:
        return {"skipped": daemon_skip}
    from benchmark import baselines

    turns, sequences = settings.chat_turns, max(1, settings.chat_sequences)
    peers = tuple(label for label in baselines.peers(encoding) if "bpe-openai" not in label)
    columns = (*COLUMNS, *peers)
    baseline_of = {**BASELINE_OF, **dict.fromkeys(peers, TIKTOKEN)}
    seeds = [settings.seed + 600 + s for s in range(sequences)]
    # FlashToken's best configuration: the fast backend (if one passed its gate) for what the
    # clients encode and for the daemons' fills.
    from benchmark.workloads import fast_backends

    backend = "fastest" if fast_backends(encoding) else "tiktoken"
    ctx = mp.get_context("spawn")
    with (
        sidecar.Daemon(encodings=(encoding,), backend=backend) as d_declared,
        sidecar.Daemon(encodings=(encoding,), backend=backend) as d_auto,
    ):
        outbox = ctx.Queue()
        inboxes = [ctx.Queue() for _ in range(WORKERS)]
        procs = [
            ctx.Process(
                target=_worker,
                daemon=True,
                args=(
                    dict(
                        encoding=encoding,
                        turns=turns,
                        seeds=seeds,
                        worker=w,
                        peers=peers,
                        backend=backend,
                        declared_address=d_declared.address,
                        auto_address=d_auto.address,
                    ),
                    inboxes[w],
                    outbox,
                ),
            )
            for w in range(WORKERS)
        ]
        for p in procs:
            p.start()
        try:
            for _ in procs:
                _get(outbox, procs)
            warm_bytes = d_auto.stats()["stats"]["bytes"]
            per_seq: dict[str, list[list[int]]] = {name: [] for name in columns}
            mismatches = dict.fromkeys((DECLARED, AUTO, *peers), 0)
            chars: list[int] = []
            tokens: list[int] = []
            distinct = 0
            rng = random.Random(settings.seed + 601)
            for seq, seed in enumerate(seeds):
                for strategies, base in (
                    ((TIKTOKEN, AUTO, *peers), TIKTOKEN),
                    ((TIKTOKEN, DECLARED), BASE_DECLARED),
                ):
                    rows: dict[str, list[int]] = {name: [] for name in strategies}
                    for turn in range(turns):
                        inboxes[rng.randrange(WORKERS)].put(("turn", seed, turn, strategies))
                        _, _, _, ns, ok, n_chars, n_tokens = _get(outbox, procs)
                        for name in strategies:
                            rows[name].append(ns[name])
                            if name != TIKTOKEN:
                                checker.check(
                                    f"auto_chat: {name}",
                                    ok[name],
                                    True,
                                    f"{encoding} seq {seq} turn {turn}",
                                    "baseline" if name in peers else "flashtoken",
                                )
                                mismatches[name] += not ok[name]
                        if seq == 0 and base == TIKTOKEN:
                            chars.append(n_chars)
                            tokens.append(n_tokens)
                    if base == TIKTOKEN:
                        distinct += n_tokens  # the last request: every other one is its prefix
                    other = strategies[1]
                    per_seq[base].append(rows[TIKTOKEN])
                    for name in strategies[1:]:
                        per_seq[name].append(rows[name])
                    progress(
                        f"auto_chat: sequence {seq + 1}/{sequences}: {other}: "
                        f"{sum(rows[TIKTOKEN]) / max(1, sum(rows[other])):.1f}x tiktoken"
                    )
            for inbox in inboxes:
                inbox.put(("stop",))
            clients = [_get(outbox, procs)[2] for _ in procs]
            for p in procs:
                p.join(10)
            daemon_auto = d_auto.stats()["stats"]
            daemon_declared = d_declared.stats()["stats"]
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
    per_turn_us = {
        name: [timing.percentile(sorted(col), 50) / 1e3 for col in zip(*rows, strict=False)]
        for name, rows in per_seq.items()
    }
    totals_ms = {
        name: timing.percentile(sorted(sum(r) for r in rows), 50) / 1e6
        for name, rows in per_seq.items()
    }
    k = max(1, min(20, turns // 4))
    auto_bytes = daemon_auto["bytes"] - warm_bytes
    return {
        "encoding": encoding,
        "backend": backend,
        "turns": turns,
        "sequences": sequences,
        "workers": WORKERS,
        "generation_prompt": PROMPT,
        "history_chars": chars,
        "history_tokens": tokens,
        "per_turn_median_us": per_turn_us,
        "per_turn_stats": {
            name: timing.summarize([x for row in rows for x in row])
            for name, rows in per_seq.items()
        },
        "total_ms": totals_ms,
        "total_ratio_vs_tiktoken": {
            name: totals_ms[baseline_of[name]] / t for name, t in totals_ms.items()
        },
        "flatness_last_over_first": {
            name: _mean(us[-k:]) / _mean(us[1 : k + 1]) for name, us in per_turn_us.items()
        },
        "flatness_window_turns": k,
        "first_window_mean_us": {name: _mean(us[1 : k + 1]) for name, us in per_turn_us.items()},
        "last_window_mean_us": {name: _mean(us[-k:]) for name, us in per_turn_us.items()},
        "mismatches": mismatches,
        "memory": {
            "daemon_bytes": auto_bytes,
            "daemon_bytes_after_warmup": warm_bytes,
            "distinct_tokens": distinct,
            "bytes_per_distinct_token": auto_bytes / max(1, distinct),
            "ratio_vs_4_bytes_per_token": auto_bytes / max(1, 4 * distinct),
            "daemon_blocks": daemon_auto.get("blocks"),
            "declared_daemon_bytes": daemon_declared["bytes"],
        },
        "daemon_stats": {"automatic": daemon_auto, "declared": daemon_declared},
        "client_stats": {
            name: _sum_stats([c[key] for c in clients])
            for name, key in ((AUTO, "auto"), (DECLARED, "declared"))
        },
    }


def _get(outbox: Any, procs: list[Any]) -> Any:
    deadline = time.monotonic() + _REPLY_TIMEOUT_S
    while True:
        try:
            return outbox.get(timeout=1.0)
        except Exception:  # noqa: BLE001 - queue.Empty: check the workers are alive
            dead = [p.exitcode for p in procs if not p.is_alive()]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"auto_chat workers stopped answering (exit codes {dead})"
                ) from None


def _attempt(encode: Callable[[str], list[int]], text: str) -> object:
    """A peer's answer, or the error it raised (then a mismatch, not a dead worker)."""
    try:
        return encode(text)
    except Exception as exc:  # noqa: BLE001
        return f"raised {type(exc).__name__}: {exc}"


def _sum_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in stats[0].items() if isinstance(v, int) and not isinstance(v, bool)]
    return {k: sum(s.get(k, 0) for s in stats) for k in keys}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    from benchmark import config, correctness

    parser = argparse.ArgumentParser(
        prog="python -m benchmark.auto_chat", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--turns", type=int, default=config.FULL.chat_turns)
    parser.add_argument("--sequences", type=int, default=1)
    parser.add_argument("--encoding", default=config.FULL.encodings[0])
    parser.add_argument("--seed", type=int, default=config.FULL.seed)
    args = parser.parse_args(argv)
    settings = config.FULL.__class__(
        mode="auto_chat", seed=args.seed, chat_turns=args.turns, chat_sequences=args.sequences
    )
    checker = correctness.Checker()
    out = run(
        settings,
        checker,
        lambda m: print(m, file=sys.stderr, flush=True),
        args.encoding,
        sidecar.unavailable_reason(),
    )
    print(
        json.dumps(
            {
                k: v
                for k, v in out.items()
                if k not in ("per_turn_median_us", "history_chars", "history_tokens")
            },
            indent=1,
        )
    )
    return 1 if checker.totals()["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
