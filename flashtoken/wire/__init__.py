"""The wire format between ``flashtoken-daemon`` and its clients (docs/PROTOCOL.md).

One package, imported by both sides (never by ``import flashtoken``: it pulls in msgpack and
xxhash). A message is a ZeroMQ multipart message: a msgpack *header* frame, then raw frames.

Request ``[header, *frames]``; header ``{"m": b"FT", "v": 1, "op": str, "id": uint64, ...}``:

- ``GET``  fields ``ns`` (16 bytes, ``namespace_tag``), ``enc`` (encoding name), ``eid`` (32 bytes,
  ``encoding_id``), ``allowed`` (sorted list of allowed special tokens, ``[]`` for ordinary),
  ``fill`` (bool); frame 1: the prefix as UTF-8.
- ``AUTO``  fields ``seed`` (16 bytes, ``make_chain_seed``), ``enc``, ``eid``, ``allowed``,
  ``fill``, ``block`` (block size in bytes), ``skip`` (full blocks the client already holds);
  frame 1: the whole text as UTF-8. Asks for the longest chain of cached blocks that starts the
  text (automatic prefix reuse, flashtoken.AutoPrefixCache shared by processes).
- ``TELL``  fields ``seed``, ``enc``, ``eid``, ``allowed``, ``block`` as for ``AUTO``, and
  ``first`` (the index of the first new block), ``parent`` (the digest of block ``first - 1``,
  nil when ``first`` is 0), ``start`` (that block's cut, in bytes), ``digests`` (one per new
  block); frame 1: the text's bytes from ``start`` to past the last new block. A client that
  encoded a text itself tells the daemon its new blocks, and the daemon encodes them (from
  ``start``: no more than the client did), stores and publishes them. Answered only when the
  daemon does not hold the parent block (evicted, or a restart): ``{"placed": false}``, and
  the client tells its next text from the first block.
- ``STATS``, ``PING``: no fields, no frames.

Reply ``[header, *frames]``; header ``{"m", "v", "id", "ok": bool, ...}``. A GET hit carries
``{"hit": true, "cut": int, "n": int}`` and one frame of ``n`` little-endian uint32 tokens; a miss
``{"hit": false, "filling": bool}``. An AUTO reply carries ``{"blocks": int, "filling": bool,
"hit": bool}``; when ``hit``, also ``{"start": int, "cut_byte": int, "n": int}`` and one frame of
``n`` tokens: those of the text's bytes ``start .. cut_byte`` (blocks ``skip .. blocks-1``).
Errors are ``{"ok": false, "error": "CLIENT_ERROR" | "SERVER_ERROR", "message": str}``, as
memcached names them.

Published (PUB socket at ``publish_address(address)``) ``[seed, header, span, tokens]``: the chain
blocks the daemon has just stored, for clients that follow chains (``pack_blocks``).

Everything that crosses the socket is checked here, type and range, before anyone uses it: a
peer is never trusted to be well formed. Nothing is ever unpickled.
"""

from .addresses import (
    check_daemon_socket,
    check_private_dir,
    default_address,
    ipc_path,
    publish_address,
    runtime_dir,
)
from .codec import (
    ALGORITHM,
    CLIENT_ERROR,
    ENCODING_ID_BYTES,
    KEY_BYTES,
    MAGIC,
    MAX_BLOCK_BYTES,
    MAX_HEADER_BYTES,
    MAX_PREFIX_BYTES,
    MAX_PUBLISHED_BLOCKS,
    MIN_BLOCK_BYTES,
    SERVER_ERROR,
    VERSION,
    request_id_of,
    tokens_from_frame,
    tokens_to_frame,
    unpack_header,
)
from .keys import make_chain_seed, make_key, namespace_tag
from .published import Blocks, pack_blocks, parse_blocks
from .replies import (
    Reply,
    pack_auto_reply,
    pack_error,
    pack_hit,
    pack_miss,
    pack_ok,
    parse_reply,
)
from .requests import (
    AutoRequest,
    GetRequest,
    Request,
    TellRequest,
    TouchRequest,
    pack_auto,
    pack_get,
    pack_simple,
    pack_tell,
    pack_touch,
    parse_request,
)

__all__ = [
    "ALGORITHM",
    "CLIENT_ERROR",
    "ENCODING_ID_BYTES",
    "KEY_BYTES",
    "MAGIC",
    "MAX_BLOCK_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_PREFIX_BYTES",
    "MAX_PUBLISHED_BLOCKS",
    "MIN_BLOCK_BYTES",
    "SERVER_ERROR",
    "VERSION",
    "AutoRequest",
    "Blocks",
    "GetRequest",
    "Reply",
    "Request",
    "TellRequest",
    "TouchRequest",
    "check_daemon_socket",
    "check_private_dir",
    "default_address",
    "ipc_path",
    "make_chain_seed",
    "make_key",
    "namespace_tag",
    "pack_auto",
    "pack_auto_reply",
    "pack_blocks",
    "pack_error",
    "pack_get",
    "pack_hit",
    "pack_miss",
    "pack_ok",
    "pack_simple",
    "pack_tell",
    "pack_touch",
    "parse_blocks",
    "parse_reply",
    "parse_request",
    "publish_address",
    "request_id_of",
    "runtime_dir",
    "tokens_from_frame",
    "tokens_to_frame",
    "unpack_header",
]
