"""Block cuts stay linear in the text on adversarial texts (issue 11: 1M spaces took 12.9 s).

Work is counted, not timed: every window the cut search scans is summed, and the sum must stay
within a constant times the text, whatever the text. Each answer is tiktoken's.
"""

from __future__ import annotations

import pytest

from flashtoken import AutoPrefixCache, blocks, get_encoding

ADVERSARIAL = {
    "spaces": " " * 800_000 + "x",  # a million makes tiktoken itself overflow
    "newlines": "\n" * 500_000,
    "one letter": "a" * 300_000,
    "alternating classes": "a1" * 500_000,
    "no anchors": "x,1." * 250_000,
    "a run after ordinary text": "Some words here. " * 2000 + " " * 300_000 + "tail words",
}


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
@pytest.mark.parametrize("label", list(ADVERSARIAL))
def test_block_cuts_scan_each_character_a_bounded_number_of_times(monkeypatch, name, label):
    text = ADVERSARIAL[label]
    scanned = [0]
    search = blocks.stable_offset

    def counting(rule, policy, text, start, end):  # type: ignore[no-untyped-def]
        scanned[0] += end - start
        return search(rule, policy, text, start, end)

    monkeypatch.setattr(blocks, "stable_offset", counting)
    enc = get_encoding(name)
    cache = AutoPrefixCache(enc, max_bytes=1 << 30)
    expected = enc.encode_ordinary(text)
    assert cache.encode_ordinary(text) == expected
    assert cache.encode_ordinary(text) == expected  # the chain recorded, reused
    # Each block scans at most MAX_UNCUT_BLOCKS blocks back from its end: linear in the text.
    assert scanned[0] <= (blocks.MAX_UNCUT_BLOCKS + 1) * len(text.encode("utf-8"))
