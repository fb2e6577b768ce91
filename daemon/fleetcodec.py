"""The fleet tier's values: keys, the signed value format, the secrets, and every check.

Under ``{key_prefix}{hex SHA-256 of (format, algorithm version, namespace, encoding id, policy,
prefix bytes)}`` a value is::

    b"FTF" version(1) | cut u32 | cut_byte u32 | prefix_len u32 | n u32 | n x u32 ids | mac(32)

integers little-endian; ``cut`` is the stable cut in code points, ``cut_byte`` the same offset in
bytes, ids the prefix's tokens before it (the store's token frame as is). ``mac`` is HMAC-SHA256
with the fleet secret over the key and everything before it: any process that can write to
Valkey could otherwise poison every host. A value is used only after it passes, in this order:
the HMAC (under any of the configured secrets, for rotation), the format, the lengths, the cut
(it must be the stable cut this daemon computes for the prefix itself: a regex scan of its last
pieces, no encode), the ids (known to the encoding, no special token the policy forbids), and
the spelling: the ids spell ``prefix[:cut_byte]`` (daemon/fleetspell.py). The tokenization
itself is trusted to the holders of the secret, as a client trusts its daemon.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
from typing import Any, NamedTuple

import flashtoken
from flashtoken import tiktoken_parts
from flashtoken.boundary import stable_offset
from flashtoken.specials import SpecialPolicy

from .encodings import Loaded
from .fleetspell import spells, table_for

log = logging.getLogger("flashtoken.daemon.fleet")

FORMAT_VERSION = 1
_MAGIC = b"FTF" + bytes([FORMAT_VERSION])
_HEAD = struct.Struct("<4sIIII")  # magic+version, cut, cut_byte, prefix_len, n
_MAC_BYTES = 32
MIN_SECRET_BYTES = 16

# The first two bytes of each encoding's special tokens, by encoding identity (see
# _forbidden_special): a few short tuples, one per encoding ever checked.
_STARTS: dict[bytes, tuple[bytes, ...]] = {}


class FleetConfigError(ValueError):
    """The fleet settings cannot work; the message says what to change."""


class Found(NamedTuple):
    """A checked value: the store's token frame (little-endian uint32) and the cut."""

    tokens: bytes
    cut: int
    cut_byte: int


def read_secrets(path: str) -> list[bytes]:
    """The secrets in ``path``: one a line, the first signs, every one verifies (rotation).

    Blank lines and lines starting with ``#`` are skipped. Raises FleetConfigError if the file
    cannot be read or holds no secret, or a secret is shorter than MIN_SECRET_BYTES.
    """
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            lines = f.read().splitlines()
    except OSError as exc:
        raise FleetConfigError(f"cannot read the fleet secret file {path}: {exc}") from exc
    secrets = [line.strip() for line in lines]
    secrets = [s for s in secrets if s and not s.startswith(b"#")]
    if not secrets:
        raise FleetConfigError(
            f"the fleet secret file {path} holds no secret; write one line of at least"
            f" {MIN_SECRET_BYTES} random bytes, e.g. `head -c 32 /dev/urandom | base64 > {path}`"
        )
    for s in secrets:
        if len(s) < MIN_SECRET_BYTES:
            raise FleetConfigError(
                f"a secret in {path} is {len(s)} bytes; use at least {MIN_SECRET_BYTES}"
                " (e.g. `head -c 32 /dev/urandom | base64`)"
            )
    if mode & 0o077:
        log.warning("fleet secret file %s is readable by group or others; chmod 600 it", path)
    return secrets


def fleet_key(
    key_prefix: bytes, namespace: bytes, eid: bytes, allowed: tuple[str, ...], prefix: bytes
) -> bytes:
    """The Valkey key of a prefix's value: a strong digest of everything that decides its ids
    (SHA-256: several times faster than BLAKE2b where the CPU has SHA instructions).

    ``namespace`` separates tenants (today the daemon's key for the prefix, which carries the
    client's namespace salt); the algorithm version separates daemons whose cuts could differ.
    """
    h = hashlib.sha256()
    fields = [b"flashtoken-fleet/%d" % FORMAT_VERSION, flashtoken.__version__.encode()]
    fields += [namespace, eid, b"%d" % len(allowed), *(a.encode() for a in allowed)]
    for field in fields:
        h.update(struct.pack("<Q", len(field)))
        h.update(field)
    h.update(struct.pack("<Q", len(prefix)))
    h.update(prefix)
    return key_prefix + h.hexdigest().encode()


