"""Other exact tokenizers: caching against switching tokenizers. Optional, labelled honestly.

Each baseline encodes the *whole* text (prefix + suffix) every time, like tiktoken; none caches.
They are imported only if installed (``pip install 'flashtoken[bench]'``) and are checked token
by token against tiktoken like every other strategy: a baseline that disagrees is reported as such.
"""

from __future__ import annotations

from collections.abc import Callable

Encoder = Callable[[str], list[int]]


def _toktok(name: str) -> tuple[str, Encoder] | None:
    try:
        import toktok
    except ImportError:
        return None
    # toktok's public API only counts; its full tokenizer object is documented as "private ...
    # for anyone who knowingly wants the full encode/decode surface". Used for ids here.
    try:
        tokenizer = toktok._encoding(name)
    except (KeyError, AttributeError):
        return None
    version = getattr(toktok, "__version__", "?")
    return f"toktok-rs {version} (whole text)", tokenizer.encode_ordinary


def _bpe_openai(name: str) -> tuple[str, Encoder] | None:
    try:
        import bpe_openai
    except ImportError:
        return None
    try:
        enc = bpe_openai.get_encoding(name)
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return None
    from importlib.metadata import version

    return f"bpe-openai {version('bpe-openai')} (whole text)", enc.encode_ordinary


def available(encoding: str) -> dict[str, Encoder]:
    """Label -> ``encode_ordinary(text)`` for each installed alternative tokenizer."""
    found = {}
    for probe in (_toktok, _bpe_openai):
        got = probe(encoding)
        if got is not None:
            found[got[0]] = got[1]
    return found
