"""tiktoken encodings, loaded without a network where an installed package ships the BPE file.

tiktoken downloads its BPE files on first use, and many deployments have no internet.
``get_encoding`` returns tiktoken's own ``Encoding``, built by tiktoken's own constructor; only the
bytes of the BPE file come from an installed package when one ships it (``bpe-openai`` carries
cl100k_base and o200k_base, and o200k_harmony reuses o200k_base's file), checked against the
sha256 that tiktoken itself expects. The open models' encodings (``llama3``, ``llama4``,
``tekken``) are built by ``flashtoken.models`` from their packages' files. Other encodings go
through ``tiktoken.get_encoding`` (its cache, then its download). Every encoding loaded here is
registered with tiktoken's registry, so ``tiktoken.get_encoding`` then finds it, offline too.

``encoding_id`` names an encoding by its content, for cache keys.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import threading
import weakref
from array import array
from collections.abc import Callable
from operator import itemgetter
from pathlib import Path
from typing import Any

import tiktoken

from flashtoken import models, tiktoken_parts
from flashtoken.errors import EncodingUnavailable
from flashtoken.models import parse_tiktoken_bpe

__all__ = ["encoding_id", "get_encoding", "resolve_encoding"]

# Installed packages that ship official tiktoken BPE files: (import name, data folder). A file is
# looked up by the basename of tiktoken's URL, plain or gzipped ("cl100k_base.tiktoken.gz").
_PACKAGED_BPE_SOURCES: tuple[tuple[str, str], ...] = (("bpe_openai", "data"),)

_encodings: dict[str, tiktoken.Encoding] = {}
_encodings_lock = threading.Lock()
# Serialises the substitution of the loaders in tiktoken_ext.openai_public (see _load_packaged).
_loader_lock = threading.Lock()

_ids: weakref.WeakKeyDictionary[tiktoken.Encoding, bytes] = weakref.WeakKeyDictionary()
_ids_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A lock a parent's thread held at the fork (a 40 ms encoding_id, a load) is never released
    # in the child; the dicts they guard are only written once a value is complete.
    global _encodings_lock, _loader_lock, _ids_lock
    _encodings_lock, _loader_lock, _ids_lock = threading.Lock(), threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _NotShipped(Exception):
    """No installed package ships a BPE file that the encoding's constructor asked for."""


def get_encoding(name: str) -> tiktoken.Encoding:
    """Return tiktoken's ``Encoding`` called ``name``, loaded offline when possible.

    The BPE file comes from an installed package that ships it (``pip install
    'flashtoken[offline]'`` for cl100k_base, o200k_base and o200k_harmony), verified against
    tiktoken's expected sha256; otherwise from ``tiktoken.get_encoding`` (its cache in
    ``TIKTOKEN_CACHE_DIR``, then a download). One object per name and process, thread-safe.

    >>> enc = get_encoding("cl100k_base")
    >>> enc.encode("hello world")
    [15339, 1917]
    >>> get_encoding("o200k_base").encode("hello world")
    [24912, 2375]
    >>> get_encoding("cl100k_base") is enc
    True

    Raises ``ValueError`` if tiktoken knows no encoding called ``name`` (the message lists those it
    knows), and ``EncodingUnavailable`` if its BPE file is neither shipped by an installed package
    nor cached, and cannot be downloaded.
    """
    if not isinstance(name, str):
        raise TypeError(f"encoding name must be a str, not {type(name).__name__}")
    enc = _encodings.get(name)
    if enc is not None:
        return enc
    # One lock for all names: a load takes well under a second when the file is shipped, and
    # when it is not, tiktoken's own get_encoding serialises on its registry lock anyway.
    with _encodings_lock:
        enc = _encodings.get(name)
        if enc is None:
            enc = _load(name)
            _encodings[name] = enc
    return enc


def resolve_encoding(enc_or_name: str | tiktoken.Encoding) -> tiktoken.Encoding:
    """Return ``enc_or_name`` if it is an ``Encoding``, else ``get_encoding(enc_or_name)``.

    Every FlashToken API that takes an encoding accepts either form.

    >>> enc = resolve_encoding("cl100k_base")
    >>> resolve_encoding(enc) is enc
    True

    Raises ``TypeError`` for anything else, and what ``get_encoding`` raises for a name.
    """
    if isinstance(enc_or_name, tiktoken.Encoding):
        return enc_or_name
    if isinstance(enc_or_name, str):
        return get_encoding(enc_or_name)
    raise TypeError(
        f"expected an encoding name or a tiktoken.Encoding, not {type(enc_or_name).__name__}"
    )


