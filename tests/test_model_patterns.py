"""The open models' split patterns: same pieces as tiktoken's Rust regex, and their proofs checked.

tiktoken's own pieces are observed through tiktoken (tests/pieces.py), so every comparison here
is against the real engine. The proofs of docs/ALGORITHM.md ("The open models") are checked by a
bounded exhaustive search: every string up to a length over an alphabet with one character of
each class the pattern tells apart, every split of it.
"""

from __future__ import annotations

import random
import sys

import pytest
import regex
import tiktoken
from hypothesis import given
from hypothesis import strategies as st

from flashtoken import (
    AppendOnlyPieceTokenCache,
    AutoPrefixCache,
    FixedPrefixTokenCache,
    get_encoding,
    models,
)
from flashtoken import unicode as uni
from flashtoken.boundary import _CL100K, _O200K, _R50K, PROVEN_PIECES, _compile
from tests.corpus import CORPUS, splits
from tests.pieces import (
    all_strings,
    anchor_violations,
    engine_mismatches,
    tiktoken_pieces,
    trailing_pieces_changed,
)
from tests.strategies import ATOMS, texts

# name -> (pattern, K proven in docs/ALGORITHM.md). Llama 4's pattern is o200k's.
PATTERNS = {
    "llama3": (models.LLAMA3_PATTERN, 2),
    "llama4": (models.LLAMA4_PATTERN, 2),
    "tekken": (models.TEKKEN_PATTERN, 2),
    "kimi": (models.KIMI_PATTERN, 2),
}
# One character per class the patterns tell apart, in alphabets small enough to enumerate:
# letters by case (ASCII, Lm, Lt, a combining mark, Han and a non-Han Lo), the contraction
# letters, digits, symbols (and o200k's "/"), and whitespace of every kind the patterns split on.
ALPHABETS = {
    "letters": ("aZʰǅ\u0301中ア's", 4),
    "whitespace": (" \t\r\n\xa0a.", 5),
    "digits and symbols": ("1٣./ a'\n", 5),
    "mixed": ("a Z\n1.'中\u0301\t", 4),
}


@pytest.fixture(scope="module", params=list(ALPHABETS))
def strings(request: pytest.FixtureRequest) -> list[str]:
    alphabet, length = ALPHABETS[request.param]
    return all_strings(alphabet, length)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_proven_with_k(name: str) -> None:
    pattern, k = PATTERNS[name]
    assert PROVEN_PIECES[pattern] == k
    assert models.LLAMA4_PATTERN == _O200K


@pytest.mark.parametrize("name", list(PATTERNS))
def test_pieces_equal_tiktokens_exhaustively(name: str, strings: list[str]) -> None:
    assert engine_mismatches(PATTERNS[name][0], strings) == []


@pytest.mark.parametrize("pattern", [_R50K, _CL100K], ids=["r50k", "cl100k"])
def test_openai_patterns_compile_alike_too(pattern: str, strings: list[str]) -> None:
    """_compile's V1 mode is used for every proven pattern, OpenAI's included."""
    assert engine_mismatches(pattern, strings) == []


@pytest.mark.parametrize("name", list(PATTERNS))
def test_an_append_changes_at_most_k_pieces_exhaustively(name: str, strings: list[str]) -> None:
    pattern, k = PATTERNS[name]
    worst, example = trailing_pieces_changed(pattern, strings)
    assert worst <= k, f"{example[0]!r} + {example[1]!r} changes {worst} pieces"


@pytest.mark.parametrize(
    "name, prefix, suffix",
    [
        ("llama3", "x\n ", "\n"),  # "\n" " " -> "\n \n": \s*[\r\n]+ read the end, gave back " "
        ("tekken", "中Z", "a"),  # as o200k: the first letter alternative gave back "Z"
        ("tekken", "\u0301Z", "a"),  # a mark is a letter alternative's optional lead, too
        ("kimi", "don'", "t"),
        ("kimi", "ʰZ", "a"),  # Lm and Lu are no Han: the letter alternatives as in o200k
    ],
)
def test_k_is_needed(name: str, prefix: str, suffix: str) -> None:
    """K = 1 would be wrong: these appends change the last two pieces."""
    pattern = _compile(PATTERNS[name][0])
    before, after = pattern.findall(prefix), pattern.findall(prefix + suffix)
    assert before[:-2] == after[: len(before) - 2] and before[-2] != after[len(before) - 2]


