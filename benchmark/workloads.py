"""Single-process workloads: a fixed system prompt, a 200-turn chat, a RAG template.

Each returns a JSON-ready dict of measurements. Every strategy's output is compared with tiktoken
on the whole text (outside the timed calls) and counted by the :class:`Checker`.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from typing import Any

import flashtoken
from benchmark import baselines, corpus, sidecar, timing
from benchmark.config import KiB, Settings
from benchmark.correctness import BASELINE, Checker, outcome
from flashtoken.backends import get_encoder

Progress = Callable[[str], None]

TIKTOKEN = "tiktoken"
FT_ENCODE = "FixedPrefixTokenCache.encode_ordinary"
FT_COUNT = "FixedPrefixTokenCache.count_ordinary"
FT_ARRAY = "FixedPrefixTokenCache.encode_ordinary_array"
FT_MISS = "FixedPrefixTokenCache(eager=False) miss (a new cache per call)"
FT_WHOLE = "Encoder.encode_ordinary of the whole text (a Client's miss; fill off the request path)"
CLIENT_L1 = "Client L1 hit (in-process)"
CLIENT_L2 = "Client L2 hit (daemon round trip, L1 off)"
CHAT_APPEND = "AppendOnlyPieceTokenCache.append_ordinary"
CHAT_SET_TEXT = "AppendOnlyPieceTokenCache.set_text (template rewrites generation prompt)"
GENERATION_PROMPT = "<|im_start|>assistant\n"
RAG_SHARED = "FixedPrefixTokenCache(instruction); document re-encoded"
RAG_PER_DOC = "FixedPrefixTokenCache per instruction+document (dict, misses included)"
RAG_CLIENT = "Client(prefix=instruction+document), cold start included"


def _cycler(items: list[str]) -> Callable[[], str]:
    it = itertools.cycle(items)
    return lambda: next(it)


def _stats(samples: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    return {name: timing.summarize(xs) for name, xs in samples.items()}


def fast_backends(encoding: str) -> list[str]:
    """The fast backends that passed FlashToken's gate for ``encoding`` here (none installed: [])."""
    found = []
    for name in ("toktok", "gigatoken"):
        try:
            if get_encoder(encoding, name).backend == name:
                found.append(name)
        except ImportError:
            pass
    return found


def with_backend(name: str, backend: str) -> str:
    """A strategy's label with the backend that encodes its uncached part (tiktoken: unmarked)."""
    return name if backend == "tiktoken" else f"{name} [backend={backend}]"


