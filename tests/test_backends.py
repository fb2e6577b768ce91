"""Fast backends: exact or not used. Every answer is compared with tiktoken's."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashtoken import backends, get_encoding
from flashtoken.backend_gate import gate_texts
from flashtoken.backends import Encoder, get_encoder
from tests.corpus import CORPUS, SPECIALS
from tests.polling import wait_until
from tests.strategies import texts

INSTALLED = [
    name
    for name, module in (("toktok", "toktok"), ("gigatoken", "gigatoken"))
    if importlib.util.find_spec(module) is not None
]
needs_fast = pytest.mark.skipif(not INSTALLED, reason="no fast backend installed (the dev extra)")


@pytest.fixture(params=INSTALLED or [pytest.param("none", marks=needs_fast)], scope="session")
def fast(request, enc):
    encoder = Encoder(enc, request.param)
    assert encoder.backend == request.param, encoder.stats()
    return encoder


def test_default_is_tiktoken_itself(enc):
    encoder = get_encoder(enc)
    assert encoder.backend == "tiktoken"
    assert encoder.encode_ordinary == enc.encode_ordinary  # no wrapper on the default path
    assert get_encoder(enc) is encoder
    assert get_encoder(enc, encoder) is encoder


def test_gate_corpus_is_fixed_and_reaches_the_specials(enc):
    first, second = list(gate_texts(enc)), list(gate_texts(enc))
    assert first == second and len(first) > 500
    assert any(token in text for text in first for token in enc.special_tokens_set)
    assert any(len(text) >= 20000 and not text.strip() for text in first)


def test_fast_backend_matches_on_the_boundary_corpus(fast, enc):
    everything = frozenset(enc.special_tokens_set)
    for text in CORPUS:
        for joined in (text, "word " + text + " next", text * 3):
            assert fast.encode_ordinary(joined) == enc.encode_ordinary(joined), joined
            assert fast.count_ordinary(joined) == len(enc.encode_ordinary(joined)), joined
            want = enc.encode(joined, allowed_special=everything, disallowed_special=())
            assert fast.encode(joined, allowed_special=everything, disallowed_special=()) == want


@given(text=texts, pick=st.sets(st.sampled_from(SPECIALS)))
def test_fast_backend_matches_tiktoken(fast, enc, text, pick):
    assert fast.encode_ordinary(text) == enc.encode_ordinary(text)
    assert fast.count_ordinary(text) == len(enc.encode_ordinary(text))
    allowed = frozenset(pick) & enc.special_tokens_set
    want = enc.encode(text, allowed_special=allowed, disallowed_special=())
    assert fast.encode(text, allowed_special=allowed, disallowed_special=()) == want
    # Anything disallowed: tiktoken's own answer or error, whatever the backend.
    try:
        want = enc.encode(text, allowed_special=allowed)
    except ValueError:
        with pytest.raises(ValueError, match="disallowed special token"):
            fast.encode(text, allowed_special=allowed, disallowed_special="all")
    else:
        assert fast.encode(text, allowed_special=allowed, disallowed_special="all") == want


def test_text_a_backend_cannot_take_goes_to_tiktoken(fast, enc):
    # gigatoken cannot treat special-token text as ordinary; toktok rejects lone surrogates.
    for text in ("a <|endoftext|> b", "x\ud83dy", "\udc00z <|endoftext|>"):
        assert fast.encode_ordinary(text) == enc.encode_ordinary(text)
    stats = fast.stats()
    assert stats["routed_to_tiktoken"] >= 1
    assert stats["backend"] == fast.backend


def test_code_points_the_backend_classifies_otherwise_go_to_tiktoken(fast, enc):
    # Unicode 17 code points tiktoken 0.14 (Unicode 16) does not know: found by the gate.
    for text in ("\U000323b0:A", "word next\U000323b0:A", "x\ua7ce:B", "\U00016ea0 1a"):
        assert fast.encode_ordinary(text) == enc.encode_ordinary(text)
        assert fast.count_ordinary(text) == len(enc.encode_ordinary(text))
    assert fast.stats()["backend_avoided_code_points"] >= 0


@pytest.mark.parametrize(
    "filler",
    [
        "plain ascii words ",
        "caf\u00e9 na\u00efve ",
        "\u4e2d\u6587 text ",
        "emoji \U0001f44d ",
        "\U0001f680" * 80 + " ",
    ],  # 1, 2 and 4 bytes a character; many astral lead bytes
    ids=["ascii", "latin1", "bmp", "astral", "emoji-heavy"],
)
def test_avoided_code_points_are_found_in_every_string_width(fast, enc, filler):
    # The search runs after the backend's encode, on its UTF-8: each storage width of CPython
    # strings takes another path through it (and a long text the capped one).
    for avoided in ("", "\U000323b0:A", "\ua7ce:B", "\U00016ea0 1a"):
        for text in (filler * 50 + avoided, avoided + filler * 50, filler * 3 + avoided + filler):
            assert fast.encode_ordinary(text) == enc.encode_ordinary(text), text[:40]
            assert fast.count_ordinary(text) == len(enc.encode_ordinary(text))
            everything = frozenset(enc.special_tokens_set)
            want = enc.encode(text, allowed_special=everything, disallowed_special=())
            assert fast.encode(text, allowed_special=everything, disallowed_special=()) == want


def test_long_whitespace_runs_give_tiktoken_s_outcome(fast, enc):
    # tiktoken's regex overflows its stack near a million spaces (PanicException, a
    # BaseException): the backend must give that outcome too, not ids.
    for text in ("x" + " " * 200_000 + "y", " " * 1_000_000):
        try:
            want: object = enc.encode_ordinary(text)
        except BaseException as exc:  # noqa: BLE001 - the outcome compared is the type
            want = type(exc)
        try:
            got: object = fast.encode_ordinary(text)
        except BaseException as exc:  # noqa: BLE001
            got = type(exc)
        assert got == want


def _wrong_on(marker):
    """A backend that is tiktoken except on texts holding ``marker``: stands for a real bug."""

    class Wrong:
        def __init__(self, enc):
            self._enc = enc

        def ordinary(self, text):
            ids = self._enc.encode_ordinary(text)
            return ids[:-1] if marker in text else ids

        def special(self, text, allowed):
            return self._enc.encode(text, allowed_special=allowed, disallowed_special=())

        def count_ordinary(self, text):
            return len(self.ordinary(text))

    return Wrong


@pytest.fixture
def fake_backend(monkeypatch):
    def install(name, factory):
        monkeypatch.setitem(backends._FACTORIES, name, factory)
        monkeypatch.setattr(backends, "BACKENDS", (*backends.BACKENDS, name))

    return install


def test_a_backend_that_fails_the_gate_is_not_used(fake_backend):
    enc = get_encoding("cl100k_base")
    fake_backend("wrong-on-digits", _wrong_on("1"))
    with pytest.warns(RuntimeWarning, match=r"'wrong-on-digits'.*cl100k_base.*encode_ordinary of"):
        encoder = Encoder(enc, "wrong-on-digits")
    assert encoder.backend == "tiktoken"
    assert "failed the exactness gate" in encoder.stats()["backend_disabled"]
    assert encoder.encode_ordinary("x 12345 y") == enc.encode_ordinary("x 12345 y")


def test_shadow_disagreement_disables_the_backend(fake_backend, caplog):
    enc = get_encoding("cl100k_base")
    fake_backend("wrong-in-production", _wrong_on("RARE-MARKER"))
    encoder = Encoder(enc, "wrong-in-production", shadow_fraction=1.0)
    assert encoder.backend == "wrong-in-production"  # the gate never saw the marker
    assert encoder.encode_ordinary("fine") == enc.encode_ordinary("fine")
    encoder.encode_ordinary("a RARE-MARKER b")  # wrong, and caught only by the shadow check
    wait_until(lambda: encoder.stats()["shadow_mismatches"] == 1, 30, "no shadow check came")
    stats = encoder.stats()
    assert stats["backend"] == "tiktoken"
    assert "RARE-MARKER" in stats["backend_disabled"]
    assert "RARE-MARKER" in caplog.text
    assert encoder.encode_ordinary("a RARE-MARKER b") == enc.encode_ordinary("a RARE-MARKER b")


@needs_fast
def test_shadow_checks_agreeing_calls(enc):
    encoder = Encoder(enc, INSTALLED[0], shadow_fraction=1.0)
    for text in CORPUS:
        encoder.encode_ordinary(text)
    wait_until(
        lambda: (
            encoder.stats()["shadow_checked"] + encoder.stats()["shadow_dropped"]
            == encoder.stats()["shadow_offered"]
        ),
        30,
        "not every sampled call was checked",
    )
    stats = encoder.stats()
    assert stats["shadow_checked"] > 0 and stats["shadow_mismatches"] == 0
    assert encoder.backend == INSTALLED[0]


def test_fastest_never_raises(enc):
    encoder = Encoder(enc, "fastest")
    assert encoder.backend in (*INSTALLED, "tiktoken")
    assert encoder.encode_ordinary("hello world") == enc.encode_ordinary("hello world")


def test_fastest_takes_the_second_backend_for_large_texts(enc):
    encoder = Encoder(enc, "fastest")
    large = "".join(CORPUS) * 8  # > _LARGE characters, special-token text and surrogates too
    assert len(large) >= backends._LARGE
    for text in (large, large.replace("<|", "<"), large.encode("utf-8", "replace").decode()):
        want = enc.encode_ordinary(text)
        assert encoder.encode_ordinary(text) == want
        assert encoder.count_ordinary(text) == len(want)
    if len(INSTALLED) == 2:
        assert encoder.stats()["backend_large_texts"] == "gigatoken"


def test_bad_arguments_are_refused(fake_backend):
    with pytest.raises(ValueError, match="unknown backend 'fast'.*tiktoken, toktok"):
        Encoder("cl100k_base", "fast")
    with pytest.raises(ValueError, match="shadow_fraction"):
        Encoder("cl100k_base", "tiktoken", shadow_fraction=2)

    def missing(enc):
        raise ImportError("No module named 'nothing'")

    fake_backend("missing", missing)
    with pytest.raises(ImportError, match=r"pip install 'flashtoken\[missing\]'"):
        Encoder("cl100k_base", "missing")
    with pytest.raises(ValueError, match="the Encoder is for 'o200k_base'"):
        get_encoder("cl100k_base", Encoder("o200k_base"))


# -- the caches, with a fast backend for what they do not find cached ----------------------------


@pytest.fixture(params=INSTALLED + ["fastest"], scope="session")
def backend(request):
    return request.param


@given(prefix=texts, suffix=texts)
def test_fixed_prefix_cache_with_backend_is_exact(enc, backend, prefix, suffix):
    from flashtoken import FixedPrefixTokenCache

    cache = FixedPrefixTokenCache(enc, prefix, backend=backend)
    text = prefix + suffix
    want = enc.encode_ordinary(text)
    assert cache.encode_ordinary(suffix) == want
    assert cache.count_ordinary(suffix) == len(want)
    assert cache.encode_ordinary_array(suffix).tolist() == want
    assert cache.encode(suffix, allowed_special="all") == enc.encode(text, allowed_special="all")
    try:
        want = enc.encode(text)
    except ValueError:
        with pytest.raises(ValueError, match="disallowed special token"):
            cache.encode(suffix)
    else:
        assert cache.encode(suffix) == want


@given(prefix=texts, suffixes=st.lists(texts, min_size=1, max_size=3), first=st.booleans())
def test_a_lazy_fixed_prefix_cache_is_exact(enc, backend, prefix, suffixes, first):
    """eager=False: the first call encodes the whole text once, later ones use the split."""
    from flashtoken import FixedPrefixTokenCache

    cache = FixedPrefixTokenCache(enc, prefix, backend=backend, eager=False)
    for suffix in suffixes:
        want = enc.encode_ordinary(prefix + suffix)
        if first:
            assert cache.count_ordinary(suffix) == len(want)
        assert cache.encode_ordinary(suffix) == want
        assert cache.count_ordinary(suffix) == len(want)
        assert cache.encode_ordinary_array(suffix).tolist() == want
    assert list(cache.prefix_tokens) == enc.encode_ordinary(prefix)


@given(turns=st.lists(texts, max_size=6))
def test_append_only_cache_with_backend_is_exact(enc, backend, turns):
    from flashtoken import AppendOnlyPieceTokenCache

    chat = AppendOnlyPieceTokenCache(enc, backend=backend)
    held: list[int] = []
    text = ""
    for turn in turns:
        delta = chat.append_ordinary(turn)
        text += turn
        held[len(held) - delta.rollback_tokens :] = delta.tokens_to_append
        assert held == enc.encode_ordinary(text)


@given(texts_=st.lists(texts, min_size=1, max_size=4), shared=st.sampled_from(CORPUS))
def test_auto_prefix_cache_with_backend_is_exact(enc, backend, texts_, shared):
    from flashtoken import AutoPrefixCache

    cache = AutoPrefixCache(enc, block_bytes=16, backend=backend)
    for text in texts_:
        full = shared * 4 + text
        assert cache.encode_ordinary(full) == enc.encode_ordinary(full)
        assert cache.encode(full, allowed_special="all") == enc.encode(full, allowed_special="all")


def test_a_cache_takes_an_encoder_of_its_encoding():
    from flashtoken import FixedPrefixTokenCache

    encoder = get_encoder("cl100k_base", "fastest")
    cache = FixedPrefixTokenCache("cl100k_base", "You are a helpful assistant.", backend=encoder)
    assert cache.encode_ordinary(" Hi") == encoder.encoding.encode_ordinary(
        "You are a helpful assistant. Hi"
    )
    with pytest.raises(ValueError, match="the Encoder is for 'cl100k_base'"):
        FixedPrefixTokenCache("o200k_base", "x", backend=encoder)


@pytest.mark.parametrize("start", [0, 1, 49_999, 50_000, 50_001, 123_457])
@pytest.mark.parametrize("length", [99_999, 100_000, 100_001])
def test_the_long_run_search_agrees_with_the_regex(start, length):
    # The search looks at every 50,000th character first: each placement of a run just under,
    # at and over the limit, alone or beside other whitespace, must be measured right.
    for space in (" ", "\u3000", "\t"):
        for before, after in (("x", "y"), ("x", " y"), ("x\n", "y")):
            text = before * start + space * length + after * 70_000
            longest = max(len(list(run)) for ws, run in itertools.groupby(text, str.isspace) if ws)
            assert backends._has_long_run(text) == (longest >= backends._LONG_RUN), longest


needs_gigatoken = pytest.mark.skipif(
    "gigatoken" not in INSTALLED, reason="gigatoken is not installed (the dev extra)"
)


@needs_gigatoken
def test_gigatoken_answers_only_without_a_special_token_outside_allowed(enc):
    # gigatoken recognises every special token; its answer is kept only when it holds no id of
    # a token outside `allowed`, told by the ids (two o200k_harmony tokens share 200018).
    encoder = Encoder(enc, "gigatoken")
    specials = sorted(enc.special_tokens_set)
    shared = [s for s in specials if enc.encode_single_token(s) == 200018]
    picks = [frozenset(), frozenset(specials), *(frozenset({s}) for s in specials[:3] + shared)]
    for special in [*specials[:3], *shared, *SPECIALS[:2]]:
        if special not in enc.special_tokens_set:
            continue
        for text in (special, f"a {special} b", f"x{special}{special[:-2]}", f"{special}\u4e2d"):
            assert encoder.encode_ordinary(text) == enc.encode_ordinary(text), text
            assert encoder.count_ordinary(text) == len(enc.encode_ordinary(text)), text
            for allowed in picks:
                want = enc.encode(text, allowed_special=allowed, disallowed_special=())
                got = encoder.encode(text, allowed_special=allowed, disallowed_special=())
                assert got == want, (text, sorted(allowed)[:2])


def _utf8_cached(text: str) -> str:
    """``text`` with CPython's UTF-8 copy made, as a backend's read of it leaves it."""
    import ctypes

    as_utf8 = ctypes.pythonapi.PyUnicode_AsUTF8AndSize
    as_utf8.restype, as_utf8.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_void_p]
    as_utf8(text, None)
    return text


@given(text=st.text(min_size=1, max_size=300), cached=st.booleans())
def test_the_width_test_errs_towards_a_search(text, cached):
    # no_astral / one_byte may be True only for strings that are so, whatever their size holds.
    import sys

    from flashtoken.backend_adapters import _width_floors

    text = "".join(text)  # a fresh string, without a UTF-8 copy yet
    if cached:
        _utf8_cached(text)
    four, two = _width_floors()
    size, n = sys.getsizeof(text), len(text)
    if size < four + 4 * n:
        assert all(c <= "\uffff" for c in text)
        if size < two + 2 * n:
            assert all(c <= "\u00ff" for c in text)
    # And it does tell (a fresh string: one character may be an interned one, read before).
    if not cached and n > 1 and all(c <= "\uffff" for c in text):
        assert size < four + 4 * n or sys.implementation.name != "cpython"


@pytest.mark.parametrize("filler", ["caf\u00e9 ", "\u4e2d\u6587 text ", "emoji \U0001f44d "])
def test_avoided_code_points_are_found_in_text_read_as_utf8_before(fast, enc, filler):
    # A string whose UTF-8 copy exists already (read before by someone) looks wider by its size.
    for avoided in ("\U000323b0:A", "\ua7ce:B", "\u0c5c 1a"):
        for text in (filler * 40 + avoided, avoided + filler * 40):
            text = _utf8_cached("".join(text))
            assert fast.encode_ordinary(text) == enc.encode_ordinary(text), text[:40]
            assert fast.count_ordinary(text) == len(enc.encode_ordinary(text))