def encoding_id(enc: tiktoken.Encoding) -> bytes:
    """Return 32 bytes that identify ``enc`` by what decides its token ids, for cache keys.

    A BLAKE2b digest over the name, the split pattern, the special tokens, the mergeable ranks
    and tiktoken's version. Two ``Encoding`` objects built from the same data get the same id,
    in any process. Computed once per object (about 40 ms for o200k_base) and remembered while
    the object lives.

    >>> enc = get_encoding("cl100k_base")
    >>> len(encoding_id(enc)), encoding_id(enc) == encoding_id(get_encoding("o200k_base"))
    (32, False)
    """
    with _ids_lock:
        ident = _ids.get(enc)
        if ident is None:
            ident = _compute_encoding_id(enc)
            _ids[enc] = ident
    return ident


def _compute_encoding_id(enc: tiktoken.Encoding) -> bytes:
    h = hashlib.blake2b(digest_size=32, person=b"flashtoken-enc/1")

    def field(data: bytes) -> None:
        # Length-prefixed, so no two different field sequences hash the same bytes.
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    field(enc.name.encode("utf-8"))
    field(tiktoken_parts.pattern(enc).encode("utf-8"))
    specials = sorted(tiktoken_parts.special_tokens(enc).items())
    field(b"".join(s.encode("utf-8") + b"\0" for s, _ in specials))
    field(array("q", [rank for _, rank in specials]).tobytes())
    # The ranks in rank order (ties by token, for custom encodings): the ranks, the token
    # lengths, then the tokens concatenated. Hashing three flat buffers keeps this ~40 ms for
    # o200k's 200k entries, where a per-entry update() loop takes several times that.
    items = sorted(tiktoken_parts.mergeable_ranks(enc).items(), key=itemgetter(1, 0))
    tokens = [token for token, _ in items]
    field(array("q", [rank for _, rank in items]).tobytes())
    field(array("Q", [len(token) for token in tokens]).tobytes())
    field(b"".join(tokens))
    # Ids come from tiktoken's Rust core: another tiktoken release could split text differently
    # (its regex engine, its Unicode tables) with the same files, so it gets other cache keys.
    field(tiktoken.__version__.encode("utf-8"))
    return h.digest()


def _load(name: str) -> tiktoken.Encoding:
    # Reuse an Encoding that tiktoken has already built (the application may use tiktoken
    # directly): the same object, not a second copy of a vocabulary that can weigh 100 MB.
    loaded = getattr(tiktoken.registry, "ENCODINGS", {}).get(name)
    if loaded is not None:
        return loaded
    model = models.ENCODING_CONSTRUCTORS.get(name)
    if model is not None:
        # Built here even where tiktoken found our plugin: its registry would only call the same
        # constructor, and this way a missing plugin (a source checkout) changes nothing.
        return _register(name, tiktoken.Encoding(**model()))
    known = tiktoken.list_encoding_names()
    if name not in known:
        # tiktoken raises ValueError for an unknown name too; ours lists the names it knows.
        known = sorted({*known, *models.ENCODING_CONSTRUCTORS})
        raise ValueError(f"Unknown encoding {name!r}. Known encodings: {', '.join(known)}")

    offline_error: Exception | None = None
    try:
        return _register(name, _load_packaged(name))
    except _NotShipped:
        pass
    except Exception as exc:  # a corrupt or mismatching packaged file: try tiktoken's own way
        offline_error = exc

    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:
        raise EncodingUnavailable(_unavailable_message(name, exc, offline_error)) from exc


def _register(name: str, enc: tiktoken.Encoding) -> tiktoken.Encoding:
    """Hand ``enc`` to tiktoken's registry, so that ``tiktoken.get_encoding(name)`` finds it.

    Code that calls tiktoken directly then works offline too once FlashToken has loaded the
    encoding, and gets the same object. Nothing is replaced: tiktoken's constructors stay as
    they are (OpenAI's still download where they can), and an ``Encoding`` tiktoken built first
    is kept and returned. The registry's dict and lock have been in tiktoken since 0.1.
    """
    registry = tiktoken.registry
    lock = getattr(registry, "_lock", None)
    encodings = getattr(registry, "ENCODINGS", None)
    if lock is None or not isinstance(encodings, dict):
        return enc  # a tiktoken without them: nothing to register with
    with lock:
        return encodings.setdefault(name, enc)


def _unavailable_message(name: str, exc: Exception, offline_error: Exception | None) -> str:
    message = f"Could not load the BPE file of encoding {name!r}: {type(exc).__name__}: {exc}."
    if offline_error is not None:
        message += f" The packaged file was rejected too: {offline_error}."
    return (
        message + " To use cl100k_base, o200k_base or o200k_harmony without a network, install"
        " bpe-openai (pip install 'flashtoken[offline]'). For any encoding, copy tiktoken's cache"
        " (files named by the sha1 of the download URL) from a machine that has downloaded it"
        " into a directory, and set TIKTOKEN_CACHE_DIR to that directory."
    )


