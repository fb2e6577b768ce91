"""The wire format between ``flashtoken-daemon`` and its clients (docs/PROTOCOL.md).

One module, imported by both sides (never by ``import flashtoken``: it pulls in msgpack and
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

from __future__ import annotations

import os
import stat
import sys
import tempfile
from array import array
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash

from flashtoken import __version__ as _flashtoken_version
from flashtoken.errors import DaemonUnavailable, ProtocolError

__all__ = [
    "ENCODING_ID_BYTES",
    "KEY_BYTES",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "MAX_PREFIX_BYTES",
    "VERSION",
    "AutoRequest",
    "Blocks",
    "GetRequest",
    "Reply",
    "Request",
    "TellRequest",
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
    "parse_reply",
    "parse_blocks",
    "parse_request",
    "publish_address",
    "runtime_dir",
    "tokens_from_frame",
    "tokens_to_frame",
]

MAGIC = b"FT"
VERSION = 2
"""The wire format's version (2: a GET carries its namespace tag, not a key)."""
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

OPS = ("GET", "AUTO", "TELL", "TOUCH", "STATS", "PING")
MAX_TOUCH_KEYS = 1024
CLIENT_ERROR = "CLIENT_ERROR"
SERVER_ERROR = "SERVER_ERROR"

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


# -- addresses -------------------------------------------------------------------------------


def runtime_dir(*, create: bool = True) -> str:
    """The per-user directory of the default socket, checked to be private.

    ``$XDG_RUNTIME_DIR/flashtoken`` when ``XDG_RUNTIME_DIR`` is set and writable, else
    ``{tempdir}/flashtoken-{uid}``; created with mode 0700.

    Raises ``PermissionError`` if the directory exists but is not ours, is a symlink, or can be
    used by the group or others: a socket in it could be replaced by another user.
    """
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK):
        path = os.path.join(base, "flashtoken")
    else:
        path = os.path.join(tempfile.gettempdir(), f"flashtoken-{os.getuid()}")
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    check_private_dir(path)
    return path


def check_private_dir(path: str) -> None:
    """Raise ``PermissionError`` unless ``path`` is a real directory of ours, mode 0o700 or less."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a directory (a symlink?); remove it and retry")
    if st.st_uid != os.getuid():
        raise PermissionError(
            f"{path} belongs to uid {st.st_uid}, not to us (uid {os.getuid()}); another user may"
            " control the socket in it. Remove it, or pass --bind / address= elsewhere."
        )
    if st.st_mode & 0o077:
        raise PermissionError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):o}; other users could reach the socket."
            f" Run `chmod 700 {path}`, or remove it."
        )


def check_daemon_socket(address: str) -> None:
    """Check, before connecting, that only our own user can be the daemon at ``address``.

    For ``ipc://``: the socket file must be a socket owned by us (the effective uid) with no
    permission for the group or others, in a directory owned by us or root that no one else can
    write to (so no other user can have replaced the socket). Other transports are not checked
    here (TCP is only ever used when asked for, and has no owner).

    Raises ``DaemonUnavailable`` saying what is wrong: the client then encodes locally.
    """
    path = ipc_path(address)
    if path is None:
        return
    me = os.geteuid()
    directory = os.path.dirname(path) or "."
    try:
        st = os.lstat(path)
        dst = os.lstat(directory)
    except OSError as exc:
        raise DaemonUnavailable(
            f"no flashtoken-daemon socket at {address} ({exc.strerror}); start one with"
            " `flashtoken-daemon serve`"
        ) from None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != me or st.st_mode & 0o077:
        raise DaemonUnavailable(
            f"{path} is not a private socket of uid {me} (uid {st.st_uid}, mode"
            f" {stat.S_IMODE(st.st_mode):o}): not trusted as the daemon; start the daemon as"
            " this user (it makes its socket 0600)"
        )
    if not stat.S_ISDIR(dst.st_mode) or dst.st_uid not in (me, 0) or dst.st_mode & 0o022:
        raise DaemonUnavailable(
            f"{directory} (uid {dst.st_uid}, mode {stat.S_IMODE(dst.st_mode):o}) may be written"
            " by another user, who could replace the daemon's socket: not trusted; use a"
            " directory of this user's with mode 0700"
        )


def default_address() -> str:
    """``ipc://{runtime_dir()}/daemon.sock``: where the daemon binds and clients connect."""
    return "ipc://" + os.path.join(runtime_dir(), "daemon.sock")


