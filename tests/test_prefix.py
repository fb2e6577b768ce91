"""FixedPrefixTokenCache against the oracle, tiktoken, on the whole text."""

from array import array

import pytest
import tiktoken
from hypothesis import given
from hypothesis import strategies as st

from flashtoken import (
    AppendOnlyPieceTokenCache,
    FixedPrefixTokenCache,
    TokenDelta,
    get_encoding,
    split_prefix,
)
from flashtoken.boundary import UncachedEncodingWarning
from tests.corpus import CORPUS, splits
from tests.strategies import texts

POLICIES = [
    pytest.param(frozenset(), "all", id="default"),
    pytest.param("all", "all", id="allow-all"),
    pytest.param(frozenset(), (), id="nothing-special"),
    pytest.param({"<|endoftext|>"}, (), id="allow-eot"),
    pytest.param(frozenset(), {"<|endoftext|>"}, id="forbid-eot"),
]


def oracle(enc, text, allowed_special, disallowed_special):
    """tiktoken's answer: ("tokens", ids) or ("error", type, message)."""
    try:
        return "tokens", enc.encode(
            text, allowed_special=allowed_special, disallowed_special=disallowed_special
        )
    except ValueError as exc:
        return "error", type(exc), str(exc)


def ours(cache, suffix, allowed_special, disallowed_special):
    try:
        return "tokens", cache.encode(
            suffix, allowed_special=allowed_special, disallowed_special=disallowed_special
        )
    except ValueError as exc:
        return "error", type(exc), str(exc)


def check_ordinary(enc, prefix, suffix):
    cache = FixedPrefixTokenCache(enc, prefix)
    want = enc.encode_ordinary(prefix + suffix)
    assert cache.encode_ordinary(suffix) == want, (prefix, suffix)
    assert cache.count_ordinary(suffix) == len(want)
    assert list(cache.encode_ordinary_array(suffix)) == want
    held = list(cache.prefix_tokens)
    assert held == enc.encode_ordinary(prefix)
    delta = cache.encode_ordinary_delta(suffix)
    assert held[: len(held) - delta.rollback_tokens] + delta.tokens_to_append == want


@given(prefix=texts, suffix=texts)
def test_encode_ordinary_is_tiktoken(enc, prefix, suffix):
    check_ordinary(enc, prefix, suffix)


@given(prefix=texts, suffix=texts, policy=st.sampled_from([p.values for p in POLICIES]))
def test_encode_is_tiktoken(enc, prefix, suffix, policy):
    allowed, disallowed = policy
    cache = FixedPrefixTokenCache(enc, prefix)
    want = oracle(enc, prefix + suffix, allowed, disallowed)
    assert ours(cache, suffix, allowed, disallowed) == want
    if want[0] == "tokens":
        kwargs = dict(allowed_special=allowed, disallowed_special=disallowed)
        assert cache.count(suffix, **kwargs) == len(want[1])
        held = enc.encode(prefix, allowed_special=allowed, disallowed_special=())
        delta = cache.encode_delta(suffix, **kwargs)
        assert held[: len(held) - delta.rollback_tokens] + delta.tokens_to_append == want[1]


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_boundary_corpus_every_split(enc, text):
    for prefix, suffix in splits(text):
        check_ordinary(enc, prefix, suffix)
        cache = FixedPrefixTokenCache(enc, prefix)
        for policy in POLICIES:
            allowed, disallowed = policy.values
            assert ours(cache, suffix, allowed, disallowed) == oracle(
                enc, prefix + suffix, allowed, disallowed
            ), (prefix, suffix, policy.id)


@pytest.mark.parametrize("backtrack_pieces", [None, 2, 3, 5])
def test_corpus_pairs_with_every_backtrack(enc, backtrack_pieces):
    """Prefixes and suffixes from different corpus texts, at the smallest K that is allowed."""
    minimum = 1 if enc.name == "cl100k_base" else 2
    k = max(minimum, backtrack_pieces or 0) or None
    for prefix in CORPUS[::3]:
        cache = FixedPrefixTokenCache(enc, prefix, backtrack_pieces=k)
        for suffix in CORPUS[1::4]:
            assert cache.encode_ordinary(suffix) == enc.encode_ordinary(prefix + suffix)


def test_disallowed_special_across_the_join_raises_tiktokens_error(enc):
    cache = FixedPrefixTokenCache(enc, "Hello <|endof")
    with pytest.raises(ValueError) as ours_error:
        cache.encode("text|> world")
    with pytest.raises(ValueError) as theirs:
        enc.encode("Hello <|endoftext|> world")
    assert str(ours_error.value) == str(theirs.value)
    assert cache.encode_ordinary("text|> world") == enc.encode_ordinary("Hello <|endoftext|> world")


def test_allowed_special_across_the_join_is_one_token(enc):
    cache = FixedPrefixTokenCache(enc, "Hello <|endof")
    tokens = cache.encode("text|> world", allowed_special="all")
    assert enc.eot_token in tokens
    assert tokens == enc.encode("Hello <|endoftext|> world", allowed_special="all")


def test_allowed_special_in_prefix_is_a_hard_boundary(enc):
    prefix = "system prompt<|endoftext|>"
    cache = FixedPrefixTokenCache(enc, prefix)
    for suffix in ["", "x", " user: hi", "<|endoftext|>"]:
        assert cache.encode(suffix, allowed_special="all") == enc.encode(
            prefix + suffix, allowed_special="all"
        )


def test_disallowed_special_in_prefix_raises_on_every_call(enc):
    cache = FixedPrefixTokenCache(enc, "a <|endoftext|> b")
    with pytest.raises(ValueError, match="disallowed special token"):
        cache.encode(" c")
    assert cache.encode(" c", disallowed_special=()) == enc.encode(
        "a <|endoftext|> b c", disallowed_special=()
    )


