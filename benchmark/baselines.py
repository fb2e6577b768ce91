"""The peers: other exact tokenizers, each on the whole text. Caching against switching tokenizer.

Each peer encodes the *whole* text (prefix + suffix) every time, like tiktoken; none caches.
They are used only if installed (``pip install 'flashtoken[bench]'``: toktok-rs, gigatoken,
bpe-openai) and are checked token by token against tiktoken like every other strategy: a peer that
disagrees is reported as such, and is not an "exact peer" in the headline (report.py).

Each peer is called the way its documentation offers a tiktoken-style list of ids:

- toktok-rs: its tokenizer object's ``encode_ordinary`` (its public API only counts; the full
  object is documented as "for anyone who knowingly wants the full encode/decode surface"),
  ``count`` and ``encode_to_numpy``;
- gigatoken: ``Tokenizer.from_tiktoken(...).as_tiktoken().encode_ordinary`` (its drop-in for
  ``tiktoken.Encoding``), built from the encoding's own ranks (flashtoken.backends), and its
  native ``Tokenizer.encode`` (a numpy array) for the count and array forms;
- bpe-openai: ``get_encoding(name).encode_ordinary``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import flashtoken

Encoder = Callable[[str], list[int]]


@dataclass(frozen=True)
class Peer:
    """One installed tokenizer: its list path, and its count and array paths where it has them."""

    label: str
    encode_ordinary: Encoder
    count: Callable[[str], int] | None = None
    to_array: Callable[[str], object] | None = None


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _toktok(name: str) -> Peer | None:
    try:
        import toktok
    except ImportError:
        return None
    try:
        tokenizer = toktok._encoding(name)
    except (KeyError, AttributeError):
        return None
    return Peer(
        f"toktok-rs {_version('toktok-rs')} (whole text)",
        tokenizer.encode_ordinary,
        tokenizer.count,
        tokenizer.encode_to_numpy,
    )


def _gigatoken(name: str) -> Peer | None:
    try:
        from flashtoken.backend_adapters import gigatoken_tokenizer

        tokenizer = gigatoken_tokenizer(flashtoken.get_encoding(name))
    except Exception:  # noqa: BLE001 - not installed, or no such encoding in gigatoken
        return None
    raw = tokenizer.encode
    return Peer(
        f"gigatoken {_version('gigatoken')} (whole text)",
        tokenizer.as_tiktoken().encode_ordinary,
        lambda text: len(raw(text)),
        raw,
    )


def _bpe_openai(name: str) -> Peer | None:
    try:
        import bpe_openai

        enc = bpe_openai.get_encoding(name)
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return None
    return Peer(f"bpe-openai {_version('bpe-openai')} (whole text)", enc.encode_ordinary)


_peers: dict[str, dict[str, Peer]] = {}


def peers(encoding: str) -> dict[str, Peer]:
    """Label -> :class:`Peer` for each installed tokenizer that has ``encoding`` (built once)."""
    found = _peers.get(encoding)
    if found is None:
        found = _peers[encoding] = {}
        for probe in (_toktok, _gigatoken, _bpe_openai):
            peer = probe(encoding)
            if peer is not None:
                found[peer.label] = peer
    return found


def peer_named(encoding: str, label: str) -> Peer | None:
    """Only the peer called ``label`` (a worker process builds just the one it measures)."""
    for probe in (_toktok, _gigatoken, _bpe_openai):
        peer = probe(encoding)
        if peer is not None and peer.label == label:
            return peer
    return None


def available(encoding: str) -> dict[str, Encoder]:
    """Label -> ``encode_ordinary(text)`` of each peer."""
    return {label: peer.encode_ordinary for label, peer in peers(encoding).items()}


def count_label(label: str) -> str:
    return label.replace(" (whole text)", " count (whole text)")


def array_label(label: str) -> str:
    return label.replace(" (whole text)", " numpy array (whole text)")
