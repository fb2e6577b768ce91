"""The open models that tokenize with tiktoken: Llama 3, Llama 4, Mistral's Tekken, Kimi K2.

Each model's own tokenizer builds a ``tiktoken.Encoding`` from a BPE file, a split pattern and a
list of special tokens. This module builds the same ``Encoding`` from the same file, as the model's
own package ships it, read without importing that package (a wheel's data file is found with
``importlib.util.find_spec``) and checked against the sha256 of the release it was taken from:

========  ==============================  =========================================  ===========
name      file                            package                                    extra
========  ==============================  =========================================  ===========
llama3    ``llama3/tokenizer.model``      ``llama-models`` (Llama 3, 3.1, 3.2, 3.3)   ``[llama]``
llama4    ``llama4/tokenizer.model``      ``llama-models``                           ``[llama]``
tekken    ``data/tekken_240911.json``     ``mistral-common`` (NeMo, Pixtral, ...)     ``[mistral]``
========  ==============================  =========================================  ===========

Kimi K2's ``tiktoken.model`` is published with its weights, not in a package: pass its path to
:func:`kimi_encoding`.

``ENCODING_CONSTRUCTORS`` has tiktoken's plugin shape (a name and a function returning the
``Encoding``'s keyword arguments): ``tiktoken_ext/flashtoken_models.py`` hands it to tiktoken, so
``tiktoken.get_encoding("llama3")`` works too wherever flashtoken is installed.

Where a reference tokenizer does more than ``Encoding.encode``, this module says so: Llama's cuts
its input into segments first (:func:`llama_reference_encode`); Tekken's ``encode`` is this
encoding's ``encode_ordinary`` (its control tokens are never read from text).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Collection, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tiktoken

from flashtoken.errors import EncodingUnavailable

__all__ = [
    "ENCODING_CONSTRUCTORS",
    "KIMI_PATTERN",
    "LLAMA3_PATTERN",
    "LLAMA4_PATTERN",
    "TEKKEN_PATTERN",
    "kimi_encoding",
    "llama_reference_encode",
    "llama_reference_segments",
]

# The split patterns, as the reference tokenizers write them (boundary.PROVEN_PIECES is keyed by
# this exact text).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 4's is o200k_base's, character for character (a test holds them equal).
LLAMA4_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NOT_HAN_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_NOT_HAN_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
KIMI_PATTERN = "|".join(
    [
        r"[\p{Han}]+",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_NOT_HAN_UPPER}*{_NOT_HAN_LOWER}+{_CONTRACTION}",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_NOT_HAN_UPPER}+{_NOT_HAN_LOWER}*{_CONTRACTION}",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)


@dataclass(frozen=True)
class _Shipped:
    """A data file inside an installed package, and the sha256 of the release it is from."""

    package: str  # the import name, located with find_spec, never imported
    path: str
    sha256: str
    requirement: str  # what to pip install

    def read(self, encoding: str) -> bytes:
        spec = None
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            pass
        if spec is None or not spec.submodule_search_locations:
            raise EncodingUnavailable(
                f"Encoding {encoding!r} is built from {self.path} of the package"
                f" {self.requirement}, which is not installed: pip install"
                f" 'flashtoken[{_EXTRAS[self.requirement]}]' (or {self.requirement})."
            )
        file = Path(next(iter(spec.submodule_search_locations))) / self.path
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise EncodingUnavailable(
                f"Encoding {encoding!r}: cannot read {file} ({exc}); reinstall {self.requirement}."
            ) from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != self.sha256:
            raise EncodingUnavailable(
                f"Encoding {encoding!r}: {file} has sha256 {actual}, not the {self.sha256} of the"
                f" file this encoding is defined by. Install a release of {self.requirement} that"
                " ships it (see flashtoken.models), or build the Encoding from your file yourself."
            )
        return data


_EXTRAS = {"llama-models": "llama", "mistral-common": "mistral"}

_LLAMA3_FILE = _Shipped(
    "llama_models",
    "llama3/tokenizer.model",
    "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
    "llama-models",
)
_LLAMA4_FILE = _Shipped(
    "llama_models",
    "llama4/tokenizer.model",
    "d0bdbaf59b0762c8c807617e2d8ea51420eb1b1de266df2495be755c8e0ed6ed",
    "llama-models",
)
# tekken_240718.json holds the same vocabulary and pattern; 240911 adds Pixtral's image settings.
_TEKKEN_FILE = _Shipped(
    "mistral_common",
    "data/tekken_240911.json",
    "1948e2d48b0e7377f1bb5f1210f1ae5f984934e75713fc07e2452729b8365316",
    "mistral-common",
)


def parse_tiktoken_bpe(data: bytes, source: str) -> dict[bytes, int]:
    """The ranks of a tiktoken BPE file: one ``base64-token rank`` pair a line.

    Raises ``ValueError`` naming ``source`` if a line does not parse.
    """
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:  # binascii.Error is a ValueError too
            raise ValueError(f"cannot parse line {line[:80]!r} of {source}") from exc
    return ranks


def _numbered(template: str, numbers: range) -> list[str]:
    return [template.format(i) for i in numbers]


def _llama3() -> dict[str, Any]:
    """Llama 3's encoding, as ``llama_models.llama3.tokenizer.Tokenizer`` builds it."""
    ranks = parse_tiktoken_bpe(_LLAMA3_FILE.read("llama3"), _LLAMA3_FILE.path)
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ]
    specials = named + _numbered("<|reserved_special_token_{}|>", range(2, 2 + 256 - len(named)))
    return _params("llama3", LLAMA3_PATTERN, ranks, specials)