def fixed_prefix(
    settings: Settings,
    checker: Checker,
    progress: Progress,
    daemon: str | None,
    encoding: str,
    prefix_kib: tuple[int, ...],
    suffix_chars: tuple[int, ...],
    scope: str = "fixed_prefix",
) -> dict[str, Any]:
    """Prefix sizes x suffix sizes: each strategy's latency and its speed-up over tiktoken.

    Strategies: tiktoken and every peer on the whole text (list, count and array forms where the
    peer has them); FixedPrefixTokenCache with each backend (list, count, array, and a miss: a
    new cache for the prefix on every call); the Client's hits when a daemon runs.
    """
    enc = flashtoken.get_encoding(encoding)
    rng = random.Random(settings.seed)
    peers = baselines.peers(encoding)
    backends = ["tiktoken", *fast_backends(encoding)]
    cells = []
    for kib in prefix_kib:
        prefix = corpus.system_prompt(kib * KiB, rng)
        caches = {b: flashtoken.FixedPrefixTokenCache(enc, prefix, backend=b) for b in backends}
        clients = _clients(daemon, encoding, prefix, backends)
        try:
            for n in suffix_chars:
                suffixes = [corpus.suffix(n, rng) for _ in range(8)]
                encoders: dict[str, Callable[[str], object]] = {
                    TIKTOKEN: lambda s: enc.encode_ordinary(prefix + s)
                }
                kinds: dict[str, str] = {}
                for b, cache in caches.items():
                    for name, fn, kind in (
                        (FT_ENCODE, cache.encode_ordinary, "list"),
                        (FT_COUNT, cache.count_ordinary, "count"),
                        (FT_ARRAY, cache.encode_ordinary_array, "array"),
                        (
                            FT_MISS,
                            lambda s, b=b: flashtoken.FixedPrefixTokenCache(
                                enc, prefix, backend=b, eager=False
                            ).encode_ordinary(s),
                            "miss",
                        ),
                    ):
                        encoders[with_backend(name, b)] = fn
                        kinds[with_backend(name, b)] = kind
                for b in backends[1:]:  # a Client's miss: the whole text, filled elsewhere
                    whole = get_encoder(enc, b).encode_ordinary
                    encoders[with_backend(FT_WHOLE, b)] = lambda s, whole=whole: whole(prefix + s)
                    kinds[with_backend(FT_WHOLE, b)] = "miss"
                for label, peer in peers.items():
                    forms = (
                        (label, peer.encode_ordinary, "list"),
                        (baselines.count_label(label), peer.count, "count"),
                        (baselines.array_label(label), peer.to_array, "array"),
                    )
                    for name, fn, kind in forms:
                        if fn is not None:
                            encoders[name] = lambda s, fn=fn: fn(prefix + s)
                            kinds[name] = "peer " + kind
                for label, client in clients.items():
                    encoders[label] = lambda s, client=client: client.encode_ordinary(
                        s, prefix=prefix
                    )
                    kinds[label] = "list"
                fns: dict[str, Callable[[], object]] = {}
                for name, encode in encoders.items():
                    if name != TIKTOKEN:
                        _check_outputs(
                            checker, scope, name, kinds[name], encode, enc, prefix, suffixes
                        )
                    nxt = _cycler(suffixes)
                    fns[name] = lambda encode=encode, nxt=nxt: encode(nxt())
                samples = timing.interleaved(
                    fns,
                    warmup=settings.warmup,
                    min_reps=settings.min_reps,
                    max_reps=settings.max_reps,
                    budget_s=settings.cell_budget_s,
                )
                stats = _stats(samples)
                cells.append(
                    {
                        "prefix_kib": kib,
                        "suffix_chars": n,
                        "prefix_tokens": len(caches["tiktoken"].prefix_tokens),
                        "stats": stats,
                        "kinds": kinds,
                        "ratio_vs_tiktoken": timing.ratios(stats, TIKTOKEN),
                    }
                )
                progress(
                    f"{scope}: {encoding} prefix {kib} KiB + suffix {n} chars: "
                    f"{cells[-1]['ratio_vs_tiktoken'][FT_ENCODE]:.0f}x tiktoken"
                )
        finally:
            for client in clients.values():
                client.close()
    return {
        "encoding": encoding,
        "backends": backends,
        "peers": list(peers),
        "cells": cells,
        "strategies": sorted(cells[0]["stats"]) if cells else [],
    }


def _clients(daemon: str | None, encoding: str, prefix: str, backends: list[str]) -> dict[str, Any]:
    """Client strategies with each backend, warmed so that the measured calls are hits (none
    without a daemon)."""
    if daemon is None:
        return {}
    out = {}
    for b in backends:
        l1 = sidecar.make_client(daemon, encoding, backend=b)
        l2 = sidecar.make_client(daemon, encoding, l1_bytes=0, backend=b)
        sidecar.warm(l1, prefix)
        sidecar.warm(l2, prefix)
        out[with_backend(CLIENT_L1, b)] = l1
        out[with_backend(CLIENT_L2, b)] = l2
    return out


def _check_outputs(
    checker: Checker,
    scope: str,
    name: str,
    kind: str,
    encode: Callable[[str], object],
    enc: Any,
    prefix: str,
    suffixes: list[str],
) -> None:
    """Every output of one strategy against tiktoken: ids, or their number for a count."""
    for s in suffixes:
        want = enc.encode_ordinary(prefix + s)
        try:
            got = encode(s)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot take a text: a refusal
            checker.check_peer(f"{scope}: {name}", ("raises", type(exc).__name__), want, scope)
            continue
        if kind.endswith("count"):
            want_value: object = len(want)
        else:
            want_value = want
            got = got.tolist() if hasattr(got, "tolist") else list(got)  # type: ignore[union-attr]
        checker.check(
            f"{scope}: {name}",
            got,
            want_value,
            f"{enc.name} {scope} suffix={s[:30]!r}",
            BASELINE if kind.startswith("peer") else "flashtoken",
        )


