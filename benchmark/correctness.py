"""Token-by-token correctness: every strategy against tiktoken on the whole text.

A *case* is one (strategy, text, split) compared with ``enc.encode_ordinary(prefix + suffix)``
(or ``enc.encode``). FlashToken strategies must never differ. ``naive encode(p) + encode(s)`` is a
control that is known to be wrong; its mismatches show the corpus reaches the hard boundaries.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import flashtoken
from benchmark import baselines, corpus

FLASHTOKEN, CONTROL, BASELINE, REFUSED = "flashtoken", "control", "baseline", "peer refused"
NAIVE = "naive encode(p)+encode(s) [control, known wrong]"
_MAX_EXAMPLES = 5

# Strings whose splits reach every known trap: pieces that merge across the join ("a'"+"s",
# "中Z"+"a"), digit runs, whitespace runs before a word, CRLF, combining marks, emoji sequences,
# special-token text split in the middle, and code points whose Unicode class changed recently.
TRICKY = (
    "a's",
    "He'LL've they'RE",
    "Total: 12345678901",
    "  \n\n  x",
    "foo \r\n\r\n bar",
    "\t\t\tdef f():",
    "中Za中Zab",
    "日本語のテキストZa",
    "e\u0301e\u0301\u0301 n\u0303o",
    "👩‍💻🚀✨🇩🇪👍🏽",
    "x <|endoftext|> y",
    "<|endof" + "text|><|fim_prefix|>",
    "'''\"\"\"''s",
    "3.14159e-10f",
    "hello     world",
    "   ",
    "\n\n\n",
    "a\u0295b\u0295 \u0295",
    "\U0001fae8\U0001fae9 \u1c89x",
    "ÄÖÜß straße",
    "http://example.com/a?b=c&d=e",
    "    return x  # 'tis",
    "!!!???...",
    "A1B2 c3'd4",
    "x\u00a0y\u2009z",
    "Мама мыла раму",
    "ᐃᓄᒃᑎᑐᑦ",
    "\u200d\u200dzwj",
    # Assigned in Unicode 17 (CJK Ext. J, U+A7CE): tiktoken 0.14's tables are Unicode 16's.
    "\U000323b0:A \ua7ce:B",
)


class Checker:
    """Counts cases and mismatches per strategy, keeping a few examples of each mismatch."""

    def __init__(self) -> None:
        self.by_strategy: dict[str, dict[str, Any]] = {}

    def check(
        self, strategy: str, got: object, want: object, where: str, kind: str = FLASHTOKEN
    ) -> bool:
        entry = self.by_strategy.setdefault(
            strategy, {"kind": kind, "cases": 0, "mismatches": 0, "examples": []}
        )
        entry["cases"] += 1
        if got == want:
            return True
        entry["mismatches"] += 1
        if len(entry["examples"]) < _MAX_EXAMPLES:
            entry["examples"].append(where)
        return False

    def check_peer(self, strategy: str, got: object, want: object, where: str) -> bool:
        """A peer's answer: a refusal (it raised, as gigatoken does for special-token text it
        would have to treat as ordinary) is counted apart, as a refusal, not as wrong ids."""
        if (
            isinstance(got, tuple)
            and got[:1] == ("raises",)
            and not (isinstance(want, tuple) and want[:1] == ("raises",))
        ):
            return self.check(f"{strategy} [refused: raised {got[1]}]", True, True, where, REFUSED)
        return self.check(strategy, got, want, where, BASELINE)

    def totals(self) -> dict[str, Any]:
        def total(kind: str, field: str) -> int:
            return sum(e[field] for e in self.by_strategy.values() if e["kind"] == kind)

        return {
            "cases": total(FLASHTOKEN, "cases"),
            "mismatches": total(FLASHTOKEN, "mismatches"),
            "control_cases": total(CONTROL, "cases"),
            "control_mismatches": total(CONTROL, "mismatches"),
            "baseline_cases": total(BASELINE, "cases"),
            "baseline_mismatches": total(BASELINE, "mismatches"),
            "baseline_refusals": total(REFUSED, "cases"),
            "by_strategy": self.by_strategy,
        }


def outcome(fn: Callable[[], object]) -> object:
    """The result of ``fn()``, or the type of the error it raised (tiktoken's for a disallowed
    special token; a peer's where it cannot take a text, which then counts as a mismatch)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the outcome compared is the error's type
        return ("raises", type(exc).__name__)


def check_split(
    checker: Checker, enc: Any, prefix: str, suffix: str, where: str, min_backtrack: int
) -> None:
    """Every FlashToken encode path on one split, against tiktoken on the joined text."""
    text = prefix + suffix
    want = enc.encode_ordinary(text)
    tag = f"{enc.name} {where} prefix={prefix[-40:]!r} suffix={suffix[:40]!r}"
    cache = flashtoken.FixedPrefixTokenCache(enc, prefix)
    checker.check("FixedPrefixTokenCache.encode_ordinary", cache.encode_ordinary(suffix), want, tag)
    checker.check(
        "FixedPrefixTokenCache.count_ordinary", cache.count_ordinary(suffix), len(want), tag
    )
    checker.check(
        "FixedPrefixTokenCache.encode_ordinary_array",
        cache.encode_ordinary_array(suffix).tolist(),
        want,
        tag,
    )
    held = list(cache.prefix_tokens)
    delta = cache.encode_ordinary_delta(suffix)
    applied = held[: len(held) - delta.rollback_tokens] + delta.tokens_to_append
    checker.check("FixedPrefixTokenCache.encode_ordinary_delta", applied, want, tag)
    checker.check(
        "FixedPrefixTokenCache.encode(allowed_special='all')",
        outcome(lambda: cache.encode(suffix, allowed_special="all")),
        outcome(lambda: enc.encode(text, allowed_special="all")),
        tag,
    )
    checker.check(
        "FixedPrefixTokenCache.encode (default: disallowed raises)",
        outcome(lambda: cache.encode(suffix)),
        outcome(lambda: enc.encode(text)),
        tag,
    )
    tight = flashtoken.FixedPrefixTokenCache(enc, prefix, backtrack_pieces=min_backtrack)
    checker.check(
        "FixedPrefixTokenCache(backtrack_pieces=minimum).encode_ordinary",
        tight.encode_ordinary(suffix),
        want,
        tag,
    )
    chat = flashtoken.AppendOnlyPieceTokenCache(enc, prefix)
    held = list(chat.tokens)
    delta = chat.append_ordinary(suffix)
    applied = held[: len(held) - delta.rollback_tokens] + delta.tokens_to_append
    checker.check("AppendOnlyPieceTokenCache.append_ordinary (delta)", applied, want, tag)
    checker.check("AppendOnlyPieceTokenCache.append_ordinary (.tokens)", chat.tokens, want, tag)
    # A rewrite, not an append: prefix + "X" first, then the real text (a chat template that
    # replaces its trailing generation prompt).
    rewrite = flashtoken.AppendOnlyPieceTokenCache(enc, prefix + "\u2603X")
    held = list(rewrite.tokens)
    delta = rewrite.set_text(text)
    applied = held[: len(held) - delta.rollback_tokens] + delta.tokens_to_append
    checker.check("AppendOnlyPieceTokenCache.set_text (delta)", applied, want, tag)
    checker.check(
        NAIVE, enc.encode_ordinary(prefix) + enc.encode_ordinary(suffix), want, tag, CONTROL
    )


def splits(seed: int, n_random: int, contexts: Iterable[int]) -> Iterable[tuple[str, str, str]]:
    """(prefix, suffix, label): every position of every tricky string, then random corpus splits."""
    rng = random.Random(seed)
    for context in contexts:
        lead = corpus.slice_of(rng, context) if context else ""
        for s in TRICKY:
            for i in range(len(s) + 1):
                yield (
                    lead + s[:i],
                    s[i:] + (" next" if context else ""),
                    f"boundary ctx={context} pos={i}",
                )
    for k in range(n_random):
        text = corpus.slice_of(rng, rng.randint(20, 3000))
        cut = rng.randint(0, len(text))
        yield text[:cut], text[cut:], f"random #{k}"


def run(
    checker: Checker,
    encodings: Iterable[str],
    seed: int,
    n_random: int,
    contexts: Iterable[int],
    progress: Callable[[str], None],
) -> None:
    """The boundary corpus and random splits, on each encoding, for every strategy."""
    contexts = tuple(contexts)
    for name in encodings:
        enc = flashtoken.get_encoding(name)
        minimum = 1 if name.startswith("cl100k") else 2
        others = baselines.available(name)
        count = 0
        for prefix, suffix, label in splits(seed, n_random, contexts):
            check_split(checker, enc, prefix, suffix, label, minimum)
            want = enc.encode_ordinary(prefix + suffix)
            for base_name, encode in others.items():
                checker.check_peer(
                    base_name,
                    outcome(lambda: list(encode(prefix + suffix))),
                    want,
                    f"{name} {label}",
                )
            count += 1
        progress(f"correctness: {name}: {count} splits checked")
