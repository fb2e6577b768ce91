"""Framing: the header codec, the wire's limits and token frames (docs/PROTOCOL.md, "Messages").

A message is a ZeroMQ multipart message: a msgpack header frame, then raw frames. Every header
carries the magic, the wire version and the flashtoken version (``a``); a header is decoded
with msgpack's allocation limits, so no declared length makes the receiver allocate more than
the frame it holds. Nothing is ever unpickled.
"""

from __future__ import annotations

import sys
from array import array
from typing import Any

import msgpack

from flashtoken import __version__ as _flashtoken_version
from flashtoken.errors import ProtocolError

MAGIC = b"FT"
VERSION = 3
"""The wire format's version (2: a GET carries its namespace tag, not a key; 3: and how long it
may wait for a fill in flight, ``wait_ms``)."""
ALGORITHM = _flashtoken_version
"""The version of the code that decides cuts, blocks and digests, carried in every header as
``a``: a client uses only a daemon of its own version, and a daemon serves only clients of its
own (rolling upgrades never mix an old tokenizer into new workers)."""

KEY_BYTES = 16
"""xxh3_128 digest length."""
ENCODING_ID_BYTES = 32
"""``flashtoken.encodings.encoding_id`` length."""
MAX_HEADER_BYTES = 64 * 1024
"""A header frame longer than this is refused unread."""
MAX_PREFIX_BYTES = 4 * 1024 * 1024
"""Default limit on the UTF-8 prefix frame of a GET (``--max-prefix-bytes`` on the daemon)."""
MAX_REQUEST_ID = 2**64 - 1
MAX_NAME_CHARS = 64
"""Encoding names and ops are short."""
MAX_SPECIALS = 256
MAX_SPECIAL_CHARS = 256
MAX_ERROR_MESSAGE_CHARS = 1024
MIN_BLOCK_BYTES = 64
MAX_BLOCK_BYTES = 1024 * 1024
"""Block sizes an AUTO request may use (``flashtoken.AutoPrefixCache(block_bytes=...)``). Not
less than 64: every block costs the daemon a hash, a lookup and an entry (~300 bytes), so
16-byte blocks made a 4 MiB text 250,000 steps on its loop and 20x its size in memory."""

MAX_WAIT_MS = 60_000
"""The longest a GET may ask to wait for a fill in flight (a minute: longer is a bug)."""
MAX_TOUCH_KEYS = 1024
"""16-byte keys in one TOUCH."""
MAX_PUBLISHED_BLOCKS = 4096
"""Blocks in one published message (a fill's new blocks: its text's length over the block)."""
CLIENT_ERROR = "CLIENT_ERROR"
"""An error reply's type when the request broke a rule (memcached's name)."""
SERVER_ERROR = "SERVER_ERROR"
"""... when the daemon could not serve a valid request."""

# msgpack's own limits for one header: no string, array or map may even be allocated beyond
# what a valid header can hold, whatever length a hostile frame declares. Nesting is bounded by
# msgpack's parser stack and then refused by the type checks (no valid field is a container of
# containers).
_UNPACK_LIMITS: dict[str, Any] = dict(
    max_str_len=MAX_HEADER_BYTES,
    max_bin_len=MAX_HEADER_BYTES,
    max_array_len=4096,
    max_map_len=256,
    max_ext_len=0,
    raw=False,
    strict_map_key=True,
    use_list=True,
)


# -- tokens ----------------------------------------------------------------------------------

_BIG_ENDIAN = sys.byteorder == "big"


def tokens_to_frame(tokens: array) -> bytes:
    """``array('I')`` to the wire: little-endian uint32, 4 bytes a token."""
    if _BIG_ENDIAN:
        tokens = array("I", tokens)
        tokens.byteswap()
    return tokens.tobytes()


def tokens_from_frame(frame: bytes | memoryview) -> array:
    """The wire to ``array('I')``. Raises ProtocolError if the length is not a multiple of 4."""
    if len(frame) % 4:
        raise ProtocolError(f"token frame of {len(frame)} bytes is not a whole number of uint32")
    tokens = array("I")
    tokens.frombytes(frame)
    if _BIG_ENDIAN:
        tokens.byteswap()
    return tokens


# -- headers ---------------------------------------------------------------------------------


HEADER_START: dict[str, Any] = {"m": MAGIC, "v": VERSION}
"""What every header begins with; ``seal_header`` ends it with the code's version."""


def seal_header(fields: dict[str, Any]) -> bytes:
    """Pack ``fields`` (begun with ``HEADER_START``), the code's version added last, in place:
    ``Message.frames()`` builds each header in one dict, never copied."""
    fields["a"] = ALGORITHM
    return msgpack.packb(fields, use_bin_type=True)


def pack_header(fields: dict[str, Any]) -> bytes:
    """A header frame: the magic and version, ``fields`` in their order, the code's version."""
    return seal_header({**HEADER_START, **fields})


def unpack_header(frame: bytes) -> dict[str, Any]:
    """Decode a header frame, with msgpack's allocation limits; check magic and versions.

    Raises ProtocolError for anything but a map carrying our magic and version.
    """
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError("header frame must be bytes")
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(frame, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises ValueError, ExtraData, StackError, UnicodeError...
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("header must be a msgpack map")
    if header.get("m") != MAGIC:
        raise ProtocolError("bad magic: not a FlashToken message")
    if header.get("v") != VERSION:
        raise ProtocolError(
            f"unsupported protocol version {header.get('v')!r}; this side speaks {VERSION}"
        )
    if header.get("a") != ALGORITHM:
        raise ProtocolError(
            f"the other side runs flashtoken {header.get('a')!r}, this side {ALGORITHM}: a client"
            " and a daemon of different versions are never used together; restart the daemon"
            " with the clients' version"
        )
    return header


def request_id_of(frames: list[bytes]) -> int:
    """Best-effort id of a request that failed validation, so its error reply can be matched; 0
    (never a client's id) when there is none."""
    try:
        header = msgpack.unpackb(frames[0], **_UNPACK_LIMITS)
        value = header.get("id") if isinstance(header, dict) else None
        return value if type(value) is int and 0 <= value <= MAX_REQUEST_ID else 0
    except Exception:
        return 0