def publish_address(address: str) -> str | None:
    """Where a daemon bound at ``address`` publishes its new chain blocks: the ipc path with
    ``.pub`` appended, or the next TCP port; None for any other transport (no publishing).

    >>> publish_address("ipc:///run/user/1000/flashtoken/daemon.sock")
    'ipc:///run/user/1000/flashtoken/daemon.sock.pub'
    >>> publish_address("tcp://127.0.0.1:7000")
    'tcp://127.0.0.1:7001'
    """
    if address.startswith("ipc://"):
        return address + ".pub"
    host, sep, port = address.rpartition(":")
    if address.startswith("tcp://") and sep and port.isdigit() and int(port) < 65535:
        return f"{host}:{int(port) + 1}"
    return None


def ipc_path(address: str) -> str | None:
    """The filesystem path of an ``ipc://`` address, else None."""
    return address[len("ipc://") :] if address.startswith("ipc://") else None


# -- keys ------------------------------------------------------------------------------------


def make_key(
    namespace: bytes, encoding_ident: bytes, allowed: tuple[str, ...], prefix: bytes
) -> bytes:
    """The 16-byte cache key: xxh3_128 over the length-prefixed fields.

    A key locates an entry; it proves nothing (xxh3 has no collision resistance against crafted
    input), so the daemon confirms every hit against the prefix bytes it stores. The namespace is
    a salt: tenants with different salts never share entries, and cannot aim collisions at each
    other's keys without knowing the salt.

    >>> len(make_key(b"", bytes(32), (), b"You are a helpful assistant."))
    16
    """
    h = xxhash.xxh3_128()
    policy = b"".join(
        len(s).to_bytes(8, "little") + s for s in (a.encode("utf-8") for a in allowed)
    )
    for field in (b"flashtoken-key/1", namespace, encoding_ident, policy, prefix):
        # Length-prefixed, so that no two field sequences hash the same bytes.
        h.update(len(field).to_bytes(8, "little"))
        h.update(field)
    return h.digest()


def namespace_tag(namespace: bytes) -> bytes:
    """The 16 bytes a GET carries for its namespace: the daemon derives the key itself, from
    this tag and the bytes it receives (never from a key a client sends: anyone who knows a
    prompt could otherwise squat its key), and stores and compares the tag in the entry.

    >>> len(namespace_tag(b"tenant-a")), namespace_tag(b"a") == namespace_tag(b"b")
    (16, False)
    """
    h = xxhash.xxh3_128()
    for field in (b"flashtoken-ns/1", namespace):
        h.update(len(field).to_bytes(8, "little"))
        h.update(field)
    return h.digest()


def make_chain_seed(
    namespace: bytes, encoding_ident: bytes, allowed: tuple[str, ...], block_bytes: int
) -> bytes:
    """The 16-byte seed of an AUTO request: where its chain of block keys starts.

    The daemon keys block ``i`` of a text by ``seed + xxh3_128(text[:(i + 1) * block_bytes])``,
    so the namespace (a salt), the encoding, the policy and the block size all separate chains,
    and the namespace itself never crosses the socket. Like every key, a seed locates; the
    daemon confirms each block by its bytes, its parent block and (at the root) its encoding
    and policy.

    >>> len(make_chain_seed(b"", bytes(32), (), 512))
    16
    """
    h = xxhash.xxh3_128()
    policy = b"".join(
        len(s).to_bytes(8, "little") + s for s in (a.encode("utf-8") for a in allowed)
    )
    fields = (
        b"flashtoken-chain/1",
        namespace,
        encoding_ident,
        policy,
        block_bytes.to_bytes(8, "little"),
    )
    for field in fields:
        h.update(len(field).to_bytes(8, "little"))
        h.update(field)
    return h.digest()


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


def _pack(header: dict[str, Any]) -> bytes:
    header["a"] = ALGORITHM
    return msgpack.packb(header, use_bin_type=True)