def _mac(secret: bytes, key: bytes, body: bytes | memoryview) -> bytes:
    h = hmac.new(secret, key, hashlib.sha256)
    h.update(body)
    return h.digest()


def pack_value(
    secret: bytes, key: bytes, tokens: bytes, cut: int, cut_byte: int, n_prefix: int
) -> bytes:
    """The signed value of a fill (``tokens``: the store's little-endian uint32 frame)."""
    body = _HEAD.pack(_MAGIC, cut, cut_byte, n_prefix, len(tokens) // 4) + tokens
    return body + _mac(secret, key, body)


def check_value(
    secrets: list[bytes],
    key: bytes,
    value: Any,
    loaded: Loaded,
    allowed: tuple[str, ...],
    prefix: bytes,
    text: str,
) -> Found | None:
    """The value's tokens and cut if it passes every check (module docstring), else None.

    ``text`` is ``prefix`` decoded (strict UTF-8), as the fill has it.
    """
    if not isinstance(value, bytes) or len(value) < _HEAD.size + _MAC_BYTES:
        return None
    body, mac = memoryview(value)[:-_MAC_BYTES], value[-_MAC_BYTES:]
    if not any(hmac.compare_digest(_mac(s, key, body), mac) for s in secrets):
        return None
    magic, cut, cut_byte, n_prefix, n = _HEAD.unpack_from(body)
    if magic != _MAGIC or len(body) != _HEAD.size + 4 * n or n_prefix != len(prefix):
        return None
    if cut > len(text) or cut_byte > n_prefix or (n == 0) != (cut == 0):
        return None
    if cut:  # (0, 0): nothing kept, which is exact for any prefix
        policy = SpecialPolicy.of(loaded.enc, frozenset(allowed), ())
        if cut != stable_offset(loaded.rule, policy, text, 0, len(text)):
            return None
        # The bytes after the cut, not before it: the tail is a few pieces, the head 32 KiB.
        if n_prefix - len(text[cut:].encode()) != cut_byte:
            return None
    tokens = body[_HEAD.size :]
    spelled = spells(table_for(loaded.eid, loaded.enc), tokens, prefix[:cut_byte])
    if spelled is None:  # a special token, or an id no token has: tiktoken decides
        spelled = _spelled_with_specials(loaded, allowed, tokens, prefix[:cut_byte])
    return Found(tokens.tobytes(), cut, cut_byte) if spelled else None


def _spelled_with_specials(
    loaded: Loaded, allowed: tuple[str, ...], tokens: memoryview, head: bytes
) -> bool:
    """The slow path of the spelling check, for ids that are not all ordinary tokens."""
    import numpy as np

    ids = np.frombuffer(tokens, "<u4").tolist()  # decode_bytes reads a list fastest
    try:
        spelled = loaded.enc.decode_bytes(ids)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException:  # noqa: B036 - an unknown id: KeyError, or pyo3's PanicException
        return False
    return spelled == head and not _forbidden_special(loaded, allowed, spelled, ids)


def _forbidden_special(
    loaded: Loaded, allowed: tuple[str, ...], spelled: bytes, ids: list[int]
) -> bool:
    """Whether ``ids`` hold a special token the policy does not allow (a prefix may spell one's
    text as ordinary tokens). A special token's id spells its text, so when the text holds no
    special token's first two bytes no id needs a look."""
    specials = tiktoken_parts.special_tokens(loaded.enc)
    starts = _STARTS.get(loaded.eid)
    if starts is None:
        starts = _STARTS[loaded.eid] = tuple({s.encode()[:2] for s in specials})
    if not any(start in spelled for start in starts):
        return False
    ok = {specials[a] for a in allowed}  # two names may share an id (o200k_harmony)
    return not {i for i in specials.values() if i not in ok}.isdisjoint(ids)
