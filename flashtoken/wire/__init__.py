"""The wire between ``flashtoken-daemon`` and its clients: one contract, imported by both sides
(docs/PROTOCOL.md describes it; never imported by ``import flashtoken``: it needs msgpack).

A message is a ZeroMQ multipart message: a msgpack header frame, then raw frames. The package,
one concept a module:

- ``codec``      framing: the header codec (magic, versions, msgpack's allocation limits), the
                 wire's limits, token frames (little-endian uint32);
- ``schema``     how a message is declared, once, and packed and parsed from that declaration;
- ``requests``   GET, AUTO, TELL, TOUCH, STATS, PING, and ``parse_request``;
- ``replies``    typed replies (``GetHit``, ``GetMiss``, ``AutoHit``, ``AutoMiss``,
                 ``Unplaced``, ``StatsReply``, ``Pong``, ``ErrorReply``) and ``parse_reply``;
- ``published``  the chain blocks the daemon's PUB socket sends (``Blocks``);
- ``keys``       key derivation: ``make_key``, ``namespace_tag``, ``make_chain_seed``;
- ``addresses``  the default address, the publish address, the private-directory policy and
                 who may be the daemon (``check_daemon_socket``);
- ``admin``      a STATS or PING on a socket of its own (``request_stats``: the CLI's ``stats``).

Everything that crosses the socket is checked, type and range, before anyone uses it: a peer is
never trusted to be well formed (ProtocolError). Nothing is ever unpickled.

>>> frames = GetRequest(7, bytes(16), "cl100k_base", bytes(32), (), True, b"Hello").frames()
>>> parse_request(frames).prefix
b'Hello'
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
    MAX_TOUCH_KEYS,
    MIN_BLOCK_BYTES,
    SERVER_ERROR,
    VERSION,
    pack_header,
    request_id_of,
    tokens_from_frame,
    tokens_to_frame,
    unpack_header,
)
from .keys import make_chain_seed, make_key, namespace_tag
from .published import Blocks, parse_blocks
from .replies import (
    AutoHit,
    AutoMiss,
    ErrorReply,
    GetHit,
    GetMiss,
    Pong,
    Reply,
    StatsReply,
    Unplaced,
    parse_reply,
)
from .requests import (
    OPS,
    AutoRequest,
    GetRequest,
    PingRequest,
    Request,
    StatsRequest,
    TellRequest,
    TouchRequest,
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
    "MAX_TOUCH_KEYS",
    "MIN_BLOCK_BYTES",
    "OPS",
    "SERVER_ERROR",
    "VERSION",
    "AutoHit",
    "AutoMiss",
    "AutoRequest",
    "Blocks",
    "ErrorReply",
    "GetHit",
    "GetMiss",
    "GetRequest",
    "PingRequest",
    "Pong",
    "Reply",
    "Request",
    "StatsReply",
    "StatsRequest",
    "TellRequest",
    "TouchRequest",
    "Unplaced",
    "check_daemon_socket",
    "check_private_dir",
    "default_address",
    "ipc_path",
    "make_chain_seed",
    "make_key",
    "namespace_tag",
    "pack_header",
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
