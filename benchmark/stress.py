"""A long randomized exactness run: every core encode path against tiktoken, case by case.

    python -m benchmark.stress --encoding o200k_base --cases 400000 --seed 1

Each case draws a (prefix, suffix) pair from four generators (boundary atoms, arbitrary code
points including unassigned ones and surrogates, slices of real documentation, whitespace runs)
and checks FixedPrefixTokenCache.encode_ordinary, its encode under a random special-token policy
(errors included, word for word), and every fourth case an AppendOnlyPieceTokenCache fed in
pieces. Prints mismatches as they happen and exits 1 if there was any mismatch or error.
"""

from __future__ import annotations

import argparse
import pydoc_data.topics
import random
import sys
import time

import flashtoken

ATOMS = [
    *"abZQst'1./<|>_中文éʕ٣ß",
    "ll", "ve", "'s", "'S", "23", "456", "//", "<|", "|>", "日本", "e\u0301", "\u0301", "ǅ", "ʰ",
    "😀", "👩\u200d💻", "\u200d", "\U0001fae8", "\U0001e5d0", "\u0378", "\ud83d", "\ude00",
    " ", "  ", "\t", "\n", "\r\n", "\n\n", "   \n", "\xa0", "\u3000", "\u2028", "\x0b",
    "<|endoftext|>", "<|endofprompt|>", "<|start|>", "<|endof", "text|>",
]  # fmt: skip
WHITESPACE = [" ", "\n", "\t", "\r\n", "  ", "\u3000", "\xa0", "x", "1"]
POLICIES = [(set(), "all"), ("all", "all"), (set(), ()), ({"<|endoftext|>"}, ()), ("all", ())]
DOCS = "".join(pydoc_data.topics.topics.values())


def text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        return "".join(rng.choice(ATOMS) for _ in range(rng.randint(0, 12)))
    if kind < 0.55:
        top = 0x10FFFF if rng.random() < 0.5 else 0x3000
        return "".join(chr(rng.randint(0, top)) for _ in range(rng.randint(0, 10)))
    if kind < 0.85:
        start = rng.randint(0, len(DOCS) - 200)
        return DOCS[start : start + rng.randint(0, 120)]
    return "".join(rng.choice(WHITESPACE) for _ in range(rng.randint(0, 15)))


def outcome(fn):  # type: ignore[no-untyped-def]
    try:
        return "tokens", fn()
    except ValueError as exc:
        return "error", str(exc)


def run(encoding: str, cases: int, seed: int, backtrack_pieces: int | None) -> tuple[int, int]:
    enc = flashtoken.get_encoding(encoding)
    rng = random.Random(seed)
    mismatches = errors = 0
    for i in range(cases):
        prefix, suffix = text(rng), text(rng)
        try:
            cache = flashtoken.FixedPrefixTokenCache(enc, prefix, backtrack_pieces=backtrack_pieces)
            if cache.encode_ordinary(suffix) != enc.encode_ordinary(prefix + suffix):
                mismatches += 1
                print("encode_ordinary", repr(prefix), repr(suffix), flush=True)
            allowed, disallowed = rng.choice(POLICIES)
            kw = {"allowed_special": allowed, "disallowed_special": disallowed}
            if outcome(lambda: cache.encode(suffix, **kw)) != outcome(
                lambda: enc.encode(prefix + suffix, **kw)
            ):
                mismatches += 1
                print("encode", allowed, disallowed, repr(prefix), repr(suffix), flush=True)
            if i % 4 == 0:
                parts = [prefix, *(text(rng) for _ in range(rng.randint(1, 4)))]
                chat = flashtoken.AppendOnlyPieceTokenCache(enc, parts[0], backtrack_pieces)
                held = chat.tokens
                for part in parts[1:]:
                    delta = chat.append_ordinary(part)
                    held = held[: len(held) - delta.rollback_tokens] + delta.tokens_to_append
                if held != enc.encode_ordinary("".join(parts)):
                    mismatches += 1
                    print("append", parts, flush=True)
        except Exception as exc:  # an error where tiktoken has an answer is a failure too
            errors += 1
            print("error", type(exc).__name__, exc, repr(prefix), repr(suffix), flush=True)
    return mismatches, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.stress", description=__doc__)
    parser.add_argument("--encoding", default="cl100k_base")
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--backtrack-pieces", type=int, default=None, help="default: the library's (3)"
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    mismatches, errors = run(args.encoding, args.cases, args.seed, args.backtrack_pieces)
    print(
        f"{args.encoding}: {args.cases} cases, {mismatches} mismatches, {errors} errors, "
        f"{time.monotonic() - start:.0f} s"
    )
    return 1 if mismatches or errors else 0


if __name__ == "__main__":
    sys.exit(main())
