"""flashtoken.encodings: offline loading, tiktoken's hashes, clear errors, encoding ids.

Every test here runs without a network. Those that must not reach one replace tiktoken's
downloader (``tiktoken.load.read_file``) with one that fails, and point ``TIKTOKEN_CACHE_DIR`` at
an empty directory, so they behave the same on a machine that has internet.
"""

from __future__ import annotations

import doctest
import gzip
import hashlib
import importlib.util
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
from tiktoken_ext import openai_public

import flashtoken.encodings as encodings
from flashtoken.encodings import encoding_id, get_encoding, resolve_encoding
from flashtoken.errors import EncodingUnavailable, FlashTokenError

OFFLINE_ENCODINGS = ["cl100k_base", "o200k_base", "o200k_harmony"]
# Encodings whose BPE files no installed package ships.
DOWNLOAD_ONLY_ENCODINGS = ["gpt2", "r50k_base", "p50k_base"]

# "hello world" is tiktoken's own example (its README and tests); the longer string's ids were
# taken from tiktoken 0.14 and test_offline_encoding_equals_tiktokens_own re-checks them all.
_MIXED = "Hello, wörld! 123456  \n\n x"
_O200K_IDS = {
    "hello world": [24912, 2375],
    _MIXED: [13225, 11, 286, 2877, 582, 0, 220, 7633, 19354, 11691, 1215],
}
KNOWN_IDS = {
    "cl100k_base": {
        "hello world": [15339, 1917],
        _MIXED: [9906, 11, 289, 9603, 509, 0, 220, 4513, 10961, 19124, 865],
    },
    "o200k_base": _O200K_IDS,
    "o200k_harmony": _O200K_IDS,
}

SAMPLES = [
    "",
    "hello world",
    _MIXED,
    "def f(x):\n    return x ** 2  # squares\n",
    "中文字符和日本語のテキスト、한국어 텍스트",
    "emoji 👍🏽 and combining e\u0301 marks",
    "it's they'll we've I'M   \t trailing   ",
    "<|endoftext|> a special token, <|endofprompt|> and <|start|>",
]


def _packaged_bytes(filename: str) -> bytes:
    """The official file as bpe-openai ships it, read here without flashtoken's code."""
    spec = importlib.util.find_spec("bpe_openai")
    assert spec is not None, "bpe-openai must be installed for the tests (flashtoken[dev])"
    assert spec.submodule_search_locations
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    return gzip.decompress((data_dir / (filename + ".gz")).read_bytes())


class _NetworkDisabled(ConnectionError):
    pass


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Forget every loaded encoding, ours and tiktoken's; empty TIKTOKEN_CACHE_DIR."""
    monkeypatch.setattr(encodings, "_encodings", {})
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    cache_dir = tmp_path / "tiktoken-cache"
    cache_dir.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache_dir))


@pytest.fixture
def no_network(fresh: None, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every download by tiktoken fail; return the list of URLs it tried."""
    attempts: list[str] = []

    def read_file(blobpath: str) -> bytes:
        attempts.append(blobpath)
        raise _NetworkDisabled(f"network disabled by the test: {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", read_file)
    return attempts


@pytest.fixture
def fake_download(fresh: None, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Serve tiktoken's downloads of the packaged files from bpe-openai, as if from the network."""
    attempts: list[str] = []

    def read_file(blobpath: str) -> bytes:
        attempts.append(blobpath)
        filename = blobpath.rsplit("/", 1)[-1]
        if filename not in ("cl100k_base.tiktoken", "o200k_base.tiktoken"):
            raise _NetworkDisabled(f"network disabled by the test: {blobpath}")
        return _packaged_bytes(filename)

    monkeypatch.setattr(tiktoken.load, "read_file", read_file)
    return attempts


def _tiktoken_oracle(name: str) -> tiktoken.Encoding:
    """tiktoken's own Encoding, loaded by tiktoken's own code path (download, hash, parse).

    Its constructor is called directly: ``tiktoken.get_encoding`` would return the object that
    FlashToken registered with tiktoken.
    """
    return tiktoken.Encoding(**openai_public.ENCODING_CONSTRUCTORS[name]())


@pytest.mark.parametrize("name", OFFLINE_ENCODINGS)
def test_loads_offline_with_known_ids(name: str, no_network: list[str]) -> None:
    enc = get_encoding(name)
    assert type(enc) is tiktoken.Encoding
    assert enc.name == name
    for text, ids in KNOWN_IDS[name].items():
        assert enc.encode_ordinary(text) == ids
        assert enc.encode(text) == ids
    assert no_network == []  # nothing was even attempted


@pytest.mark.parametrize("name", OFFLINE_ENCODINGS)
def test_offline_encoding_equals_tiktokens_own(name: str, fake_download: list[str]) -> None:
    ours = get_encoding(name)
    assert fake_download == []
    theirs = _tiktoken_oracle(name)
    assert fake_download, "the oracle should have gone through tiktoken's downloader"
    assert theirs is not ours
    assert ours._pat_str == theirs._pat_str
    assert ours._special_tokens == theirs._special_tokens
    assert ours._mergeable_ranks == theirs._mergeable_ranks
    assert ours.n_vocab == theirs.n_vocab
    assert encoding_id(ours) == encoding_id(theirs)
    for text in SAMPLES:
        assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)
        assert ours.encode(text, allowed_special="all") == theirs.encode(
            text, allowed_special="all"
        )


