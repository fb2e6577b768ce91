"""The cost of stable cuts on ordinary text (ASCII, CJK, emoji), for one source tree.

Compares two versions of the core side by side, e.g. before and after a change to the Unicode
guard: ``git worktree add /tmp/before <commit>`` then run this once per tree::

    python -m benchmark.ordinary_text /tmp/before
    python -m benchmark.ordinary_text .

Prints, per kind of text, the build of a 32 KiB ``FixedPrefixTokenCache`` against one tiktoken
encode of the prefix, the speed-up of a hit (100 more characters) against encoding the whole text,
and 200 appends of 100 characters against encoding each turn alone (medians).
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable


def _median(call: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(src: str) -> None:
    # Import the core from ``src``, not from the editable install of this checkout.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, src)
    from flashtoken import AppendOnlyPieceTokenCache, FixedPrefixTokenCache, get_encoding

    rng = random.Random(1)
    words = "the of and to in is you that it he was for on are as with his they at be".split()
    han = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会，。、"
    emoji = ["hello", "👍", "😀", "🎉 party", "👩\u200d💻", "ok ✅", "🇫🇷", "wow🔥"]
    texts = {
        "ascii": " ".join(rng.choice(words) for _ in range(6000)),
        "cjk": "".join(rng.choice(han) for _ in range(11000)),
        "emoji": " ".join(rng.choice(emoji) for _ in range(5000)),
    }
    enc = get_encoding("o200k_base")
    for label, text in texts.items():
        prefix = text.encode()[:32768].decode("utf-8", "ignore")
        suffix = text[-100:]
        cache = FixedPrefixTokenCache(enc, prefix)
        turns = [text[i : i + 100] for i in range(0, 20000, 100)]

        def chat() -> None:
            conversation = AppendOnlyPieceTokenCache(enc)
            for turn in turns:
                conversation.append_ordinary(turn)

        build = _median(lambda: FixedPrefixTokenCache(enc, prefix), 15)
        encode = _median(lambda: enc.encode_ordinary(prefix), 15)
        hit = _median(lambda: cache.encode_ordinary(suffix), 200)
        whole = _median(lambda: enc.encode_ordinary(prefix + suffix), 50)
        appends = _median(chat, 5)
        alone = _median(lambda: [enc.encode_ordinary(turn) for turn in turns], 5)
        print(
            f"{label:6} build/tiktoken {build / encode:5.2f}  hit {whole / hit:6.1f}x  "
            f"appends/encode of the turns {appends / alone:5.2f}"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
