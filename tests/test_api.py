"""The public API is what flashtoken/__init__.py says it is, and the docs' examples run."""

import doctest
import importlib
import pathlib

import pytest

import flashtoken

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_all_is_the_public_api():
    assert sorted(flashtoken.__all__) == sorted(
        [
            "AppendOnlyPieceTokenCache",
            "AutoPrefixCache",
            "DaemonError",
            "DaemonTimeout",
            "DaemonUnavailable",
            "EncodingUnavailable",
            "FixedPrefixTokenCache",
            "FlashTokenError",
            "PrefixSplit",
            "ProtocolError",
            "TokenDelta",
            "get_encoding",
            "split_prefix",
            "__version__",
        ]
    )
    for name in flashtoken.__all__:
        assert hasattr(flashtoken, name), name


def test_errors_inherit_the_matching_builtins():
    assert issubclass(flashtoken.DaemonTimeout, TimeoutError)
    assert issubclass(flashtoken.DaemonTimeout, flashtoken.DaemonUnavailable)
    assert issubclass(flashtoken.DaemonUnavailable, ConnectionError)
    assert issubclass(flashtoken.ProtocolError, ValueError)
    assert issubclass(flashtoken.EncodingUnavailable, LookupError)
    for error in (flashtoken.DaemonError, flashtoken.ProtocolError, flashtoken.EncodingUnavailable):
        assert issubclass(error, flashtoken.FlashTokenError)


@pytest.mark.parametrize(
    "module",
    ["flashtoken.prefix", "flashtoken.conversation", "flashtoken.encodings", "flashtoken.auto"],
)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("doc", ["README.md", "docs/INTEGRATION.md"])
def test_markdown_examples(doc):
    path = ROOT / doc
    if not path.exists():
        pytest.skip(f"{doc} not written yet")
    result = doctest.testfile(str(path), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
