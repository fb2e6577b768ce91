"""Automatic reuse on adversarial texts: block cuts must stay linear in the text.

    python -m benchmark.linear_cuts

For 1-4 MB texts that no cut can enter (runs of one class) or that have no anchors (alternating
classes), prints tiktoken's time on the whole text, AutoPrefixCache's first encode (which records
every block) and its second (the chain reused), and whether every answer is tiktoken's.
"""

from __future__ import annotations

import time

from flashtoken import AutoPrefixCache, get_encoding

TEXTS = {
    "1M spaces": " " * 1_000_000 + "x",
    "500k newlines": "\n" * 500_000,
    "300k one letter": "a" * 300_000,
    "2M alternating": "a1" * 1_000_000,
    "4M no anchors": "x,1." * 1_000_000,
}


def _outcome(call):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    try:
        result = call()
    except BaseException as exc:  # noqa: BLE001 - tiktoken's own failure is an outcome too
        result = type(exc).__name__
    return result, time.perf_counter() - start


def main() -> int:
    wrong = 0
    for name in ("cl100k_base", "o200k_base"):
        enc = get_encoding(name)
        for label, text in TEXTS.items():
            expected, t_tiktoken = _outcome(lambda: enc.encode_ordinary(text))
            cache = AutoPrefixCache(enc, max_bytes=1 << 30)
            first, t_first = _outcome(lambda: cache.encode_ordinary(text))
            again, t_again = _outcome(lambda: cache.encode_ordinary(text))
            exact = first == expected and again == expected
            wrong += not exact
            print(
                f"{name:12} {label:16} tiktoken {t_tiktoken:6.2f} s  first {t_first:6.2f} s  "
                f"again {t_again:6.2f} s  exact {exact}",
                flush=True,
            )
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