def _load_packaged(name: str) -> tiktoken.Encoding:
    """Build ``name`` with tiktoken's own constructor, its BPE file read from a package.

    Raises ``_NotShipped`` if the constructor needs a file that no installed package ships.

    tiktoken's constructors in ``tiktoken_ext.openai_public`` call the module-level
    ``load_tiktoken_bpe(url, expected_hash=...)``. For the duration of one constructor call we
    put a loader under that name which reads the file of the same basename from the package and
    checks it against the ``expected_hash`` the constructor passes. This keeps tiktoken's
    pattern, special tokens and hashes as tiktoken defines them (none is copied here), and never
    waits for the network. Rejected: copying the constructors (a copy drifts silently when
    tiktoken corrects or extends its own); writing the packaged file into tiktoken's download
    cache (a write into a directory the user may share or may not own, relying on tiktoken's
    private cache-key scheme).
    """
    import tiktoken_ext.openai_public as openai_public

    constructor = openai_public.ENCODING_CONSTRUCTORS.get(name)
    if constructor is None:
        raise _NotShipped(name)

    with _loader_lock:
        original_bpe = openai_public.load_tiktoken_bpe
        original_data_gym = openai_public.data_gym_to_mergeable_bpe_ranks
        owner = threading.get_ident()

        def load_tiktoken_bpe(tiktoken_bpe_file: str, expected_hash: str | None = None) -> Any:
            # Invisible to other threads: a concurrent tiktoken.get_encoding elsewhere in the
            # process gets tiktoken's own loader.
            if threading.get_ident() != owner:
                return original_bpe(tiktoken_bpe_file, expected_hash=expected_hash)
            return _read_packaged_bpe(tiktoken_bpe_file, expected_hash)

        def data_gym_to_mergeable_bpe_ranks(*args: Any, **kwargs: Any) -> Any:
            # gpt2's files ship nowhere: leave them to tiktoken, outside our lock.
            if threading.get_ident() != owner:
                return original_data_gym(*args, **kwargs)
            raise _NotShipped(name)

        # An unshipped file raises _NotShipped instead of calling the original loader here, so
        # no download ever runs while _loader_lock is held; tiktoken.get_encoding does it after.
        openai_public.load_tiktoken_bpe = load_tiktoken_bpe
        openai_public.data_gym_to_mergeable_bpe_ranks = data_gym_to_mergeable_bpe_ranks
        try:
            params = constructor()
        finally:
            openai_public.load_tiktoken_bpe = original_bpe
            openai_public.data_gym_to_mergeable_bpe_ranks = original_data_gym
    return tiktoken.Encoding(**params)


def _read_packaged_bpe(tiktoken_bpe_file: str, expected_hash: str | None) -> dict[bytes, int]:
    """Parse the packaged copy of ``tiktoken_bpe_file`` after checking its sha256.

    Raises ``_NotShipped`` if no package ships it (or tiktoken gives no hash to check it against),
    and ``ValueError`` if its sha256 is not ``expected_hash`` or a line does not parse.
    """
    if expected_hash is None:
        raise _NotShipped(tiktoken_bpe_file)
    found = _read_packaged_file(tiktoken_bpe_file.rsplit("/", 1)[-1])
    if found is None:
        raise _NotShipped(tiktoken_bpe_file)
    data, source = found
    actual_hash = hashlib.sha256(data).hexdigest()
    if actual_hash != expected_hash:
        raise ValueError(
            f"{source} has sha256 {actual_hash}, but tiktoken expects {expected_hash} for"
            f" {tiktoken_bpe_file}"
        )
    return parse_tiktoken_bpe(data, source)


def _read_packaged_file(filename: str) -> tuple[bytes, str] | None:
    """Return the bytes and path of ``filename`` (plain or ``.gz``) from a shipping package."""
    for package, folder in _PACKAGED_BPE_SOURCES:
        root = _package_dir(package)
        if root is None:
            continue
        candidates: tuple[tuple[Path, Callable[[Path], bytes]], ...] = (
            (root / folder / (filename + ".gz"), _read_gzip),
            (root / folder / filename, Path.read_bytes),
        )
        for path, read in candidates:
            if path.is_file():
                return read(path), str(path)
    return None


def _read_gzip(path: Path) -> bytes:
    with gzip.open(path, "rb") as f:
        return f.read()


def _package_dir(package: str) -> Path | None:
    # find_spec locates a top-level package without running it. Rejected:
    # importlib.resources.files("bpe_openai.data"), which imports bpe_openai, whose __init__
    # builds its own Rust tokenizers (about 0.4 s and their memory) that we never use.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