def test_reuses_an_encoding_tiktoken_already_built(fake_download: list[str]) -> None:
    theirs = tiktoken.get_encoding("cl100k_base")
    assert fake_download  # built by tiktoken, through its downloader
    assert get_encoding("cl100k_base") is theirs


def test_tiktoken_cache_dir_advice_works(
    fake_download: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the EncodingUnavailable message advises: tiktoken's cache, copied, is enough offline.
    _tiktoken_oracle("cl100k_base")  # fills TIKTOKEN_CACHE_DIR
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(encodings, "_PACKAGED_BPE_SOURCES", ())  # as without bpe-openai

    def read_file(blobpath: str) -> bytes:
        raise _NetworkDisabled(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", read_file)
    assert get_encoding("cl100k_base").encode("hello world") == [15339, 1917]


def test_memoised_and_thread_safe(no_network: list[str]) -> None:
    results: list[tiktoken.Encoding] = []
    barrier = threading.Barrier(4)

    def load() -> None:
        barrier.wait()
        results.append(get_encoding("cl100k_base"))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    assert all(enc is results[0] for enc in results)
    assert get_encoding("cl100k_base") is results[0]


def test_tiktoken_loaders_restored(no_network: list[str]) -> None:
    get_encoding("o200k_harmony")
    with pytest.raises(EncodingUnavailable):
        get_encoding("gpt2")
    assert openai_public.load_tiktoken_bpe is tiktoken.load.load_tiktoken_bpe
    assert (
        openai_public.data_gym_to_mergeable_bpe_ranks
        is tiktoken.load.data_gym_to_mergeable_bpe_ranks
    )


def _fake_package(root: Path, files: dict[str, bytes]) -> str:
    package = "flashtoken_test_bpe_files"
    data = root / package / "data"
    data.mkdir(parents=True)
    (root / package / "__init__.py").write_text("raise AssertionError('must not be imported')\n")
    for filename, content in files.items():
        (data / filename).write_bytes(content)
    return package


def _tamper(data: bytes) -> bytes:
    """Swap the ranks of two lines: still a well-formed BPE file, but not tiktoken's."""
    lines = data.splitlines()
    (tok_a, rank_a), (tok_b, rank_b) = lines[300].split(), lines[301].split()
    lines[300], lines[301] = tok_a + b" " + rank_b, tok_b + b" " + rank_a
    return b"\n".join(lines) + b"\n"


def test_packaged_file_with_wrong_hash_is_rejected(
    no_network: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tampered = _tamper(_packaged_bytes("cl100k_base.tiktoken"))
    package = _fake_package(tmp_path, {"cl100k_base.tiktoken.gz": gzip.compress(tampered)})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(encodings, "_PACKAGED_BPE_SOURCES", ((package, "data"),))

    with pytest.raises(EncodingUnavailable) as info:
        get_encoding("cl100k_base")
    message = str(info.value)
    assert "sha256" in message and package in message
    assert "TIKTOKEN_CACHE_DIR" in message
    assert isinstance(info.value.__cause__, _NetworkDisabled)  # it tried tiktoken's way next
    assert package not in sys.modules
    assert openai_public.load_tiktoken_bpe is tiktoken.load.load_tiktoken_bpe


def test_packaged_file_with_wrong_hash_falls_back_to_tiktoken(
    fake_download: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tampered = _tamper(_packaged_bytes("cl100k_base.tiktoken"))
    package = _fake_package(tmp_path, {"cl100k_base.tiktoken": tampered})
    monkeypatch.syspath_prepend(str(tmp_path))
    # Our fake package first: fake_download still serves the real file from bpe-openai.
    monkeypatch.setattr(
        encodings, "_PACKAGED_BPE_SOURCES", ((package, "data"), *encodings._PACKAGED_BPE_SOURCES)
    )
    enc = get_encoding("cl100k_base")
    assert fake_download  # the tampered file was refused, tiktoken downloaded the real one
    assert enc.encode("hello world") == [15339, 1917]


def test_plain_packaged_file_is_used(
    no_network: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = _fake_package(
        tmp_path, {"cl100k_base.tiktoken": _packaged_bytes("cl100k_base.tiktoken")}
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(encodings, "_PACKAGED_BPE_SOURCES", ((package, "data"),))
    assert get_encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert package not in sys.modules


def test_read_packaged_bpe_checks_tiktokens_hash() -> None:
    data = _packaged_bytes("cl100k_base.tiktoken")
    good_hash = hashlib.sha256(data).hexdigest()
    ranks = encodings._read_packaged_bpe("https://example.invalid/cl100k_base.tiktoken", good_hash)
    assert len(ranks) == 100256
    with pytest.raises(ValueError, match="sha256"):
        encodings._read_packaged_bpe("https://example.invalid/cl100k_base.tiktoken", "0" * 64)


def test_unknown_name_lists_known_names(fresh: None) -> None:
    with pytest.raises(ValueError, match="Unknown encoding 'cl100k'") as info:
        get_encoding("cl100k")
    assert not isinstance(info.value, EncodingUnavailable)
    for name in ("cl100k_base", "o200k_base", "o200k_harmony", "r50k_base"):
        assert name in str(info.value)


def test_non_string_name_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        get_encoding(b"cl100k_base")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", DOWNLOAD_ONLY_ENCODINGS)
def test_unavailable_without_network(name: str, no_network: list[str]) -> None:
    with pytest.raises(EncodingUnavailable) as info:
        get_encoding(name)
    assert isinstance(info.value, LookupError) and isinstance(info.value, FlashTokenError)
    assert isinstance(info.value.__cause__, _NetworkDisabled)
    message = str(info.value)
    assert name in message
    assert "TIKTOKEN_CACHE_DIR" in message
    assert "pip install 'flashtoken[offline]'" in message
    assert no_network  # tiktoken itself tried, once we had nothing to offer
    assert name not in encodings._encodings


def test_unavailable_without_bpe_openai(
    no_network: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encodings, "_PACKAGED_BPE_SOURCES", ())
    with pytest.raises(EncodingUnavailable, match=r"flashtoken\[offline\]"):
        get_encoding("o200k_base")


@pytest.mark.timeout(60)
def test_unavailable_on_this_machine_for_real(fresh: None) -> None:
    # No fake downloader: on a machine without internet (CI here) the real download fails at
    # once, and must surface as EncodingUnavailable, not hang or leak a requests error.
    try:
        enc = get_encoding("r50k_base")
    except EncodingUnavailable as exc:
        assert "TIKTOKEN_CACHE_DIR" in str(exc)
    else:
        assert enc.encode("hello world") == [31373, 995]
        pytest.skip("this machine can download tiktoken's files")


def test_resolve_encoding(no_network: list[str]) -> None:
    enc = get_encoding("cl100k_base")
    assert resolve_encoding(enc) is enc
    assert resolve_encoding("cl100k_base") is enc
    custom = tiktoken.Encoding(
        "custom", pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks, special_tokens={}
    )
    assert resolve_encoding(custom) is custom
    with pytest.raises(TypeError, match="tiktoken.Encoding"):
        resolve_encoding(42)  # type: ignore[arg-type]


def test_encoding_id(no_network: list[str]) -> None:
    ids = {name: encoding_id(get_encoding(name)) for name in OFFLINE_ENCODINGS}
    for ident in ids.values():
        assert isinstance(ident, bytes) and 16 <= len(ident) <= 32
    assert len(set(ids.values())) == len(ids)
    enc = get_encoding("cl100k_base")
    assert encoding_id(enc) is encoding_id(enc)  # memoised

    def rebuilt(**changes: object) -> tiktoken.Encoding:
        params: dict[str, object] = {
            "name": enc.name,
            "pat_str": enc._pat_str,
            "mergeable_ranks": dict(enc._mergeable_ranks),
            "special_tokens": dict(enc._special_tokens),
        }
        params.update(changes)
        name = params.pop("name")
        return tiktoken.Encoding(name, **params)  # type: ignore[arg-type]

    assert encoding_id(rebuilt()) == ids["cl100k_base"]  # by content, not by object
    assert encoding_id(rebuilt(name="cl100k_copy")) != ids["cl100k_base"]
    assert encoding_id(rebuilt(pat_str=enc._pat_str + "|x")) != ids["cl100k_base"]
    specials = {**enc._special_tokens, "<|extra|>": 100300}
    assert encoding_id(rebuilt(special_tokens=specials)) != ids["cl100k_base"]
    swapped = dict(enc._mergeable_ranks)
    swapped[b"hello"], swapped[b" world"] = swapped[b" world"], swapped[b"hello"]
    assert encoding_id(rebuilt(mergeable_ranks=swapped)) != ids["cl100k_base"]


def test_encoding_id_is_the_same_in_another_process(no_network: list[str]) -> None:
    # The daemon and its clients are different processes: their keys must agree.
    code = (
        "from flashtoken.encodings import encoding_id, get_encoding;"
        "print(encoding_id(get_encoding('cl100k_base')).hex())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == encoding_id(get_encoding("cl100k_base")).hex()


def test_docstring_examples(no_network: list[str]) -> None:
    result = doctest.testmod(encodings, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
