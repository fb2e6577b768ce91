"""The host map's entries: how a declared prefix's tokens are keyed, packed and confirmed.

An entry (one value per 16-byte key) is a declared prefix's tokens, or a sighting marker (the
header alone, kind 2: the host saw the key once, see flashtoken/admission.py). A prefix's::

    header   magic "FTM1", kind, cut (code points), prefix length, token count, checksum
    meta     encoding id (32 bytes), namespace, allowed special tokens (NUL-joined)
    prefix   the prefix's UTF-8 bytes
    tokens   little-endian uint32 ids: the prefix's tokens before ``cut``

Beside the entries, under a reserved key, the daemon keeps the hot list: the keys of the
entries used most recently, newest first (``pack_hot``). A worker starting takes those entries
into its L1 (client/hostmap.py), so that its first request for a hot prefix is an L1 hit.

A key only locates an entry (xxh3 has no collision resistance against crafted text, and prompts
carry user text): a hit is used only if the stored namespace, encoding id, policy and prefix
bytes equal the asker's, and the checksum (xxh3-64 over the rest of the entry, written by the
daemon) holds. That costs microseconds, where decoding the head to check its spelling cost ~150 us.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import xxhash

__all__ = [
    "FORMAT",
    "HOT_KEY",
    "SALT_KEY",
    "SEEN_MARKER",
    "VERSION_KEY",
    "Hit",
    "HOT_KEYS",
    "confirm",
    "entry_cost",
    "entry_identity",
    "entry_key",
    "entry_tokens",
    "hot_keys",
    "is_seen_marker",
    "pack_entry",
    "pack_hot",
]

FORMAT = b"FTM1"  # the format version is part of the magic
# The map's own records, under keys that are never a 16-byte entry key.
VERSION_KEY = b"\x00flashtoken-map-format"
SALT_KEY = b"\x00flashtoken-map-salt"
"""A random salt per map, in the map: keys cannot be aimed at from outside the daemon's private
directory (a crafted xxh3 collision could only evict, never mislead, but not even that)."""
HOT_KEY = b"\x00flashtoken-map-hot"  # the hot list
_HEADER = struct.Struct("<4sBxxxIIIQ")  # magic, kind, cut, prefix bytes, tokens, checksum
_META = struct.Struct("<32sHI")  # encoding id, namespace length, policy length
KIND_PREFIX = 1
KIND_SEEN = 2  # a sighting: the host was asked for this key once (flashtoken/admission.py)
# LMDB stores a value larger than about half a page on overflow pages of its own: a value costs
# whole 4 KiB pages, plus its node (key, header) in a leaf page.
_PAGE = 4096
_NODE_OVERHEAD = 64


def entry_key(
    salt: bytes, namespace: bytes, eid: bytes, allowed: tuple[str, ...], prefix: bytes
) -> bytes:
    """The 16-byte key of a declared prefix: it locates, the entry's own fields confirm."""
    h = xxhash.xxh3_128()
    for part in (b"FT-map-1", salt, namespace, eid, _policy_bytes(allowed)):
        h.update(len(part).to_bytes(4, "little"))
        h.update(part)
    h.update(prefix)
    return h.digest()


def _policy_bytes(allowed: tuple[str, ...]) -> bytes:
    return "\x00".join(allowed).encode("utf-8")


