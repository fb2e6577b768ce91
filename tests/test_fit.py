"""Counting and cutting (flashtoken/fit.py) and tiktoken's batch / numpy / decode calls on the
caches (flashtoken/parity.py): every answer against tiktoken's on the whole text."""

from __future__ import annotations

import importlib.util

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashtoken import AutoPrefixCache, FixedPrefixTokenCache, fit, unicode
from tests.corpus import CORPUS
from tests.strategies import texts

FAST = [
    name
    for name, module in (("toktok", "toktok"), ("gigatoken", "gigatoken"))
    if importlib.util.find_spec(module) is not None
]


@pytest.fixture(params=["tiktoken", *FAST], scope="module")
def backend(request):
    return request.param


def _check_cut(enc, text: str, max_tokens: int, cut: fit.Cut) -> None:
    """The cut's ids are the text's first ones, at most max_tokens, spell text[:offset], and no
    longer run of the first ids up to max_tokens ends at a character boundary."""
    ids = enc.encode_ordinary(text)
    n = len(cut.tokens)
    assert cut.tokens == ids[:n] and n <= max_tokens
    spelled = enc.decode_bytes(cut.tokens)
    assert spelled == unicode.repair_surrogates(text[: cut.offset]).encode("utf-8")
    if len(ids) <= max_tokens:
        assert (n, cut.offset) == (len(ids), len(text))
        return
    whole = enc.decode_bytes(ids)
    for m in range(n + 1, max_tokens + 1):  # each longer run ends inside a character
        end = len(enc.decode_bytes(ids[:m]))
        assert whole[end] & 0xC0 == 0x80, (m, end)


@given(text=texts, slack=st.integers(-3, 3))
def test_fits_and_truncate_are_tiktoken_s(enc, backend, text, slack):
    count = len(enc.encode_ordinary(text))
    for limit in {max(0, count + slack), 0, max(0, count // 2)}:
        assert fit.fits_ordinary(enc, text, limit, backend=backend) == (count <= limit)
        _check_cut(enc, text, limit, fit.truncate_ordinary(enc, text, limit, backend=backend))
    assert fit.count_ordinary(enc, text, backend=backend) == count


@given(prefix=texts, suffix=texts, limit=st.integers(0, 40), lazy=st.booleans())
def test_the_prefix_cache_fits_and_truncates_exactly(enc, backend, prefix, suffix, limit, lazy):
    cache = FixedPrefixTokenCache(enc, prefix, backend=backend, eager=not lazy)
    text = prefix + suffix
    count = len(enc.encode_ordinary(text))
    assert cache.fits_ordinary(suffix, limit) == (count <= limit)
    assert cache.fits_ordinary(suffix, count)
    assert count == 0 or not cache.fits_ordinary(suffix, count - 1)
    _check_cut(enc, text, limit, cache.truncate_ordinary(suffix, limit))


@pytest.mark.parametrize("text", CORPUS[::5])
def test_cuts_on_the_boundary_corpus(enc, text):
    long = text * 5
    cache = FixedPrefixTokenCache(enc, long)
    for limit in range(0, min(len(enc.encode_ordinary(long)), 60) + 2):
        _check_cut(enc, long, limit, fit.truncate_ordinary(enc, long, limit))
        _check_cut(enc, long + " tail", limit, cache.truncate_ordinary(" tail", limit))


def test_a_cut_inside_the_cached_prefix_takes_the_cached_ids(enc):
    prefix = "You are a helpful assistant. " * 50
    cache = FixedPrefixTokenCache(enc, prefix)
    cut = cache.truncate_ordinary(" and then", 20)
    assert cut.tokens == enc.encode_ordinary(prefix)[:20]
    # The very int objects of the cached head (shared ints, flashtoken/ids.py): no new encode.
    head = cache.prefix_tokens
    assert all(mine is cached for mine, cached in zip(cut.tokens, head, strict=False))
    assert any(token > 256 for token in cut.tokens)
    assert cache.fits_ordinary("", 10_000) and not cache.fits_ordinary("", 5)


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_tokens must be 0 or more"):
        fit.fits_ordinary("cl100k_base", "x", -1)
    with pytest.raises(TypeError, match="max_tokens must be an int"):
        fit.truncate_ordinary("cl100k_base", "x", 1.5)  # type: ignore[arg-type]


# -- parity: tiktoken's batch, numpy and decode calls ------------------------------------------


@given(prefix=texts, suffixes=st.lists(texts, max_size=5))
def test_the_caches_batch_numpy_and_decode_are_tiktoken_s(enc, backend, prefix, suffixes):
    fixed = FixedPrefixTokenCache(enc, prefix, backend=backend)
    auto = AutoPrefixCache(enc, block_bytes=16, backend=backend)
    whole = [prefix + s for s in suffixes]
    want = enc.encode_ordinary_batch(whole)
    assert fixed.encode_ordinary_batch(suffixes, num_threads=3) == want
    assert auto.encode_ordinary_batch(whole) == want
    allowed = enc.encode_batch(whole, allowed_special="all")
    assert fixed.encode_batch(suffixes, allowed_special="all") == allowed
    assert auto.encode_batch(whole, allowed_special="all", num_threads=1) == allowed
    for suffix, text, ids in zip(suffixes, whole, allowed, strict=True):
        if not unicode.has_surrogates(text):
            array = fixed.encode_to_numpy(suffix, allowed_special="all")
            assert array.dtype == numpy.uint32 and array.tolist() == ids
            assert auto.encode_to_numpy(text, allowed_special="all").tolist() == ids
        assert fixed.decode(ids) == auto.decode(ids) == enc.decode(ids)
        try:
            plain = enc.encode_to_numpy(text).tolist()
        except ValueError as exc:  # a disallowed special token, or surrogates: not repaired here
            for call in (lambda: fixed.encode_to_numpy(suffix), lambda: auto.encode_to_numpy(text)):
                with pytest.raises(type(exc)):
                    call()
        else:
            assert fixed.encode_to_numpy(suffix).tolist() == plain
            assert auto.encode_to_numpy(text).tolist() == plain


def test_a_batch_raises_tiktoken_s_error():
    cache = FixedPrefixTokenCache("cl100k_base", "Hi ")
    with pytest.raises(ValueError, match="disallowed special token"):
        cache.encode_batch(["fine", "<|endoftext|>"], num_threads=2)
    assert cache.encode_batch([]) == []
