"""AppendOnlyPieceTokenCache: after any sequence of appends, tokens == tiktoken(text)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashtoken import AppendOnlyPieceTokenCache, TokenDelta
from tests.corpus import CORPUS
from tests.strategies import texts


def apply(tokens, delta):
    assert isinstance(delta, TokenDelta)
    assert 0 <= delta.rollback_tokens <= len(tokens)
    return tokens[: len(tokens) - delta.rollback_tokens] + delta.tokens_to_append


@given(initial=texts, parts=st.lists(texts, max_size=8))
def test_appends_equal_one_encode(enc, initial, parts):
    cache = AppendOnlyPieceTokenCache(enc, initial)
    held = enc.encode_ordinary(initial)
    assert cache.tokens == held
    text = initial
    for part in parts:
        held = apply(held, cache.append_ordinary(part))
        text += part
        assert held == enc.encode_ordinary(text)
    assert cache.tokens == held and cache.text == text
    assert cache.token_count == len(held)


@given(initial=texts, parts=st.lists(texts, max_size=6), allowed=st.sampled_from(["all", set()]))
def test_appends_with_special_tokens_equal_one_encode(enc, initial, parts, allowed):
    kwargs = dict(allowed_special=allowed, disallowed_special=())
    cache = AppendOnlyPieceTokenCache(enc, initial, **kwargs)
    held = enc.encode(initial, **kwargs)
    text = initial
    for part in parts:
        held = apply(held, cache.append(part))
        text += part
        assert held == enc.encode(text, **kwargs)


@given(initial=texts, parts=st.lists(texts, max_size=6))
def test_disallowed_append_raises_and_changes_nothing(enc, initial, parts):
    try:
        enc.encode(initial)
    except ValueError:
        return  # the initial text itself is refused; covered below
    cache = AppendOnlyPieceTokenCache(enc, initial, allowed_special=set(), disallowed_special="all")
    text = initial
    for part in parts:
        try:
            enc.encode(text + part)
        except ValueError as theirs:
            with pytest.raises(ValueError) as ours:
                cache.append(part)
            assert str(ours.value) == str(theirs)
            assert cache.text == text and cache.tokens == enc.encode(text)
            continue
        cache.append(part)
        text += part
        assert cache.tokens == enc.encode(text)


@given(history=st.lists(texts, min_size=1, max_size=6), data=st.data())
def test_set_text_from_any_common_prefix(enc, history, data):
    cache = AppendOnlyPieceTokenCache(enc)
    held = []
    for part in history:
        held = apply(held, cache.append_ordinary(part))
    text = cache.text
    keep = data.draw(st.integers(0, len(text)))
    new = text[:keep] + data.draw(texts)
    held = apply(held, cache.set_text(new))
    assert held == enc.encode_ordinary(new)
    assert cache.text == new
    held = apply(held, cache.append_ordinary(" and more"))
    assert held == enc.encode_ordinary(new + " and more")


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_corpus_one_character_at_a_time(enc, text):
    cache = AppendOnlyPieceTokenCache(enc, "", 2 if enc.name != "cl100k_base" else 1)
    held = []
    for i, char in enumerate(text):
        held = apply(held, cache.append_ordinary(char))
        assert held == enc.encode_ordinary(text[: i + 1]), (text, i)


def test_chat_template_rewriting_its_generation_prompt(enc):
    cache = AppendOnlyPieceTokenCache(enc, allowed_special="all", disallowed_special=())
    history = "<|start|>system<|message|>Be brief.<|end|>"
    held = []
    for turn in range(20):
        history += f"<|start|>user<|message|>Question {turn}?<|end|>"
        rendered = history + "<|start|>assistant"  # the generation prompt, rewritten next turn
        held = apply(held, cache.set_text(rendered))
        assert held == enc.encode(rendered, allowed_special="all")
        history += f"<|start|>assistant<|message|>Answer {turn}.<|end|>"


def test_cost_of_an_append_does_not_grow_with_history(enc):
    """The text after the stable cut stays a few pieces long, however long the history."""
    cache = AppendOnlyPieceTokenCache(enc, "Hello. " * 5000)
    for turn in range(50):
        cache.append_ordinary(f" User says {turn}: something. Assistant answers.\n")
        assert len(cache.text) - cache._fixed_len < 100


def test_append_ordinary_refused_in_special_token_mode():
    cache = AppendOnlyPieceTokenCache("cl100k_base", allowed_special="all")
    with pytest.raises(ValueError, match="use append"):
        cache.append_ordinary("x")


def test_huge_whitespace_panic_leaves_the_cache_intact():
    cache = AppendOnlyPieceTokenCache("o200k_base", "hello")
    with pytest.raises(BaseException):  # noqa: B017 (pyo3's PanicException)
        cache.append_ordinary(" " * 1_000_000 + "x")
    assert cache.text == "hello"
    cache.append_ordinary(" world")
    assert cache.tokens == cache.encoding.encode_ordinary("hello world")
