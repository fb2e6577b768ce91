"""tiktoken's own regex pieces, observed, and a bounded exhaustive check of a pattern's proof.

tiktoken does not expose its split, but it shows it: it looks every piece up in its ranks as a
whole before running BPE, so an ``Encoding`` with the pattern under test whose ranks hold every
substring of the texts (plus the 256 bytes) encodes each piece as exactly one token. Decoding the
tokens one by one gives the pieces of tiktoken's Rust regex (fancy-regex), exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import tiktoken

from flashtoken.boundary import _ANCHOR, _compile


def tiktoken_pieces(pat_str: str, texts: Sequence[str]) -> list[list[str]]:
    """The pieces tiktoken's regex splits each of ``texts`` into (no surrogates in them)."""
    vocab = {bytes([b]) for b in range(256)}
    for text in texts:
        for i in range(len(text)):
            for j in range(i + 1, len(text) + 1):
                vocab.add(text[i:j].encode("utf-8"))
    ranks = {token: rank for rank, token in enumerate(sorted(vocab, key=lambda t: (len(t), t)))}
    enc = tiktoken.Encoding("pieces", pat_str=pat_str, mergeable_ranks=ranks, special_tokens={})
    return [
        [enc.decode_single_token_bytes(t).decode("utf-8") for t in tokens]
        for tokens in enc.encode_ordinary_batch(list(texts), num_threads=1)
    ]


def all_strings(alphabet: str, max_len: int) -> list[str]:
    """Every string over ``alphabet`` of length 1 to ``max_len``, shorter ones first."""
    return [
        "".join(chars)
        for n in range(1, max_len + 1)
        for chars in itertools.product(alphabet, repeat=n)
    ]


def _lcp(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def trailing_pieces_changed(pat_str: str, texts: Iterable[str]) -> tuple[int, tuple[str, str]]:
    """The most trailing pieces of a prefix that some continuation changes, over every split.

    For each text ``W`` and each split ``W = X + Y``: the pieces of ``X`` not in the common start
    of ``pieces(X)`` and ``pieces(W)``. Returns that number's maximum and an ``(X, Y)`` that
    reaches it. A pattern proven for K passes when the maximum is at most K.
    """
    pattern = _compile(pat_str)
    worst, example = 0, ("", "")
    cache: dict[str, list[str]] = {}
    for text in texts:
        whole = cache.setdefault(text, pattern.findall(text))
        for i in range(1, len(text)):
            head = text[:i]
            pieces = cache.get(head)
            if pieces is None:
                pieces = cache.setdefault(head, pattern.findall(head))
            changed = len(pieces) - _lcp(pieces, whole)
            if changed > worst:
                worst, example = changed, (head, text[i:])
    return worst, example


def anchor_violations(pat_str: str, texts: Iterable[str]) -> list[tuple[str, int]]:
    """Texts and anchors where the anchor claim of boundary._last_anchor fails.

    The claim: at an anchor ``p`` the pieces of the text are the pieces of ``text[:p+1]`` that
    end by ``p``, followed by the pieces of ``text[p:]`` scanned as a text of its own.
    """
    pattern = _compile(pat_str)
    bad = []
    for text in texts:
        whole = pattern.findall(text)
        for p in (m.start() for m in _ANCHOR.finditer(text, overlapped=True)):
            if p == 0:
                continue
            before, ends = [], 0
            for piece in pattern.findall(text[: p + 1]):
                if ends + len(piece) > p:
                    break
                before.append(piece)
                ends += len(piece)
            if ends != p or before + pattern.findall(text[p:]) != whole:
                bad.append((text, p))
    return bad


def engine_mismatches(pat_str: str, texts: Sequence[str]) -> list[tuple[str, list, list]]:
    """Texts that ``boundary._compile(pat_str)`` splits otherwise than tiktoken's regex does."""
    ours = _compile(pat_str)
    theirs = tiktoken_pieces(pat_str, texts)
    return [
        (t, ours.findall(t), p) for t, p in zip(texts, theirs, strict=True) if ours.findall(t) != p
    ]


__all__ = [
    "all_strings",
    "anchor_violations",
    "engine_mismatches",
    "tiktoken_pieces",
    "trailing_pieces_changed",
]


def main() -> None:
    """``python -m tests.pieces ALPHABET LENGTH``: the exhaustive checks, further than the tests.

    ALPHABET takes Python escapes (``"a \\n\\u0301"``). Prints, per model pattern, the mismatches
    with tiktoken, the most pieces an append changed (with an example) and the anchor failures.
    """
    import sys

    from flashtoken.boundary import _CL100K
    from flashtoken.models import KIMI_PATTERN, LLAMA3_PATTERN, LLAMA4_PATTERN, TEKKEN_PATTERN

    alphabet = sys.argv[1].encode("latin-1", "backslashreplace").decode("unicode_escape")
    texts = all_strings(alphabet, int(sys.argv[2]))
    patterns = {"cl100k": _CL100K, "llama3": LLAMA3_PATTERN, "llama4/o200k": LLAMA4_PATTERN}
    patterns.update({"tekken": TEKKEN_PATTERN, "kimi": KIMI_PATTERN})
    print(f"{len(texts)} strings over {alphabet!r}")
    for name, pattern in patterns.items():
        mismatches = len(engine_mismatches(pattern, texts))
        worst, example = trailing_pieces_changed(pattern, texts)
        anchors = len(anchor_violations(pattern, texts))
        print(f"{name}: {mismatches} mismatches, K {worst} ({example}), {anchors} anchor failures")


if __name__ == "__main__":
    main()