def pack_entry(
    namespace: bytes, eid: bytes, allowed: tuple[str, ...], prefix: bytes, cut: int, tokens: bytes
) -> bytes:
    """A declared prefix's value; ``tokens`` are little-endian uint32 bytes
    (``array('I').tobytes()``)."""
    policy = _policy_bytes(allowed)
    meta = _META.pack(eid, len(namespace), len(policy)) + namespace + policy
    body = meta + prefix + tokens
    checksum = xxhash.xxh3_64_intdigest(
        _HEADER.pack(FORMAT, KIND_PREFIX, cut, len(prefix), len(tokens) // 4, 0) + body
    )
    return _HEADER.pack(FORMAT, KIND_PREFIX, cut, len(prefix), len(tokens) // 4, checksum) + body


SEEN_MARKER = _HEADER.pack(FORMAT, KIND_SEEN, 0, 0, 0, 0)
"""The value stored for a key the host has seen once and not cached: no tokens, nothing to
confirm. A marker under a colliding key costs a request, never an id: it only sends a worker to
the daemon instead of encoding alone."""


HOT_KEYS = 64  # the hot list's length: 1 KiB
_HOT_MAGIC = b"FTH1"


def pack_hot(keys: list[bytes]) -> bytes:
    """The hot list's value: the 16-byte keys of the most recently used entries, newest first."""
    return _HOT_MAGIC + b"".join(keys[:HOT_KEYS])


def hot_keys(value: Any) -> list[bytes]:
    """The keys of a hot list's value; [] for anything else. A key listed is only a key: its
    entry is looked up and confirmed like any other (it may have been evicted since)."""
    data = bytes(value)
    if not data.startswith(_HOT_MAGIC) or (len(data) - 4) % 16 or len(data) > 4 + 16 * HOT_KEYS:
        return []
    return [data[i : i + 16] for i in range(4, len(data), 16)]


def entry_identity(value: Any) -> tuple[bytes, bytes, tuple[str, ...], bytes] | None:
    """``(namespace, encoding id, allowed specials, prefix bytes)`` of a prefix entry as its
    fields say, unconfirmed (``confirm`` checks them and the checksum); None if malformed."""
    view = memoryview(value)
    layout = _layout(view)
    if layout is None:
        return None
    header, eid, n_namespace, n_policy = layout
    at = _HEADER.size + _META.size
    namespace = bytes(view[at : at + n_namespace])
    at += n_namespace
    try:
        policy = bytes(view[at : at + n_policy]).decode("utf-8")
    except UnicodeDecodeError:
        return None
    at += n_policy
    allowed = tuple(policy.split("\x00")) if policy else ()
    return namespace, eid, allowed, bytes(view[at : at + header[3]])


def is_seen_marker(value: Any) -> bool:
    return len(value) == _HEADER.size and bytes(value[:5]) == SEEN_MARKER[:5]


@dataclass(frozen=True)
class Hit:
    """A confirmed entry: the prefix's tokens before offset ``cut`` (code points), and the key
    it was found under (what a worker reports as used)."""

    tokens: list[int]
    cut: int
    key: bytes = b""


def _layout(view: memoryview) -> tuple[tuple[Any, ...], bytes, int, int] | None:
    """A prefix entry's header fields, encoding id and namespace and policy lengths, if its
    lengths add up to the value's; None for anything else (a marker, a value cut short).
    Nothing is confirmed: ``confirm`` and ``entry_identity`` both start here."""
    if len(view) < _HEADER.size + _META.size:
        return None
    header = _HEADER.unpack_from(view)
    magic, kind, cut, n_prefix, n_tokens, _ = header
    if magic != FORMAT or kind != KIND_PREFIX or cut > n_prefix:
        return None
    eid, n_namespace, n_policy = _META.unpack_from(view, _HEADER.size)
    if _HEADER.size + _META.size + n_namespace + n_policy + n_prefix + 4 * n_tokens != len(view):
        return None
    return header, eid, n_namespace, n_policy


def confirm(
    value: Any, namespace: bytes, eid: bytes, allowed: tuple[str, ...], prefix: bytes
) -> tuple[int, memoryview] | None:
    """``(cut, token bytes)`` of ``value`` if it is this asker's entry and intact, else None."""
    view = memoryview(value)
    layout = _layout(view)
    if layout is None:
        return None
    (magic, kind, cut, n_prefix, n_tokens, checksum), stored_eid, n_namespace, n_policy = layout
    policy = _policy_bytes(allowed)
    if stored_eid != eid or n_prefix != len(prefix):
        return None
    if n_namespace != len(namespace) or n_policy != len(policy):
        return None
    at, end = _HEADER.size + _META.size, len(view)
    # Compared by bytes.startswith, a memcmp over the mapping with no copy (the lengths are
    # equal, so it is equality). Rejected: ``view[a:b] == prefix``, which compares item by item
    # (~2.5 ns a byte, 80 us for 32 KiB); ``bytes(view[a:b]) == prefix`` copies 32 KiB first.
    if not namespace.startswith(view[at : at + n_namespace]):
        return None
    at += n_namespace
    if not policy.startswith(view[at : at + n_policy]):
        return None
    at += n_policy
    if not prefix.startswith(view[at : at + n_prefix]):  # the confirmation: the prefix's bytes
        return None
    at += n_prefix
    h = xxhash.xxh3_64()
    h.update(_HEADER.pack(magic, kind, cut, n_prefix, n_tokens, 0))
    h.update(view[_HEADER.size :])
    if h.intdigest() != checksum:
        return None
    return cut, view[at:end]


def entry_tokens(value: Any) -> int:
    """How many tokens an entry holds (0 for a value too short to be one)."""
    if len(value) < _HEADER.size:
        return 0
    return int(_HEADER.unpack_from(value)[4])


def entry_cost(key: bytes, value_len: int) -> int:
    """Bytes an entry takes in the map, as counted against the budget (LMDB's pages)."""
    total = len(key) + value_len + _NODE_OVERHEAD
    return -(-total // _PAGE) * _PAGE if value_len > _PAGE // 2 else total
