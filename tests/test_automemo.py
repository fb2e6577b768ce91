"""The memo's UTF-8 reuse: the bytes a text shares with the last lookup's are copied, not
encoded again, and must be exactly ``text.encode("utf-8")`` whatever the two texts hold."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashtoken import AutoPrefixCache
from flashtoken.automemo import next_memo, utf8
from flashtoken.specials import ORDINARY
from tests.strategies import texts


def encoded(text):
    try:
        return "bytes", text.encode("utf-8")
    except UnicodeEncodeError:
        return "error", None


def reused(text, memo):
    try:
        return "bytes", utf8(text, memo)
    except UnicodeEncodeError:
        return "error", None


def memo_after(cache, text):
    """The memo ``cache`` keeps once it has encoded ``text`` (none: the text had no full block,
    or lone surrogates)."""
    cache.encode_ordinary(text)
    return cache._memos.get(ORDINARY.allowed)


@given(
    first=st.lists(texts, min_size=1, max_size=8).map("".join),
    rest=texts,
    keep=st.floats(0, 1),
    block=st.sampled_from([16, 32, 64]),
)
def test_the_bytes_are_those_of_encoding_the_whole_text(enc, first, rest, keep, block):
    cache = AutoPrefixCache(enc, block_bytes=block)
    text = (first * 4)[: max(1, int(len(first) * 4 * keep))] + rest
    memo = memo_after(cache, first * 4)
    assert reused(text, memo) == encoded(text)
    assert cache.encode_ordinary(text) == enc.encode_ordinary(text)


@pytest.mark.parametrize(
    "tail",
    ["", "x", "é", "😀", "\ud83d", "\ud83d\ude00", "e\u0301", "中文", " \n\n", "<|endoftext|>"],
)
@pytest.mark.parametrize("back", [0, 1, 2, 7, 64])
def test_a_rewritten_end_after_every_kind_of_character(enc, tail, back):
    """A text that drops its last ``back`` characters and goes on with ``tail``: the memo's
    prefix ends inside, before or after characters of 1 to 4 bytes."""
    base = "Intro 😀 é 中文 e\u0301 " * 40
    cache = AutoPrefixCache(enc, block_bytes=16)
    memo = memo_after(cache, base)
    assert memo is not None and memo.text and base.startswith(memo.text)
    text = base[: len(base) - back] + tail
    assert text.startswith(memo.text) == (back <= 7)  # the copy is taken (the last cut is near)
    assert reused(text, memo) == encoded(text)
    assert cache.encode_ordinary(text) == enc.encode_ordinary(text)


def test_a_memo_is_only_reused_for_texts_that_start_with_its_characters(enc):
    cache = AutoPrefixCache(enc, block_bytes=16)
    memo = memo_after(cache, "é é " * 100)
    assert memo is not None and memo.text_bytes == len(memo.text.encode("utf-8"))
    for text in ("e e " * 100, "é é " * 3, "", "é é " * 99 + "é e ", "é é " * 150):
        assert utf8(text, memo) == text.encode("utf-8")
    assert utf8("é" * 300, None) == ("é" * 300).encode("utf-8")


def test_the_memos_byte_count_comes_from_the_text_not_the_nodes(enc):
    """``text_bytes`` is counted from the characters after the cut, so a node whose byte cut
    disagreed with its character cut could not make the copied bytes wrong."""
    cache = AutoPrefixCache(enc, block_bytes=16)
    memo = memo_after(cache, "😀 é" * 50)
    assert memo is not None
    rebuilt = next_memo(memo.data, memo.path, memo.digests, memo.state, "😀 é" * 50, None, 0)
    assert rebuilt.text == memo.text
    assert rebuilt.data[: rebuilt.text_bytes] == memo.text.encode("utf-8")
    assert rebuilt.head == [t for node in memo.path for t in node.tokens]