def unpack_header(frame: bytes) -> dict[str, Any]:
    """Decode a header frame, with msgpack's allocation limits; check magic and version.

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


def _int(header: dict[str, Any], name: str, low: int, high: int) -> int:
    value = header.get(name)
    if type(value) is not int or not low <= value <= high:  # bool is an int: type() excludes it
        raise ProtocolError(f"field {name!r} must be an int in [{low}, {high}]")
    return value


def _bool(header: dict[str, Any], name: str) -> bool:
    value = header.get(name)
    if type(value) is not bool:
        raise ProtocolError(f"field {name!r} must be a bool")
    return value


def _bytes(header: dict[str, Any], name: str, length: int) -> bytes:
    value = header.get(name)
    if type(value) is not bytes or len(value) != length:
        raise ProtocolError(f"field {name!r} must be {length} bytes")
    return value


def _str(header: dict[str, Any], name: str, max_chars: int) -> str:
    value = header.get(name)
    if type(value) is not str or not 0 < len(value) <= max_chars:
        raise ProtocolError(f"field {name!r} must be a str of 1 to {max_chars} characters")
    return value


def request_id_of(frames: list[bytes]) -> int:
    """Best-effort id of a request that failed validation, so its error reply can be matched; 0
    (never a client's id) when there is none."""
    try:
        header = msgpack.unpackb(frames[0], **_UNPACK_LIMITS)
        value = header.get("id") if isinstance(header, dict) else None
        return value if type(value) is int and 0 <= value <= MAX_REQUEST_ID else 0
    except Exception:
        return 0


# -- requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    op: str
    id: int


@dataclass(frozen=True)
class GetRequest(Request):
    ns: bytes
    enc: str
    eid: bytes
    allowed: tuple[str, ...]
    fill: bool
    prefix: bytes


def pack_get(
    request_id: int,
    ns: bytes,
    enc: str,
    eid: bytes,
    allowed: tuple[str, ...],
    fill: bool,
    prefix: bytes,
) -> list[bytes]:
    header = {
        "m": MAGIC,
        "v": VERSION,
        "op": "GET",
        "id": request_id,
        "ns": ns,
        "enc": enc,
        "eid": eid,
        "allowed": list(allowed),
        "fill": fill,
    }
    return [_pack(header), prefix]


@dataclass(frozen=True)
class AutoRequest(Request):
    seed: bytes
    enc: str
    eid: bytes
    allowed: tuple[str, ...]
    fill: bool
    block: int
    skip: int
    text: bytes


@dataclass(frozen=True)
class TellRequest(Request):
    seed: bytes
    enc: str
    eid: bytes
    allowed: tuple[str, ...]
    block: int
    first: int
    parent: bytes | None
    start: int
    digests: list[bytes]
    span: bytes


def pack_auto(
    request_id: int,
    seed: bytes,
    enc: str,
    eid: bytes,
    allowed: tuple[str, ...],
    fill: bool,
    block: int,
    skip: int,
    text: bytes,
) -> list[bytes]:
    header = {
        "m": MAGIC,
        "v": VERSION,
        "op": "AUTO",
        "id": request_id,
        "seed": seed,
        "enc": enc,
        "eid": eid,
        "allowed": list(allowed),
        "fill": fill,
        "block": block,
        "skip": skip,
    }
    return [_pack(header), text]


def pack_tell(
    request_id: int,
    seed: bytes,
    enc: str,
    eid: bytes,
    allowed: tuple[str, ...],
    block: int,
    first: int,
    parent: bytes | None,
    start: int,
    digests: list[bytes],
    span: bytes,
) -> list[bytes]:
    header = {
        "m": MAGIC,
        "v": VERSION,
        "op": "TELL",
        "id": request_id,
        "seed": seed,
        "enc": enc,
        "eid": eid,
        "allowed": list(allowed),
        "block": block,
        "first": first,
        "parent": parent,
        "start": start,
        "digests": digests,
    }
    return [_pack(header), span]


@dataclass(frozen=True)
class TouchRequest(Request):
    keys: bytes  # 16-byte map keys, concatenated


def pack_touch(keys: bytes) -> list[bytes]:
    """Hits a worker took from the host map itself, for the daemon's LRU order (no reply)."""
    return [_pack({"m": MAGIC, "v": VERSION, "op": "TOUCH", "id": 0}), keys]


def pack_simple(op: str, request_id: int) -> list[bytes]:
    """A request with no fields: STATS or PING."""
    return [_pack({"m": MAGIC, "v": VERSION, "op": op, "id": request_id})]


def parse_request(frames: list[bytes], *, max_prefix_bytes: int = MAX_PREFIX_BYTES) -> Request:
    """Validate a request's frames (without the ROUTER identity) into a ``Request``.

    Checks the shape only; whether ``enc`` can be loaded and ``allowed`` are its special tokens is
    the daemon's to check. Raises ProtocolError with a message fit for a CLIENT_ERROR reply.
    """
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(f"a request has 1 or 2 frames, not {len(frames)}")
    header = unpack_header(frames[0])
    op = header.get("op")
    if op not in OPS or type(op) is not str:
        raise ProtocolError(f"unknown op; expected one of {', '.join(OPS)}")
    request_id = _int(header, "id", 0, MAX_REQUEST_ID)
    if op == "TOUCH":
        keys = frames[1] if len(frames) == 2 else b""
        if len(frames) != 2 or len(keys) % KEY_BYTES or len(keys) > MAX_TOUCH_KEYS * KEY_BYTES:
            raise ProtocolError(f"TOUCH takes one frame of at most {MAX_TOUCH_KEYS} 16-byte keys")
        return TouchRequest(op, request_id, bytes(keys))
    if op not in ("GET", "AUTO", "TELL"):
        if len(frames) != 1:
            raise ProtocolError(f"{op} takes no frames after the header")
        return Request(op, request_id)
    if len(frames) != 2:
        raise ProtocolError(f"{op} takes exactly one frame after the header: the text")
    allowed = _allowed(header)
    text = frames[1]
    if len(text) > max_prefix_bytes:
        raise ProtocolError(f"text of {len(text)} bytes exceeds the limit of {max_prefix_bytes}")
    text = bytes(text)
    try:
        text.decode("utf-8")  # strict: lone surrogates and overlong forms are refused too
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"text is not valid UTF-8 at byte {exc.start}") from exc
    enc = _str(header, "enc", MAX_NAME_CHARS)
    eid = _bytes(header, "eid", ENCODING_ID_BYTES)
    if op == "TELL":
        return _parse_tell(header, request_id, enc, eid, allowed, text)
    fill = _bool(header, "fill")
    if op == "GET":
        return GetRequest(
            op,
            request_id,
            ns=_bytes(header, "ns", KEY_BYTES),
            enc=enc,
            eid=eid,
            allowed=allowed,
            fill=fill,
            prefix=text,
        )
    block = _int(header, "block", MIN_BLOCK_BYTES, MAX_BLOCK_BYTES)
    skip = _int(header, "skip", 0, len(text) // block)
    return AutoRequest(
        op,
        request_id,
        seed=_bytes(header, "seed", KEY_BYTES),
        enc=enc,
        eid=eid,
        allowed=allowed,
        fill=fill,
        block=block,
        skip=skip,
        text=text,
    )


def _parse_tell(
    header: dict[str, Any],
    request_id: int,
    enc: str,
    eid: bytes,
    allowed: tuple[str, ...],
    span: bytes,
) -> TellRequest:
    block = _int(header, "block", MIN_BLOCK_BYTES, MAX_BLOCK_BYTES)
    first = _int(header, "first", 0, MAX_PREFIX_BYTES * 64 // block)
    parent = _parent(header, first)
    start = _int(header, "start", 0, first * block)
    digests = _digests(header)
    end = (first + len(digests)) * block - start
    if not end <= len(span) <= end + 3:
        raise ProtocolError("the span must run from 'start' to the end of the last block")
    return TellRequest(
        "TELL",
        request_id,
        seed=_bytes(header, "seed", KEY_BYTES),
        enc=enc,
        eid=eid,
        allowed=allowed,
        block=block,
        first=first,
        parent=parent,
        start=start,
        digests=digests,
        span=span,
    )


def _parent(header: dict[str, Any], first: int) -> bytes | None:
    """The digest of block ``first - 1`` (TELL, published blocks): nil only for block 0."""
    parent = header.get("parent")
    if (parent is None) != (first == 0) or (
        parent is not None and (type(parent) is not bytes or len(parent) != KEY_BYTES)
    ):
        raise ProtocolError("field 'parent' must be a 16-byte digest when 'first' > 0, else nil")
    return parent


def _digests(header: dict[str, Any]) -> list[bytes]:
    """One 16-byte digest per block (TELL, published blocks)."""
    digests = header.get("digests")
    if (
        type(digests) is not list
        or not 0 < len(digests) <= MAX_PUBLISHED_BLOCKS
        or any(type(d) is not bytes or len(d) != KEY_BYTES for d in digests)
    ):
        raise ProtocolError(
            f"field 'digests' must list 1 to {MAX_PUBLISHED_BLOCKS} 16-byte digests"
        )
    return digests


def _allowed(header: dict[str, Any]) -> tuple[str, ...]:
    allowed = header.get("allowed")
    if type(allowed) is not list or len(allowed) > MAX_SPECIALS:
        raise ProtocolError(f"field 'allowed' must be a list of at most {MAX_SPECIALS} str")
    for item in allowed:
        if type(item) is not str or not 0 < len(item) <= MAX_SPECIAL_CHARS:
            raise ProtocolError("field 'allowed' must hold special-token strings")
    if any(a >= b for a, b in zip(allowed, allowed[1:], strict=False)):
        # One canonical form, so that equal policies compare equal in the store.
        raise ProtocolError("field 'allowed' must be sorted and without duplicates")
    return tuple(allowed)


# -- replies ---------------------------------------------------------------------------------


def _reply(request_id: int, ok: bool, **fields: Any) -> bytes:
    return _pack({"m": MAGIC, "v": VERSION, "id": request_id, "ok": ok, **fields})


def pack_hit(request_id: int, cut: int, tokens_frame: bytes) -> list[Any]:
    return [_reply(request_id, True, hit=True, cut=cut, n=len(tokens_frame) // 4), tokens_frame]


def pack_auto_reply(
    request_id: int,
    blocks: int,
    filling: bool,
    start: int = 0,
    cut_byte: int = 0,
    tokens_frame: bytes | None = None,
) -> list[Any]:
    """An AUTO reply: a hit when ``tokens_frame`` is given (the tokens of bytes start..cut_byte)."""
    if tokens_frame is None:
        return [_reply(request_id, True, hit=False, blocks=blocks, filling=filling)]
    head = _reply(
        request_id,
        True,
        hit=True,
        blocks=blocks,
        filling=filling,
        start=start,
        cut_byte=cut_byte,
        n=len(tokens_frame) // 4,
    )
    return [head, tokens_frame]


def pack_miss(request_id: int, filling: bool) -> list[Any]:
    return [_reply(request_id, True, hit=False, filling=filling)]


def pack_ok(request_id: int, **fields: Any) -> list[Any]:
    return [_reply(request_id, True, **fields)]


def pack_error(request_id: int, error: str, message: str) -> list[Any]:
    return [_reply(request_id, False, error=error, message=message[:MAX_ERROR_MESSAGE_CHARS])]


@dataclass(frozen=True)
class Reply:
    """A checked reply. ``fields`` is the header; ``tokens`` the token frame of a hit."""

    id: int
    ok: bool
    fields: dict[str, Any]
    tokens: array | None = None

    @property
    def error(self) -> str | None:
        return None if self.ok else self.fields["error"]


def parse_reply(frames: list[bytes]) -> Reply:
    """Validate a reply's frames. Raises ProtocolError for anything malformed.

    A GET or AUTO hit's tokens come back as ``array('I')`` whose length has been checked
    against ``n``; whether they are right for the text is the client's to check (client/core.py).
    """
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(f"a reply has 1 or 2 frames, not {len(frames)}")
    header = unpack_header(frames[0])
    request_id = _int(header, "id", 0, MAX_REQUEST_ID)
    ok = _bool(header, "ok")
    if not ok:
        error = header.get("error")
        if error not in (CLIENT_ERROR, SERVER_ERROR):
            raise ProtocolError("error reply without a CLIENT_ERROR / SERVER_ERROR type")
        message = header.get("message")
        if type(message) is not str:
            raise ProtocolError("error reply without a message")
        if len(frames) != 1:
            raise ProtocolError("error reply with frames")
        return Reply(request_id, False, header)
    tokens = None
    if "placed" in header and type(header["placed"]) is not bool:
        raise ProtocolError("field 'placed' must be a bool")
    if "hit" in header and type(header["hit"]) is not bool:
        raise ProtocolError("field 'hit' must be a bool")
    if "blocks" in header:  # an AUTO reply
        _int(header, "blocks", 0, MAX_PREFIX_BYTES)
        _bool(header, "filling")
        if header.get("hit") is not True and header.get("hit") is not False:
            raise ProtocolError("AUTO reply without a bool 'hit'")
    if header.get("hit") is True:
        if "blocks" in header:
            start = _int(header, "start", 0, MAX_PREFIX_BYTES * 64)
            if _int(header, "cut_byte", 0, MAX_PREFIX_BYTES * 64) <= start:
                raise ProtocolError("AUTO hit whose cut_byte is not after its start")
        else:
            _int(header, "cut", 0, MAX_PREFIX_BYTES * 64)
        n = _int(header, "n", 0, MAX_PREFIX_BYTES * 64)
        if len(frames) != 2 or len(frames[1]) != 4 * n:
            raise ProtocolError("hit reply whose token frame does not hold n tokens")
        tokens = tokens_from_frame(frames[1])
    elif len(frames) != 1:
        raise ProtocolError("unexpected frame in a reply")
    return Reply(request_id, True, header, tokens)


# -- published chain blocks ---------------------------------------------------------------------

MAX_PUBLISHED_BLOCKS = 4096
"""Blocks in one published message (a fill's new blocks: its text's length over the block)."""


@dataclass(frozen=True)
class Blocks:
    """Published chain blocks ``first ..`` of the chains of ``seed``, checked for shape only.

    ``span`` holds the text's bytes from ``start`` (the cut of block ``first - 1``, found by its
    digest ``parent``; None for the first block) to just past the last block; ``ends`` holds
    each block's ``(cut_byte, n)``: its cut in the whole text and how many of ``tokens`` come
    before it. Whether they are right is the subscriber's to check (``AutoPrefixCache._adopt``).
    """

    seed: bytes
    first: int
    parent: bytes | None
    start: int
    digests: list[bytes]
    ends: list[tuple[int, int]]
    span: bytes
    tokens: array


def pack_blocks(
    seed: bytes,
    first: int,
    parent: bytes | None,
    start: int,
    digests: list[bytes],
    cut_bytes: list[int],
    span: bytes,
    token_frames: list[bytes],
) -> list[bytes]:
    """One published message: the seed is the first frame, the subscription topic."""
    counts = [len(frame) // 4 for frame in token_frames]
    header = {
        "m": MAGIC,
        "v": VERSION,
        "first": first,
        "parent": parent,
        "start": start,
        "digests": digests,
        "cuts": cut_bytes,
        "counts": counts,
    }
    return [seed, _pack(header), span, b"".join(token_frames)]


def parse_blocks(frames: list[bytes]) -> Blocks:
    """Validate a published message. Raises ProtocolError for anything malformed."""
    if len(frames) != 4 or len(frames[0]) != KEY_BYTES:
        raise ProtocolError("a published message has 4 frames, the first a 16-byte seed")
    header = unpack_header(frames[1])
    first = _int(header, "first", 0, MAX_PREFIX_BYTES)
    parent = _parent(header, first)
    start = _int(header, "start", 0, MAX_PREFIX_BYTES * 64)
    digests, cuts, counts = _digests(header), header.get("cuts"), header.get("counts")
    if not (
        type(cuts) is list and type(counts) is list and len(digests) == len(cuts) == len(counts)
    ):
        raise ProtocolError("fields 'cuts' and 'counts' must be lists, one item per digest")
    if any(type(x) is not int or x < 0 for x in cuts + counts):
        raise ProtocolError("fields 'cuts' and 'counts' must hold ints >= 0")
    tokens = tokens_from_frame(frames[3])
    ends, n = [], 0
    for cut, count in zip(cuts, counts, strict=True):
        n += count
        ends.append((cut, n))
    if n != len(tokens):
        raise ProtocolError("token frame does not hold the blocks' counts")
    return Blocks(frames[0], first, parent, start, digests, ends, frames[2], tokens)