def _llama4() -> dict[str, Any]:
    """Llama 4's encoding, as ``llama_models.llama4.tokenizer.Tokenizer`` builds it."""
    ranks = parse_tiktoken_bpe(_LLAMA4_FILE.read("llama4"), _LLAMA4_FILE.path)
    post_train = [
        "<|header_start|>",
        "<|header_end|>",
        "<|eom|>",
        "<|eot|>",
        "<|step|>",
        *_numbered("<|text_post_train_reserved_special_token_{}|>", range(6)),
        "<|python_start|>",
        "<|python_end|>",
        "<|finetune_right_pad|>",
        *_numbered("<|text_post_train_reserved_special_token_{}|>", range(8, 69)),
    ]
    vision = [
        "<|image_start|>",
        "<|image_end|>",
        "<|vision_reserved_special_token_0|>",
        "<|vision_reserved_special_token_1|>",
        "<|tile_x_separator|>",
        "<|tile_y_separator|>",
        *_numbered("<|vision_reserved_special_token_{}|>", range(2, 6)),
        "<|image|>",
        "<|vision_reserved_special_token_6|>",
        "<|patch|>",
        *_numbered("<|vision_reserved_special_token_{}|>", range(7, 1048)),
    ]
    reasoning = [
        *_numbered("<|reasoning_reserved_special_token_{}|>", range(8)),
        "<|reasoning_thinking_start|>",
        "<|reasoning_thinking_end|>",
    ]
    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>"]
    named = [*basic, "<|fim_suffix|>", *post_train, *vision, *reasoning]
    specials = named + _numbered("<|reserved_special_token_{}|>", range(2048 - len(named)))
    return _params("llama4", LLAMA4_PATTERN, ranks, specials)


# Tekken files of version v7 and older name no special tokens: mistral-common gives them these,
# at ranks 0-19, then fills the rest of the special range with "<SPECIAL_{rank}>".
_TEKKEN_V7_SPECIALS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
]  # fmt: skip


def _tekken() -> dict[str, Any]:
    """Mistral's Tekken encoding, with the token ids ``mistral_common``'s ``Tekkenizer`` gives.

    Tekkenizer holds an ``Encoding`` with ranks from 0 and no special tokens, and adds
    ``num_special_tokens`` (1000) to every id it returns. This ``Encoding`` holds the ranks
    already shifted (BPE only compares ranks, so a shift changes no merge) and the special tokens
    at ranks 0-999: its ``encode_ordinary(text)`` is ``Tekkenizer.encode(text, bos=False,
    eos=False)``, and ``decode`` reads Tekkenizer's ids.
    """
    data = json.loads(_TEKKEN_FILE.read("tekken"))
    config = data["config"]
    n_special = config["default_num_special_tokens"]
    inner = config["default_vocab_size"] - n_special  # Tekkenizer cuts the vocabulary there
    ranks = {
        base64.b64decode(entry["token_bytes"]): entry["rank"] + n_special
        for entry in data["vocab"][:inner]
    }
    # Newer files list their special tokens with ranks; Tekkenizer fills the ranks after them.
    listed = data.get("special_tokens") or [
        {"rank": rank, "token_str": token} for rank, token in enumerate(_TEKKEN_V7_SPECIALS)
    ]
    specials = {entry["token_str"]: entry["rank"] for entry in listed}
    specials.update({f"<SPECIAL_{i}>": i for i in range(len(listed), n_special)})
    return {
        "name": "tekken",
        "pat_str": config["pattern"],
        "mergeable_ranks": ranks,
        "special_tokens": specials,
    }