@pytest.mark.parametrize("name", list(PATTERNS))
def test_anchor_claim_exhaustively(name: str, strings: list[str]) -> None:
    assert anchor_violations(PATTERNS[name][0], strings) == []


def _certain_text(rng: random.Random, pool: list[str]) -> str:
    text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 10)))
    # The Unicode tables are unicode.py's concern: skip what it already treats as uncertain.
    text = text.encode("utf-8", "ignore").decode("utf-8")
    return text[: uni.first_uncertain(text, 0, len(text))]


@pytest.mark.parametrize("name", list(PATTERNS))
def test_pieces_equal_tiktokens_on_random_text(name: str) -> None:
    rng = random.Random(17)
    pool = ATOMS + [chr(rng.randrange(0x20, 0x30000)) for _ in range(400)] + ["ア", "ｱ", "〇"]
    samples = [_certain_text(rng, pool) for _ in range(3000)]
    assert engine_mismatches(PATTERNS[name][0], samples) == []


@pytest.mark.parametrize("pattern", [models.LLAMA3_PATTERN, _O200K, models.KIMI_PATTERN, _CL100K])
def test_case_insensitive_groups_fold_as_rust_does(pattern: str) -> None:
    """(?i:'s|'t|...) with every character that has a case mapping: simple folding only."""
    cased = [
        chr(c)
        for c in range(sys.maxunicode + 1)
        if not 0xD800 <= c <= 0xDFFF
        and (chr(c).lower() != chr(c) or chr(c).upper() != chr(c) or chr(c).casefold() != chr(c))
    ]
    cased = [c for c in cased if uni.first_uncertain(c, 0, 1) == 1]
    samples = [t for c in cased for t in ("'" + c, "'" + c + "e", "'r" + c, "'l" + c, "'v" + c)]
    assert engine_mismatches(pattern, samples) == []


@pytest.mark.parametrize(
    "pattern, text",
    [
        (r"[\p{L}&&[^\p{Han}]]+|[\p{Han}]+|.", "abc中文déf&&[]"),  # intersection
        (r"[a-z--[aeiou]]+|.", "strength and vowels"),  # difference
        (r"[a-f~~d-k]+|.", "abcdefghijk"),  # symmetric difference
        (r"[[a-c][x-z]]+|.", "abxyzmc"),  # nested classes
        (r"(?i:ss|k)|(?s:.)", "ß SS ss \u212a K ſs"),  # simple case folding, never full
        (r"\s+$|\s|.", "a \n"),  # $ only at the very end
        (r"\s+$|\s|.", "a \n\n"),
        (r"[\]a]+|.", "]a]b"),
    ],
)
def test_constructs_mean_what_they_mean_to_tiktoken(pattern: str, text: str) -> None:
    assert _compile(pattern).findall(text) == tiktoken_pieces(pattern, [text])[0]


@pytest.mark.parametrize("pattern", [r"[a||b]+|.", r"[[:alpha:]]+|.", r"x|[^[:^digit:]]"])
def test_constructs_the_engines_read_differently_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="read differently"):
        _compile(pattern)


def test_han_is_certain_where_its_category_group_is() -> None:
    """Kimi splits on \\p{Han}, a script, not a category: unicode.py's check must stop
    at every code point whose Han-ness tiktoken's tables may see otherwise than regex's. Today
    each one is also a category change (all are newly assigned ideographs); this watches that."""
    cps = [chr(c) for c in range(0x40000) if not 0xD800 <= c <= 0xDFFF]
    han = regex.compile(r"\p{Han}")
    disagree = []
    for start in range(0, len(cps), 65536):
        chunk = cps[start : start + 65536]
        ranks = {bytes([b]): b for b in range(256)}
        for c in chunk:
            ranks.setdefault((c + c).encode(), len(ranks))
        enc = tiktoken.Encoding(
            "han", pat_str=r"\p{Han}+|(?s:.)", mergeable_ranks=ranks, special_tokens={}
        )
        doubled = enc.encode_ordinary_batch([c + c for c in chunk])
        for c, tokens in zip(chunk, doubled, strict=True):
            if (len(tokens) == 1) != bool(han.match(c)):
                disagree.append(c)
    certain = [c for c in disagree if uni.first_uncertain(c, 0, 1) == 1]
    assert certain == []