def chat(settings: Settings, checker: Checker, progress: Progress, encoding: str) -> dict[str, Any]:
    """An append-only conversation: per-turn latency against history length.

    Each strategy runs the whole conversation in a pass of its own, timed turn by turn; the
    passes alternate, ``chat_sequences`` times. Timing them interleaved turn by turn was
    rejected: tiktoken's encode of a 150 KB history just before each append evicts the CPU
    caches, which charges the append with a cost that grows with the history it never reads
    (docs/METHODOLOGY.md). Correctness is checked in one more, untimed pass.
    """
    enc = flashtoken.get_encoding(encoding)
    rng = random.Random(settings.seed + 2)
    turns = list(corpus.chat_turns(settings.chat_turns, rng))
    others = baselines.available(encoding)
    appends = {with_backend(CHAT_APPEND, b): b for b in ["tiktoken", *fast_backends(encoding)]}
    names = [TIKTOKEN, *appends, CHAT_SET_TEXT, *others]
    histories = list(itertools.accumulate(turns))
    _check_chat(enc, turns, histories, others, checker, encoding, appends)
    history_chars = [len(h) for h in histories]
    history_tokens = [len(enc.encode_ordinary(h)) for h in histories]

    def run(name: str) -> list[int]:
        row = []
        clock = time.perf_counter_ns
        if name == TIKTOKEN:
            for history in histories:
                t0 = clock()
                enc.encode_ordinary(history)
                row.append(clock() - t0)
        elif name in appends:
            cache = flashtoken.AppendOnlyPieceTokenCache(enc, backend=appends[name])
            for turn in turns:
                t0 = clock()
                cache.append_ordinary(turn)
                row.append(clock() - t0)
        elif name == CHAT_SET_TEXT:
            cache = flashtoken.AppendOnlyPieceTokenCache(enc)
            rendered = [h + GENERATION_PROMPT for h in histories]
            for text in rendered:
                t0 = clock()
                cache.set_text(text)
                row.append(clock() - t0)
        else:
            base = others[name]
            for history in histories:
                t0 = clock()
                base(history)
                row.append(clock() - t0)
        return row

    per_seq: dict[str, list[list[int]]] = {name: [] for name in names}
    for seq in range(settings.chat_sequences):
        for name in names:
            per_seq[name].append(run(name))
        total = {name: sum(rows[-1]) for name, rows in per_seq.items()}
        progress(
            f"chat: {encoding} sequence {seq + 1}/{settings.chat_sequences}: "
            f"{total[TIKTOKEN] / max(1, total[CHAT_APPEND]):.0f}x tiktoken over {len(turns)} turns"
        )
    per_turn_us = {
        name: [timing.percentile(sorted(col), 50) / 1e3 for col in zip(*rows, strict=False)]
        for name, rows in per_seq.items()
    }
    totals_ms = {
        name: timing.percentile(sorted(sum(r) for r in rows), 50) / 1e6
        for name, rows in per_seq.items()
    }
    k = max(1, min(20, len(turns) // 4))
    flatness = {name: _mean(us[-k:]) / _mean(us[1 : k + 1]) for name, us in per_turn_us.items()}
    return {
        "encoding": encoding,
        "turns": len(turns),
        "sequences": settings.chat_sequences,
        "history_chars": history_chars,
        "history_tokens": history_tokens,
        "per_turn_median_us": per_turn_us,
        "per_turn_stats": {
            name: timing.summarize([x for row in rows for x in row])
            for name, rows in per_seq.items()
        },
        "total_ms": totals_ms,
        "total_ratio_vs_tiktoken": {name: totals_ms[TIKTOKEN] / t for name, t in totals_ms.items()},
        "flatness_last_over_first": flatness,
        "flatness_window_turns": k,
    }


def _check_chat(
    enc: Any,
    turns: list[str],
    histories: list[str],
    others: dict[str, Any],
    checker: Checker,
    encoding: str,
    appends: dict[str, str],
) -> None:
    """Every turn's delta, applied, against tiktoken on the whole history (untimed)."""
    append = {n: flashtoken.AppendOnlyPieceTokenCache(enc, backend=b) for n, b in appends.items()}
    rewrite = flashtoken.AppendOnlyPieceTokenCache(enc)
    held_a: dict[str, list[int]] = {name: [] for name in appends}
    held_r: list[int] = []
    for i, (turn, history) in enumerate(zip(turns, histories, strict=False)):
        want = enc.encode_ordinary(history)
        delta_r = rewrite.set_text(history + GENERATION_PROMPT)
        held_r[len(held_r) - delta_r.rollback_tokens :] = delta_r.tokens_to_append
        where = f"{encoding} chat turn {i}"
        for name, cache in append.items():
            delta = cache.append_ordinary(turn)
            held = held_a[name]
            held[len(held) - delta.rollback_tokens :] = delta.tokens_to_append
            checker.check(f"chat: {name} (delta applied)", held, want, where)
        checker.check(
            f"chat: {CHAT_SET_TEXT} (delta applied)",
            held_r,
            enc.encode_ordinary(history + GENERATION_PROMPT),
            where,
        )
        for label, base in others.items():
            checker.check_peer(f"chat: {label}", outcome(lambda: list(base(history))), want, where)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def rag(
    settings: Settings, checker: Checker, progress: Progress, daemon: str | None, encoding: str
) -> dict[str, Any]:
    """Shared instruction + one of many documents (zipf) + a question."""
    enc = flashtoken.get_encoding(encoding)
    rng = random.Random(settings.seed + 3)
    instruction = (
        corpus.RAG_INSTRUCTION
        + "\n# Examples\n"
        + corpus.slice_of(rng, 4 * KiB, corpus.documentation())
    )
    docs = corpus.documents(settings.rag_documents, rng)
    picks = corpus.zipf_indices(rng, len(docs), settings.rag_requests, 1.1)
    questions = [rng.choice(corpus.QUESTIONS) for _ in picks]
    others = baselines.available(encoding)
    backends = ["tiktoken", *fast_backends(encoding)]
    clients = {b: sidecar.make_client(daemon, encoding, backend=b) for b in backends if daemon}

    def doc_part(d: int) -> str:
        return "\n\n" + docs[d] + "\n\n"

    strategies: dict[str, Callable[[int, str], object]] = {
        TIKTOKEN: lambda d, q: enc.encode_ordinary(instruction + doc_part(d) + q),
    }
    for b in backends:
        shared = flashtoken.FixedPrefixTokenCache(enc, instruction, backend=b)
        per_doc: dict[int, flashtoken.FixedPrefixTokenCache] = {}

        def per_doc_cache(d: int, q: str, per_doc: dict = per_doc, b: str = b) -> list[int]:
            cache = per_doc.get(d)
            if cache is None:  # a first request for a document pays the whole encode
                cache = per_doc[d] = flashtoken.FixedPrefixTokenCache(
                    enc, instruction + doc_part(d), backend=b
                )
            return cache.encode_ordinary(q)

        strategies[with_backend(RAG_SHARED, b)] = lambda d, q, shared=shared: (
            shared.encode_ordinary(doc_part(d) + q)
        )
        strategies[with_backend(RAG_PER_DOC, b)] = per_doc_cache
    for b, client in clients.items():
        strategies[with_backend(RAG_CLIENT, b)] = lambda d, q, client=client: (
            client.encode_ordinary(q, prefix=instruction + doc_part(d))
        )
    for label, base in others.items():
        strategies[label] = lambda d, q, base=base: base(instruction + doc_part(d) + q)
    samples: dict[str, list[int]] = {name: [] for name in strategies}
    try:
        for i, (d, question) in enumerate(zip(picks, questions, strict=False)):
            q = f"Question: {question}\nAnswer:"
            want = None
            for name, fn in strategies.items():
                t0 = time.perf_counter_ns()
                got = fn(d, q)
                samples[name].append(time.perf_counter_ns() - t0)
                if name == TIKTOKEN:
                    want = got
                else:
                    kind = BASELINE if name in others else "flashtoken"
                    checker.check(
                        f"rag: {name}", list(got), want, f"{encoding} rag request {i}", kind
                    )  # type: ignore[arg-type]
    finally:
        for client in clients.values():
            client.close()
    stats = _stats(samples)
    totals = {name: sum(xs) / 1e6 for name, xs in samples.items()}
    progress(f"rag: {encoding} {len(picks)} requests over {len(docs)} documents")
    return {
        "encoding": encoding,
        "requests": len(picks),
        "documents": len(docs),
        "instruction_chars": len(instruction),
        "document_chars": [len(d) for d in docs],
        "stats": stats,
        "ratio_vs_tiktoken": timing.ratios(stats, TIKTOKEN),
        "total_ms": totals,
        "total_ratio_vs_tiktoken": {n: totals[TIKTOKEN] / t for n, t in totals.items()},
    }
