"""Stable cuts, the proven-pattern table and the Unicode guard."""

import unicodedata

import pytest
from hypothesis import given

from flashtoken import FixedPrefixTokenCache, get_encoding
from flashtoken import unicode as uni
from flashtoken.boundary import PROVEN_PIECES, cut_rule
from tests.strategies import texts


@pytest.mark.parametrize(
    "name, pieces", [("cl100k_base", 1), ("o200k_base", 2), ("o200k_harmony", 2)]
)
def test_shipped_patterns_are_the_proven_ones(name, pieces):
    """If tiktoken ever changes a pattern by one character, the proof no longer applies."""
    assert PROVEN_PIECES.get(get_encoding(name)._pat_str) == pieces


def test_cut_is_the_start_of_the_kth_last_piece():
    rule = cut_rule(get_encoding("cl100k_base"), 2)
    text = "Total: 123 apples"  # pieces: Total : ␣ 123 ␣apples
    assert rule.cut(text, 0, len(text)) == text.index(" 123") + 1
    assert rule.cut(text, 0, 3) == 0  # fewer pieces than K: nothing is final


def test_uncertain_code_points_stop_the_scan():
    """U+0295 was Ll before Unicode 16 and Lo since: the two regex engines may split it apart."""
    assert uni.first_uncertain("abc\u0295x", 0, 5) == 3
    assert uni.first_uncertain("plain ascii", 0, 11) == 11
    assert uni.first_uncertain("中文 and é", 0, 8) == 8
    early = "An old letter \u0295 then a long tail of ordinary words " * 3
    late = "Ordinary words, then at the very end an old letter:\u0295\u0295."
    for prefix, before in ((early, False), (late, True)):
        cache = FixedPrefixTokenCache("o200k_base", prefix)
        # Near the end, the scan stops before it; earlier on, an anchor after it starts afresh.
        assert (cache.cut <= prefix.index("\u0295")) is before
        assert cache.encode_ordinary("more") == cache.encoding.encode_ordinary(prefix + "more")


def test_new_symbols_are_certain_for_proven_patterns():
    """An emoji newer than the baseline is "other" whether a table knows it (So) or not (Cn)."""
    new_emoji = "\U0001fae8"  # Unicode 15
    assert unicodedata.ucd_3_2_0.category(new_emoji) == "Cn"
    assert uni.first_uncertain(new_emoji, 0, 1) == 1
    assert uni.first_uncertain("😀 中文 é", 0, 6) == 6  # ordinary text: nothing uncertain


def test_unassigned_everywhere_is_uncertain():
    """A code point no table here knows may be a letter in a newer tiktoken."""
    unknown = "\U000e0080"  # unassigned in every Unicode release so far
    assert uni.regex_category(unknown) == "Cn"
    assert uni.first_uncertain("ab" + unknown, 0, 3) == 2


def test_surrogate_repair_is_local_and_offsets_never_split_a_pair():
    raw = "a\ud83d\ude00b\ud83dc"
    repaired = uni.repair_surrogates(raw)
    assert repaired == "a\U0001f600b\ufffdc"
    assert [uni.raw_offset(raw, i) for i in range(len(repaired) + 1)] == [0, 1, 3, 4, 5, 6]
    assert uni.repair_surrogates("x\ud83d") + uni.repair_surrogates(
        "\ude00"
    ) != uni.repair_surrogates("x\ud83d\ude00")


def test_a_pair_split_across_the_join_is_joined_as_tiktoken_does(enc):
    cache = FixedPrefixTokenCache(enc, "smile \ud83d")
    assert cache.encode_ordinary("\ude00!") == enc.encode_ordinary("smile \ud83d\ude00!")


@given(text=texts)
def test_proven_patterns_tile_the_text(enc, text):
    """The cut arithmetic of proven patterns relies on their pieces covering every character."""
    pattern = cut_rule(enc).pattern
    text = uni.repair_surrogates(text)
    assert "".join(pattern.findall(text)) == text


@given(text=texts, other=texts)
def test_anchors_are_boundaries_decided_by_the_text_before_them(enc, text, other):
    """At an anchor every proven pattern has a piece boundary, whatever follows the character
    after it: the pieces before it are those of any text that shares ``text[:p+1]``."""
    from flashtoken.boundary import _ANCHOR

    pattern = cut_rule(enc).pattern
    text = uni.repair_surrogates("Lead in\n" + text + " word next\nline " + text)
    other = uni.repair_surrogates(other)

    def starts(s):
        offsets, at = [], 0
        for piece in pattern.findall(s):
            offsets.append(at)
            at += len(piece)
        return offsets

    full = starts(text)
    anchors = {m.start() for m in _ANCHOR.finditer(text)}
    assert anchors  # the text is built to have some
    for anchor in anchors:
        assert anchor in full
        mixed = text[: anchor + 1] + other
        assert [o for o in starts(mixed) if o <= anchor] == [o for o in full if o <= anchor]