def _kimi_like() -> tiktoken.Encoding:
    # Kimi's file is not on PyPI: its pattern with cl100k's ranks and specials. The proof is
    # about the pattern; the ranks only decide the BPE inside each piece.
    cl100k = get_encoding("cl100k_base")
    return tiktoken.Encoding(
        "kimi-pattern",
        pat_str=models.KIMI_PATTERN,
        mergeable_ranks=cl100k._mergeable_ranks,
        special_tokens=cl100k._special_tokens,
    )


@pytest.fixture(scope="module", params=["llama3", "llama4", "tekken", "kimi"])
def model_enc(request: pytest.FixtureRequest) -> tiktoken.Encoding:
    if request.param == "kimi":
        return _kimi_like()
    pytest.importorskip({"tekken": "mistral_common"}.get(request.param, "llama_models"))
    return get_encoding(request.param)


model_texts = st.lists(
    st.one_of(texts, st.sampled_from(["ア", "ｱ", "〇", "中Z", "ʰZ"])), max_size=6
)


@given(prefix=model_texts.map("".join), suffix=model_texts.map("".join))
def test_fixed_prefix_with_the_proven_k(model_enc: tiktoken.Encoding, prefix, suffix) -> None:
    cache = FixedPrefixTokenCache(model_enc, prefix, backtrack_pieces=1)
    assert cache.backtrack_pieces == 2  # raised to the proven minimum, which is what runs
    assert cache.encode_ordinary(suffix) == model_enc.encode_ordinary(prefix + suffix)
    assert cache.encode(suffix, allowed_special="all") == model_enc.encode(
        prefix + suffix, allowed_special="all"
    )


@given(parts=st.lists(model_texts.map("".join), max_size=8))
def test_appends_with_the_proven_k(model_enc: tiktoken.Encoding, parts) -> None:
    cache = AppendOnlyPieceTokenCache(model_enc, "", 1)
    tokens: list[int] = []
    for part in parts:
        delta = cache.append_ordinary(part)
        tokens = tokens[: len(tokens) - delta.rollback_tokens] + delta.tokens_to_append
        assert tokens == cache.tokens == model_enc.encode_ordinary(cache.text)


@given(parts=st.lists(model_texts.map("".join), min_size=1, max_size=5), data=st.data())
def test_automatic_reuse_with_the_proven_k(model_enc: tiktoken.Encoding, parts, data) -> None:
    cache = AutoPrefixCache(model_enc, block_bytes=16, backtrack_pieces=1)
    seen = [""]
    for part in parts:
        base = data.draw(st.sampled_from(seen))
        text = base[: data.draw(st.integers(0, len(base)))] + part * 2
        seen.append(text)
        assert cache.encode_ordinary(text) == model_enc.encode_ordinary(text)


# The boundary corpus, with the model encodings' own special tokens among the texts.
MODEL_CORPUS = CORPUS + [
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<|header_start|>user<|header_end|>\n\nHi<|eot|>",
    "[INST] Hi [/INST]</s>",
    "ʰZa 中Za \u0301Za xʰZ",
]


def test_boundary_corpus_every_split(model_enc: tiktoken.Encoding) -> None:
    for text in MODEL_CORPUS:
        for prefix, suffix in splits(text):
            cache = FixedPrefixTokenCache(model_enc, prefix, backtrack_pieces=1)
            assert cache.encode_ordinary(suffix) == model_enc.encode_ordinary(text)
            assert cache.encode(suffix, allowed_special="all") == model_enc.encode(
                text, allowed_special="all"
            )
        chat = AppendOnlyPieceTokenCache(model_enc, "", 1)
        for char in text:  # one character at a time: every split of it is a cut
            chat.append_ordinary(char)
        assert chat.tokens == model_enc.encode_ordinary(text)
