"""flashtoken.models: the open-model encodings, against the models' own reference tokenizers.

The reference code is imported where it runs without torch or a network (llama-models'
``Tokenizer``, mistral-common's ``Tekkenizer``); Kimi's ``tokenization_kimi.py`` needs
transformers, so it is read faithfully here instead (the same tiktoken calls, in the test).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load

from flashtoken import FixedPrefixTokenCache, get_encoding, models
from flashtoken.errors import EncodingUnavailable

llama3_ref = pytest.importorskip("llama_models.llama3.tokenizer")
llama4_ref = pytest.importorskip("llama_models.llama4.tokenizer")
tekken_ref = pytest.importorskip("mistral_common.tokens.tokenizers.tekken")

SAMPLES = [
    "",
    "hello world",
    "Hello, wörld! 123456  \n\n x",
    "def f(x):\n    return x ** 2  # squares\n",
    "中文字符和日本語のテキスト、한국어 텍스트",
    "emoji 👍🏽 and combining e\u0301 marks, it's they'll we've I'M   \t trailing   ",
    "<|begin_of_text|><|eot_id|><|header_start|> [INST] <s> </s> [TOOL_CALLS] <SPECIAL_42>",
    "\ud83d\ude00 lone \ud800 surrogates \udfff",
]


@pytest.fixture(scope="module")
def references() -> dict[str, object]:
    import mistral_common

    data = Path(mistral_common.__file__).parent / "data"
    return {
        "llama3": llama3_ref.Tokenizer.get_instance(),
        "llama4": llama4_ref.Tokenizer.get_instance(),
        "tekken": tekken_ref.Tekkenizer.from_file(data / "tekken_240911.json"),
    }


def test_patterns_are_the_references() -> None:
    assert models.LLAMA3_PATTERN == llama3_ref.Tokenizer.pat_str
    assert models.LLAMA4_PATTERN == llama4_ref.Tokenizer.O200K_PATTERN
    assert models.LLAMA4_PATTERN == get_encoding("o200k_base")._pat_str
    assert get_encoding("tekken")._pat_str == models.TEKKEN_PATTERN


@pytest.mark.parametrize("name", ["llama3", "llama4"])
def test_llama_equals_reference(name: str, references: dict[str, object]) -> None:
    ref = references[name]
    enc = get_encoding(name)
    assert type(enc) is tiktoken.Encoding and enc.name == name
    assert enc._pat_str == ref.model._pat_str
    assert enc._special_tokens == ref.special_tokens
    assert enc._mergeable_ranks == ref.model._mergeable_ranks
    assert enc.n_vocab == ref.n_words
    for text in SAMPLES:
        assert enc.encode_ordinary(text) == ref.encode(text, bos=False, eos=False)
        assert enc.encode(text, allowed_special="all") == ref.encode(
            text, bos=False, eos=False, allowed_special="all"
        )


def test_tekken_equals_reference(references: dict[str, object]) -> None:
    ref = references["tekken"]
    enc = get_encoding("tekken")
    specials = {str(t["token_str"]): t["rank"] for t in ref._all_special_tokens}
    assert enc._special_tokens == specials
    assert len(specials) == ref.num_special_tokens == 1000
    assert enc.n_vocab == ref.n_words
    for text in SAMPLES:
        ids = ref.encode(text, bos=False, eos=False)
        assert enc.encode_ordinary(text) == ids
        assert enc.decode(ids) == ref.decode(ids)
    # Control tokens are ids the instruct tokenizer inserts; text never becomes one in Tekken.
    # Here they are tiktoken specials: allowed, the text "[INST]" gives Mistral's id for it.
    assert enc.encode("[INST]hi", allowed_special="all") == [
        ref.get_special_token("[INST]"),
        *ref.encode("hi", bos=False, eos=False),
    ]
    with pytest.raises(ValueError, match="disallowed special token"):
        enc.encode("[INST]")


def test_cached_paths_give_the_reference_ids(references: dict[str, object]) -> None:
    prefix = "You are a careful assistant.\n" * 40 + "Total: 12"
    for name, ref in references.items():
        cache = FixedPrefixTokenCache(name, prefix)
        for suffix in ["3 apples", "'s", "\n\n", " 中文", "  x"]:
            assert cache.encode_ordinary(suffix) == ref.encode(
                prefix + suffix, bos=False, eos=False
            )


def test_llama_reference_split(references: dict[str, object]) -> None:
    enc = get_encoding("llama3")
    ref = references["llama3"]
    texts = [
        "word " * 90_000,  # 450k characters: cut at 400k
        "x" * 25_003 + " tail",  # a 25k non-whitespace run
        "a" + " " * 30_000 + "b\n\n",  # a 25k whitespace run
        "\u2028" * 25_001 + "\x1c" * 3,  # str.isspace, not regex's \s, decides
        "short text",
    ]
    for text in texts:
        expected = ref.encode(text, bos=False, eos=False)
        assert models.llama_reference_encode(enc, text) == expected
        assert "".join(models.llama_reference_segments(text)) == text
    assert models.llama_reference_encode(enc, "short text") == enc.encode("short text")
    long_run = "abcdefg" * 3600  # 25,200 characters: the cut at 25,000 falls inside a token
    assert models.llama_reference_encode(enc, long_run) != enc.encode(long_run)


def test_wrong_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = dataclasses.replace(models._LLAMA3_FILE, sha256="0" * 64)
    monkeypatch.setattr(models, "_LLAMA3_FILE", bad)
    with pytest.raises(EncodingUnavailable, match="has sha256 82e9d319.*not the 0000"):
        models.ENCODING_CONSTRUCTORS["llama3"]()


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    gone = dataclasses.replace(models._TEKKEN_FILE, package="no_such_package_here")
    monkeypatch.setattr(models, "_TEKKEN_FILE", gone)
    with pytest.raises(EncodingUnavailable, match=r"pip install 'flashtoken\[mistral\]'"):
        models.ENCODING_CONSTRUCTORS["tekken"]()


def _write_kimi_files(directory: Path) -> tuple[Path, dict[int, str]]:
    """A tiktoken.model (cl100k's ranks stand in for Kimi's) and a tokenizer_config.json."""
    ranks = get_encoding("cl100k_base")._mergeable_ranks
    import base64

    lines = [base64.b64encode(token) + b" " + str(rank).encode() for token, rank in ranks.items()]
    model = directory / "tiktoken.model"
    model.write_bytes(b"\n".join(lines) + b"\n")
    base = len(ranks)
    named = {base: "[BOS]", base + 1: "[EOS]", base + 4: "<|im_end|>", base + 257: "<|im_middle|>"}
    decoder = {str(i): {"content": c, "special": True} for i, c in named.items()}
    (directory / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    return model, named


def test_kimi_equals_a_faithful_reading_of_its_tokenizer(tmp_path: Path) -> None:
    model, named = _write_kimi_files(tmp_path)
    enc = models.kimi_encoding(model)
    # tokenization_kimi.py: load_tiktoken_bpe, then 256 + 2 specials numbered from the ranks,
    # named by added_tokens_decoder, else <|reserved_token_{i}|>.
    ranks = tiktoken.load.load_tiktoken_bpe(str(model))
    specials = {
        named.get(i, f"<|reserved_token_{i}|>"): i for i in range(len(ranks), len(ranks) + 258)
    }
    reference = tiktoken.Encoding(
        name="tiktoken.model",
        pat_str=models.KIMI_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=specials,
    )
    assert enc._special_tokens == specials and enc._mergeable_ranks == ranks
    for text in SAMPLES:
        assert enc.encode(text, allowed_special="all") == reference.encode(
            text, allowed_special="all"
        )
    # The Han run is its own piece: "中文" and "abc" are never one piece.
    assert enc.encode_ordinary("abc中文") == enc.encode_ordinary("abc") + enc.encode_ordinary(
        "中文"
    )


def test_kimi_errors(tmp_path: Path) -> None:
    with pytest.raises(EncodingUnavailable, match="tiktoken.model beside tokenizer_config.json"):
        models.kimi_encoding(tmp_path / "missing.model")
    model, _ = _write_kimi_files(tmp_path)
    with pytest.raises(EncodingUnavailable, match="not 00"):
        models.kimi_encoding(model, sha256="00" * 32)
    (tmp_path / "tokenizer_config.json").unlink()
    enc = models.kimi_encoding(model)  # no config: every special is reserved
    assert "<|reserved_token_100256|>" in enc._special_tokens


# What a process with no network and an empty tiktoken cache sees. Downloads fail at once: the
# proxy is a closed local port (connection refused), so no test waits on a network timeout.
_OFFLINE_ENV = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}


def _run_offline(code: str, tmp_path: Path) -> str:
    cache = tmp_path / "empty-tiktoken-cache"
    cache.mkdir(exist_ok=True)
    env = {**os.environ, **_OFFLINE_ENV, "TIKTOKEN_CACHE_DIR": str(cache)}
    env.pop("NO_PROXY", None), env.pop("no_proxy", None)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert list(cache.iterdir()) == []  # FlashToken wrote nothing into tiktoken's cache
    return done.stdout


def test_plain_tiktoken_works_offline_after_flashtoken_loaded(tmp_path: Path) -> None:
    out = _run_offline(
        "import tiktoken, flashtoken\n"
        "from tiktoken_ext import openai_public\n"
        "try:\n"
        "    tiktoken.get_encoding('cl100k_base')\n"
        "except Exception as exc:\n"
        "    print('before: fails', type(exc).__name__)\n"
        "enc = flashtoken.get_encoding('cl100k_base')\n"
        "assert tiktoken.get_encoding('cl100k_base') is enc\n"
        "assert tiktoken.get_encoding('cl100k_base').encode('hello world') == [15339, 1917]\n"
        # OpenAI's constructor is untouched: where it can download, it is what tiktoken runs.
        "assert openai_public.ENCODING_CONSTRUCTORS['cl100k_base'] is openai_public.cl100k_base\n"
        "print('after: ok')\n",
        tmp_path,
    )
    assert "before: fails" in out and "after: ok" in out


def test_tiktoken_finds_the_model_encodings_by_itself(tmp_path: Path) -> None:
    # No flashtoken import: tiktoken's plugin scan finds tiktoken_ext/flashtoken_models.py.
    out = _run_offline(
        "import tiktoken\n"
        "names = tiktoken.list_encoding_names()\n"
        "assert {'cl100k_base', 'llama3', 'llama4', 'tekken'} <= set(names), names\n"
        "print(tiktoken.get_encoding('llama3').encode('hello world'))\n"
        "print(tiktoken.get_encoding('tekken').encode_ordinary('hello world'))\n",
        tmp_path,
    )
    assert out.split("\n")[:2] == ["[15339, 1917]", "[29706, 4304]"]