def test_long_prefix_keeps_nearly_all_its_tokens(enc):
    prefix = "You are a careful assistant. Answer in full sentences.\n" * 600  # ~32 KiB
    cache = FixedPrefixTokenCache(enc, prefix)
    assert len(prefix) - cache.cut < 64  # only the last few pieces are re-encoded
    assert cache.encode_ordinary(" What is 2+2?") == enc.encode_ordinary(prefix + " What is 2+2?")


def test_head_comes_from_the_whole_prefix_not_from_the_text_before_the_cut(enc):
    """Before a cut, whitespace is split differently when it ends the text."""
    prefix = "word" + " " * 7 + "next one two three"
    split = split_prefix(enc, prefix)
    whole = enc.encode_ordinary(prefix)
    assert split.head == whole[: len(split.head)]
    cache = FixedPrefixTokenCache(enc, prefix)
    assert cache.encode_ordinary("!") == enc.encode_ordinary(prefix + "!")


def test_backtrack_pieces_below_the_proof_is_raised_to_it(enc):
    minimum = 1 if enc.name == "cl100k_base" else 2
    prefix, suffix = "Total: 12", "3 apples"
    for asked in (1, 2, 5):
        cache = FixedPrefixTokenCache(enc, prefix, backtrack_pieces=asked)
        assert cache.backtrack_pieces == max(asked, minimum)
        assert cache.encode_ordinary(suffix) == enc.encode_ordinary(prefix + suffix)
    assert AppendOnlyPieceTokenCache(enc, prefix, 1).backtrack_pieces == minimum
    with pytest.raises(ValueError, match="1 or more"):
        FixedPrefixTokenCache(enc, "x", backtrack_pieces=0)
    with pytest.raises(TypeError, match="must be an int"):
        FixedPrefixTokenCache(enc, "x", backtrack_pieces="3")


def test_wrong_argument_types_say_what_is_wrong():
    with pytest.raises(TypeError, match="prefix must be a str"):
        FixedPrefixTokenCache("cl100k_base", b"bytes")
    cache = FixedPrefixTokenCache("cl100k_base", "x")
    with pytest.raises(TypeError, match="suffix must be a str"):
        cache.encode(123)
    # A str is no set: tiktoken's own TypeError, word for word (tests/test_exactness.py has more).
    with pytest.raises(TypeError) as ours:
        cache.encode("y", allowed_special="<|endoftext|>")
    with pytest.raises(TypeError) as theirs:
        cache.encoding.encode("xy", allowed_special="<|endoftext|>")
    assert str(ours.value) == str(theirs.value)


def test_custom_encoding_with_unknown_pattern_is_exact():
    """No proof, no cache: exact because the whole text is encoded (tests/test_exactness.py)."""
    cl100k = get_encoding("cl100k_base")
    custom = tiktoken.Encoding(
        name="custom_words",
        pat_str=r"""\p{L}+|\p{N}|[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=cl100k._mergeable_ranks,
        special_tokens={"<|endoftext|>": 100257},
    )
    with pytest.warns(UncachedEncodingWarning, match="custom_words"):
        FixedPrefixTokenCache(custom, "warned once per encoding")
    for text in CORPUS[::2]:
        for prefix, suffix in splits(text):
            cache = FixedPrefixTokenCache(custom, prefix)
            assert cache.cut == 0
            assert cache.encode_ordinary(suffix) == custom.encode_ordinary(prefix + suffix)


def test_repr_and_views():
    cache = FixedPrefixTokenCache("cl100k_base", "You are a helpful assistant.")
    assert cache.prefix == "You are a helpful assistant."
    assert cache.encoding.name == "cl100k_base"
    assert "cl100k_base" in repr(cache)
    assert isinstance(cache.encode_ordinary_array("x"), array)
    assert isinstance(cache.encode_ordinary_delta("x"), TokenDelta)


@pytest.mark.parametrize("name", ["o200k_base"])
def test_tiktoken_panic_is_raised_as_tiktoken_raises_it(name):
    """o200k panics (a BaseException) on ~1M whitespace characters; we neither hide nor crash."""
    enc = get_encoding(name)
    huge = " " * 1_000_000
    with pytest.raises(BaseException) as theirs:  # noqa: B017 (pyo3's PanicException)
        enc.encode_ordinary("a" + huge + "b")
    cache = FixedPrefixTokenCache(enc, "a")
    with pytest.raises(BaseException) as ours_error:  # noqa: B017
        cache.encode_ordinary(huge + "b")
    assert type(ours_error.value) is type(theirs.value)
    assert cache.encode_ordinary(" fine") == enc.encode_ordinary("a fine")


@pytest.mark.parametrize("allowed", [frozenset(), frozenset({"<|endoftext|>"})])
def test_from_split_takes_a_split_computed_elsewhere(enc, allowed):
    prefix = "A prompt computed by the daemon.\nIt ends<|endoftext|> here " * 3
    split = split_prefix(enc, prefix, allowed_special=allowed)
    cache = FixedPrefixTokenCache.from_split(
        enc, prefix, split._replace(head=array("I", split.head)), allowed_special=allowed
    )
    suffix = " and a question?"
    assert cache.encode(suffix, allowed_special=allowed, disallowed_special=()) == enc.encode(
        prefix + suffix, allowed_special=allowed, disallowed_special=()
    )
    # The ordinary split of a cache built for another policy is computed on first need.
    assert cache.encode_ordinary(suffix) == enc.encode_ordinary(prefix + suffix)
    assert list(cache.encode_ordinary_array(suffix)) == enc.encode_ordinary(prefix + suffix)
