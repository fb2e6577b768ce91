"""flashtoken/tiktoken_parts.py: tiktoken's private attributes read in one place, and only there;
flashtoken/text.py: the one check of a text argument."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

from flashtoken import get_encoding, tiktoken_parts
from flashtoken.text import require_str

ROOT = Path(__file__).resolve().parent.parent
PRIVATE = re.compile(r"\._(pat_str|special_tokens|mergeable_ranks|core_bpe)\b")


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_the_parts_are_the_encodings_own(name: str) -> None:
    enc = get_encoding(name)
    assert tiktoken_parts.pattern(enc) is enc._pat_str
    assert tiktoken_parts.special_tokens(enc) is enc._special_tokens
    assert tiktoken_parts.mergeable_ranks(enc) is enc._mergeable_ranks
    assert enc.encode("<|endoftext|>", allowed_special="all") == [
        tiktoken_parts.special_tokens(enc)["<|endoftext|>"]
    ]


def test_a_missing_part_says_what_to_do() -> None:
    class NotAnEncoding:
        name = "fake"

    with pytest.raises(TypeError, match="has no _pat_str.*tiktoken.Encoding"):
        tiktoken_parts.pattern(NotAnEncoding())  # type: ignore[arg-type]


def test_no_other_module_reads_tiktokens_privates() -> None:
    sites = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("flashtoken", "daemon", "client")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name != "tiktoken_parts.py"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert sites == []


def test_require_str_names_the_argument() -> None:
    require_str("x", "text")
    with pytest.raises(TypeError, match="suffix must be a str, not int"):
        require_str(3, "suffix")


@pytest.mark.parametrize(
    "module",
    [
        "flashtoken.tiktoken_parts",
        "flashtoken.text",
        "flashtoken.wire",
        "flashtoken.wire.addresses",
        "flashtoken.wire.keys",
    ],
)
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