def _params(name: str, pattern: str, ranks: dict[bytes, int], specials: list[str]) -> dict:
    """Special tokens numbered from the end of the ranks, as Llama's and Kimi's tokenizers do."""
    base = len(ranks)
    return {
        "name": name,
        "pat_str": pattern,
        "mergeable_ranks": ranks,
        "special_tokens": {token: base + i for i, token in enumerate(specials)},
    }


ENCODING_CONSTRUCTORS: dict[str, Callable[[], dict[str, Any]]] = {
    "llama3": _llama3,
    "llama4": _llama4,
    "tekken": _tekken,
}


def kimi_encoding(
    model_file: str | os.PathLike[str],
    *,
    tokenizer_config: str | os.PathLike[str] | None = None,
    sha256: str | None = None,
) -> tiktoken.Encoding:
    """Kimi K2's encoding, built from its ``tiktoken.model`` as its ``tokenization_kimi.py`` does.

    The 258 special tokens follow the ranks; their names come from ``added_tokens_decoder`` in
    ``tokenizer_config`` (default: ``tokenizer_config.json`` beside ``model_file``, when there
    is one), and ids it does not name are ``<|reserved_token_{id}|>``. ``sha256``, if given, is
    checked against the file.

    Raises ``EncodingUnavailable`` if the file cannot be read or has another sha256, and
    ``ValueError`` if it does not parse.
    """
    path = Path(model_file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EncodingUnavailable(
            f"Cannot read Kimi's tiktoken.model at {path} ({exc}). It comes with the model's"
            " weights (tiktoken.model beside tokenizer_config.json); pass its path."
        ) from exc
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise EncodingUnavailable(
            f"{path} has sha256 {hashlib.sha256(data).hexdigest()}, not {sha256}."
        )
    ranks = parse_tiktoken_bpe(data, str(path))
    names: dict[int, str] = {}
    config = Path(tokenizer_config) if tokenizer_config is not None else None
    if config is None and (path.parent / "tokenizer_config.json").is_file():
        config = path.parent / "tokenizer_config.json"
    if config is not None:
        decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        names = {int(i): token["content"] for i, token in decoder.items()}
    base = len(ranks)
    specials = {names.get(i, f"<|reserved_token_{i}|>"): i for i in range(base, base + 258)}
    return tiktoken.Encoding(
        name="kimi", pat_str=KIMI_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )


# What llama_models' Tokenizer.encode does before it calls tiktoken (both Llama 3 and 4).
_LLAMA_MAX_CHARS = 400_000
_LLAMA_MAX_RUN = 25_000


def llama_reference_segments(text: str) -> Iterator[str]:
    """The segments Llama's reference ``Tokenizer.encode`` hands to tiktoken one by one.

    The text is cut every 400,000 characters, and each piece again wherever a run of whitespace
    or of non-whitespace (``str.isspace``) would exceed 25,000 characters. A text shorter than
    that with no such run is one segment: then the reference's ids are tiktoken's.
    """
    for i in range(0, len(text), _LLAMA_MAX_CHARS):
        chunk = text[i : i + _LLAMA_MAX_CHARS]
        run = 0
        space = chunk[0].isspace() if chunk else False
        start = 0
        for j, char in enumerate(chunk):
            if char.isspace() != space:
                space = not space
                run = 1
            else:
                run += 1
                if run > _LLAMA_MAX_RUN:
                    yield chunk[start:j]
                    start = j
                    run = 1
        yield chunk[start:]


def llama_reference_encode(
    enc: tiktoken.Encoding,
    text: str,
    *,
    allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
    disallowed_special: Literal["all"] | Collection[str] = (),
) -> list[int]:
    """``llama_models``' ``Tokenizer.encode(text, bos=False, eos=False, ...)``, exactly.

    Llama's reference tokenizer encodes each of :func:`llama_reference_segments` on its own (to
    stay below a tiktoken crash on very long runs), so its ids differ from ``enc.encode(text)``
    at segment ends; the defaults are the reference's too (no special token raises). FlashToken's
    caches return ``enc.encode`` / ``enc.encode_ordinary`` of the whole text, which is this for
    every text of at most 400,000 characters with no such run of more than 25,000.

    >>> from flashtoken import get_encoding
    >>> llama_reference_encode(get_encoding("llama3"), "hello world")  # doctest: +SKIP
    [15339, 1917]
    """
    tokens: list[int] = []
    for segment in llama_reference_segments(text):
        tokens += enc.encode(
            segment, allowed_special=allowed_special, disallowed_special=disallowed_special
        )
    return tokens
