"""flashtoken.wire: every message round-trips; every field checked, every limit enforced."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from array import array
from pathlib import Path

import msgpack
import pytest

from flashtoken.errors import DaemonUnavailable, ProtocolError
from flashtoken.wire import (
    ALGORITHM,
    MAGIC,
    MAX_HEADER_BYTES,
    VERSION,
    AutoHit,
    AutoMiss,
    AutoRequest,
    Blocks,
    ErrorReply,
    GetHit,
    GetMiss,
    GetRequest,
    PingRequest,
    Pong,
    Request,
    StatsReply,
    StatsRequest,
    TellRequest,
    TouchRequest,
    Unplaced,
    default_address,
    make_key,
    parse_blocks,
    parse_reply,
    parse_request,
    request_id_of,
    runtime_dir,
    tokens_from_frame,
    tokens_to_frame,
)
from flashtoken.wire.admin import ping, request_stats
from flashtoken.wire.replies import Reply
from flashtoken.wire.requests import REQUESTS
from flashtoken.wire.schema import Message
from tests.daemon_fixtures import DaemonProcess

KEY = bytes(range(16))
EID = bytes(32)


def _get_header(**override: object) -> dict:
    fields = {
        "m": MAGIC,
        "v": VERSION,
        "a": ALGORITHM,
        "op": "GET",
        "id": 1,
        "ns": KEY,
        "enc": "cl100k_base",
        "eid": EID,
        "allowed": [],
        "fill": True,
        "wait_ms": 0,
    }
    fields.update(override)
    return {k: v for k, v in fields.items() if v is not _DROP}


_DROP = object()


def _header(**fields: object) -> dict:
    return {"m": MAGIC, "v": VERSION, "a": ALGORITHM, **fields}


def _pack(h: dict) -> bytes:
    return msgpack.packb(h, use_bin_type=True)


BAD_FIELDS = {
    "wrong magic": {"m": b"XX"},
    "magic as str": {"m": "FT"},
    "no magic": {"m": _DROP},
    "future version": {"v": VERSION + 1},
    "version as str": {"v": "1"},
    "unknown op": {"op": "SET"},
    "op as bytes": {"op": b"GET"},
    "op as list": {"op": ["GET"]},
    "negative id": {"id": -1},
    "id as bool": {"id": True},
    "id as float": {"id": 1.0},
    "no id": {"id": _DROP},
    "short ns": {"ns": KEY[:15]},
    "long ns": {"ns": KEY + b"x"},
    "ns as str": {"ns": "k" * 16},
    "enc empty": {"enc": ""},
    "enc too long": {"enc": "x" * 65},
    "enc as bytes": {"enc": b"cl100k_base"},
    "short eid": {"eid": EID[:31]},
    "allowed not a list": {"allowed": "<|endoftext|>"},
    "allowed of ints": {"allowed": [1]},
    "allowed unsorted": {"allowed": ["b", "a"]},
    "allowed duplicated": {"allowed": ["a", "a"]},
    "allowed too many": {"allowed": [f"{i:04}" for i in range(257)]},
    "allowed nested": {"allowed": [["a"]]},
    "fill as int": {"fill": 1},
    "no fill": {"fill": _DROP},
    "nested map": {"enc": {"a": {"b": {}}}},
}


@pytest.mark.parametrize("override", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_bad_fields_are_refused(override: dict) -> None:
    with pytest.raises(ProtocolError):
        parse_request([_pack(_get_header(**override)), b"prefix"])


def _nested(depth: int) -> bytes:
    # A header that is an array nested `depth` deep: fixarray(1) bytes, then nil.
    return b"\x91" * depth + b"\xc0"


HOSTILE_FRAMES = {
    "no frames": [],
    "empty header": [b""],
    "not msgpack": [b"\xc1\xc1\xc1", b"x"],
    "truncated": [_pack(_get_header())[:-3], b"x"],
    "trailing bytes": [_pack(_get_header()) + b"\x00", b"x"],
    "header not a map": [_pack([1, 2, 3]), b"x"],
    "deep nesting": [_nested(100_000), b"x"],
    "bin32 declaring 4 GiB": [b"\xc6\xff\xff\xff\xff" + b"x" * 10, b"x"],
    "array32 declaring 4G items": [b"\xdd\xff\xff\xff\xff", b"x"],
    "map32 declaring 4G pairs": [b"\xdf\xff\xff\xff\xff", b"x"],
    "str32 declaring 4 GiB": [b"\xdb\xff\xff\xff\xff", b"x"],
    "ext type": [b"\xd4\x01\x00", b"x"],
    "non-str map key": [_pack({1: 2}), b"x"],
    "oversized header": [_pack(_get_header(pad=b"x" * MAX_HEADER_BYTES)), b"x"],
    "GET without prefix": [_pack(_get_header())],
    "GET with 3 frames": [_pack(_get_header()), b"x", b"y"],
    "100 frames": [_pack(_get_header())] + [b"x"] * 99,
    "PING with a frame": [_pack(_header(op="PING", id=1)), b"x"],
    "TOUCH with half a key": [_pack(_header(op="TOUCH", id=0)), b"k" * 24],
    "TOUCH of 1025 keys": [_pack(_header(op="TOUCH", id=0)), b"k" * 16 * 1025],
    "invalid UTF-8 prefix": [_pack(_get_header()), b"\xff\xfe"],
    "surrogate in prefix": [_pack(_get_header()), b"\xed\xa0\x80"],
    "overlong UTF-8": [_pack(_get_header()), b"\xc0\xaf"],
}


@pytest.mark.parametrize("frames", HOSTILE_FRAMES.values(), ids=HOSTILE_FRAMES.keys())
def test_hostile_frames_are_refused(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        parse_request(frames)
    request_id_of(frames or [b""])  # never raises


def test_prefix_limit() -> None:
    frames = [_pack(_get_header()), b"a" * 1001]
    with pytest.raises(ProtocolError, match="exceeds"):
        parse_request(frames, max_prefix_bytes=1000)
    assert parse_request([frames[0], b"a" * 1000], max_prefix_bytes=1000).prefix == b"a" * 1000


def test_request_id_of_an_invalid_request() -> None:
    assert request_id_of([_pack(_get_header(id=77, key=b"short"))]) == 77
    assert request_id_of([b"garbage"]) == 0


def test_tokens_frame_is_little_endian_uint32() -> None:
    tokens = array("I", [0, 1, 255, 256, 2**32 - 1])
    frame = tokens_to_frame(tokens)
    assert frame[:8] == b"\x00\x00\x00\x00\x01\x00\x00\x00"
    assert tokens_from_frame(frame) == tokens
    with pytest.raises(ProtocolError):
        tokens_from_frame(frame[:-1])


def _hit_header(**override: object) -> dict:
    fields = _header(id=1, op="GET", ok=True, hit=True, cut=0, n=2)
    fields.update(override)
    return {k: v for k, v in fields.items() if v is not _DROP}


TWO_TOKENS = b"\x01\x00\x00\x00\x02\x00\x00\x00"

BAD_REPLIES = {
    "n larger than the frame": [_pack(_hit_header(n=3)), TWO_TOKENS],
    "n smaller than the frame": [_pack(_hit_header(n=1)), TWO_TOKENS],
    "no n": [_pack(_hit_header(n=_DROP)), TWO_TOKENS],
    "hit without frame": [_pack(_hit_header())],
    "negative cut": [_pack(_hit_header(cut=-1)), TWO_TOKENS],
    "cut as str": [_pack(_hit_header(cut="0")), TWO_TOKENS],
    "hit as str": [_pack(_hit_header(hit="yes")), TWO_TOKENS],
    "ok missing": [_pack(_hit_header(ok=_DROP)), TWO_TOKENS],
    "no op": [_pack(_hit_header(op=_DROP)), TWO_TOKENS],
    "op of no reply": [_pack(_hit_header(op="TOUCH")), TWO_TOKENS],
    "an AUTO hit's fields under GET": [
        _pack(_hit_header(cut=_DROP, blocks=1, filling=False, start=0, cut_byte=8)),
        TWO_TOKENS,
    ],
    "AUTO hit ending at its start": [
        _pack(_hit_header(op="AUTO", cut=_DROP, blocks=1, filling=False, start=8, cut_byte=8)),
        TWO_TOKENS,
    ],
    "unknown error type": [_pack(_header(id=1, ok=False, error="OOPS", message=""))],
    "error with a frame": [_pack(_header(id=1, ok=False, error="CLIENT_ERROR", message="")), b"x"],
    "error message not a str": [_pack(_header(id=1, ok=False, error="CLIENT_ERROR", message=5))],
    "miss with a frame": [_pack(_hit_header(hit=False, filling=True, cut=_DROP, n=_DROP)), b"x"],
    "TELL reply placed": [_pack(_header(id=1, op="TELL", ok=True, placed=True))],
    "STATS without settings": [_pack(_header(id=1, op="STATS", ok=True, stats={}))],
    "wrong magic": [_pack(_hit_header(m=b"ZZ")), TWO_TOKENS],
    "old version": [_pack(_hit_header(v=1)), TWO_TOKENS],
    "three frames": [_pack(_hit_header()), TWO_TOKENS, b"c"],
}


def test_the_bad_replies_differ_from_a_good_one_in_their_defect_only() -> None:
    assert parse_reply([_pack(_hit_header()), TWO_TOKENS]) == GetHit(1, 0, array("I", [1, 2]))


@pytest.mark.parametrize("frames", BAD_REPLIES.values(), ids=BAD_REPLIES.keys())
def test_bad_replies_are_refused(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        parse_reply(frames)


def test_keys_separate_every_field() -> None:
    base = make_key(b"", EID, (), b"prefix")
    assert len(base) == 16 and base == make_key(b"", EID, (), b"prefix")
    others = [
        make_key(b"tenant", EID, (), b"prefix"),
        make_key(b"", bytes([1]) * 32, (), b"prefix"),
        make_key(b"", EID, ("<|endoftext|>",), b"prefix"),
        make_key(b"", EID, (), b"prefix "),
        # Length prefixes: moving bytes from one field to the next changes the key.
        make_key(b"p", EID, (), b"refix"),
        make_key(b"", EID, ("a", "b"), b""),
        make_key(b"", EID, ("a\0b",), b""),
    ]
    assert len({base, *others}) == len(others) + 1


def test_runtime_dir_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = runtime_dir()
    assert path == str(tmp_path / "flashtoken")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert default_address() == f"ipc://{tmp_path}/flashtoken/daemon.sock"


def test_runtime_dir_refuses_an_open_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "flashtoken").mkdir(mode=0o700)
    (tmp_path / "flashtoken").chmod(0o777)
    with pytest.raises(PermissionError, match="chmod 700"):
        runtime_dir()


def test_runtime_dir_refuses_a_symlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "flashtoken").symlink_to(target)
    with pytest.raises(PermissionError, match="symlink"):
        runtime_dir()


def test_runtime_dir_without_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert runtime_dir() == str(tmp_path / f"flashtoken-{os.getuid()}")


def test_a_peer_of_another_flashtoken_version_is_refused() -> None:
    """The version handshake: every header carries the code's version, and a client and a
    daemon of different versions refuse each other's messages (rolling upgrades)."""
    with pytest.raises(ProtocolError, match="different versions"):
        parse_request([_pack(_get_header(a="0.0.1")), b"x"])
    with pytest.raises(ProtocolError, match="different versions"):
        parse_reply([_pack({"m": MAGIC, "v": VERSION, "a": "9.9", "id": 1, "ok": True})])


# -- every message, declared once: packed and parsed back --------------------------------------

TOKENS = array("I", [9, 8, 7])
SEED = bytes(range(16, 32))
EVERY_MESSAGE: list[Message] = [
    GetRequest(42, KEY, "o200k_base", EID, ("<|endoftext|>",), False, "héllo".encode()),
    AutoRequest(2**64 - 1, SEED, "cl100k_base", EID, (), True, 64, 2, b"a" * 200),
    TellRequest(3, SEED, "cl100k_base", EID, (), 64, 0, None, 0, [KEY, SEED], b"b" * 128),
    TellRequest(4, SEED, "cl100k_base", EID, ("a", "b"), 64, 2, KEY, 100, [SEED], b"c" * 92),
    TouchRequest(0, KEY + SEED),
    TouchRequest(0, b""),
    StatsRequest(5),
    PingRequest(6),
    GetHit(7, 12, TOKENS),
    GetHit(8, 0, array("I")),
    GetMiss(9, True),
    AutoHit(10, 3, False, 0, 70, TOKENS),
    AutoMiss(11, 0, True),
    Unplaced(12),
    StatsReply(13, stats={"get_hits": 1, "encodings_loaded": ["cl100k_base"]}, settings={}),
    Pong(14, pid=1234, version=ALGORITHM),
    ErrorReply(15, "CLIENT_ERROR", "field 'enc' must be a str"),
    ErrorReply(0, "SERVER_ERROR", ""),
    Blocks(SEED, 0, None, 0, [KEY], [3], [3], b"abcd", TOKENS),
    Blocks(SEED, 5, KEY, 320, [KEY, SEED], [400, 460], [1, 2], b"x" * 200, TOKENS),
]


def _parse(message: Message, frames: list) -> Message:
    if isinstance(message, Blocks):
        return parse_blocks(frames)
    if isinstance(message, Reply):
        return parse_reply(frames)
    return parse_request(frames)


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: Message) -> None:
    frames = message.frames()
    assert all(isinstance(frame, bytes) for frame in frames)
    assert _parse(message, frames) == message


def _classes(base: type) -> set[type]:
    out = set()
    for sub in base.__subclasses__():
        out |= {sub} | _classes(sub)
    return out


def test_every_message_class_is_covered() -> None:
    declared = _classes(Message) - {Reply, Request}
    assert declared == {type(m) for m in EVERY_MESSAGE}
    assert set(REQUESTS.values()) <= declared


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
def test_every_header_field_is_checked(message: Message) -> None:
    """Each header field of each message, replaced by a value no field takes (a float) or
    removed, makes the message refused as a ProtocolError; so does a frame too many or short."""
    frames = message.frames()
    at = 1 if isinstance(message, Blocks) else 0  # a published message's topic comes first
    head = msgpack.unpackb(frames[at])
    for name in set(head) - {"m", "v", "a"}:
        for value in (1.5, _DROP):
            changed = {k: v for k, v in {**head, name: value}.items() if v is not _DROP}
            if value is _DROP and (changed.get("op") == "TOUCH" or name == "wait_ms"):
                continue  # TOUCH has no fields; an absent wait_ms is 0 (checked below)
            if name == "parent":
                continue  # a missing parent is nil (checked below)
            broken = [*frames[:at], _pack(changed), *frames[at + 1 :]]
            with pytest.raises(ProtocolError):
                _parse(message, broken)
    with pytest.raises(ProtocolError):
        _parse(message, [*frames, b""])
    if len(frames) > 1 + at:
        with pytest.raises(ProtocolError):
            _parse(message, frames[:-1])


def test_a_parent_is_nil_exactly_for_the_first_block() -> None:
    first, later = EVERY_MESSAGE[2], EVERY_MESSAGE[3]
    assert isinstance(first, TellRequest) and isinstance(later, TellRequest)
    for message, parent in ((first, KEY), (later, None)):
        head = msgpack.unpackb(message.frames()[0])
        with pytest.raises(ProtocolError, match="parent"):
            parse_request([_pack({**head, "parent": parent}), message.frames()[1]])


def test_the_get_request_is_the_documented_header() -> None:
    """docs/PROTOCOL.md's GET, byte for byte: the wire did not change with the package."""
    frames = GetRequest(1, KEY, "cl100k_base", EID, (), True, b"prefix").frames()
    header = {k: v for k, v in _get_header().items() if k != "a"}
    assert frames == [_pack({**header, "a": ALGORITHM}), b"prefix"]  # "a" last, as ever


def test_replies_name_their_op_and_errors_carry_none() -> None:
    assert msgpack.unpackb(GetMiss(1, False).frames()[0])["op"] == "GET"
    assert msgpack.unpackb(AutoMiss(1, 0, False).frames()[0])["op"] == "AUTO"
    assert "op" not in msgpack.unpackb(ErrorReply(1, "CLIENT_ERROR", "x").frames()[0])


def test_an_error_message_is_cut_to_fit() -> None:
    reply = parse_reply(ErrorReply(1, "SERVER_ERROR", "x" * 5000).frames())
    assert isinstance(reply, ErrorReply) and reply.message == "x" * 1024


def test_tell_span_must_reach_the_last_block() -> None:
    tell = EVERY_MESSAGE[2]
    assert isinstance(tell, TellRequest)
    head, span = tell.frames()
    for bad in (span[:-1], span + b"abcd"):
        with pytest.raises(ProtocolError, match="span"):
            parse_request([head, bad])


def test_auto_skip_within_the_text() -> None:
    frames = AutoRequest(1, SEED, "cl100k_base", EID, (), True, 64, 4, b"a" * 255).frames()
    with pytest.raises(ProtocolError, match="skip"):
        parse_request(frames)


def test_published_counts_must_add_up_to_the_tokens() -> None:
    blocks = Blocks(SEED, 0, None, 0, [KEY], [3], [2], b"abcd", TOKENS)
    with pytest.raises(ProtocolError, match="counts"):
        parse_blocks(blocks.frames())
    assert parse_blocks(EVERY_MESSAGE[-1].frames()).ends == [(400, 1), (460, 3)]


def test_the_stats_command_needs_no_client(shared_daemon: DaemonProcess) -> None:
    """``flashtoken-daemon stats`` asks through the wire's admin request: it imports neither
    the client package nor its settings."""
    code = (
        "import sys\n"
        "from flashtoken.daemon.__main__ import main\n"
        f"status = main(['stats', '--bind', {shared_daemon.address!r}, '--json'])\n"
        "assert status == 0, status\n"
        "print([m for m in sys.modules if m.startswith('flashtoken.client')])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[0])["stats"]["pid"] == shared_daemon.pid
    assert lines[-1] == "[]"


def test_admin_requests_of_a_real_daemon(shared_daemon: DaemonProcess) -> None:
    pong = ping(shared_daemon.address, timeout_ms=5000)
    assert (pong.pid, pong.version) == (shared_daemon.pid, ALGORITHM)
    reply = request_stats(shared_daemon.address, timeout_ms=5000)
    assert reply["stats"]["pid"] == shared_daemon.pid and "max_bytes" in reply["settings"]


def test_admin_requests_without_a_daemon(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnavailable, match="flashtoken-daemon serve"):
        request_stats(f"ipc://{tmp_path}/none.sock", timeout_ms=100)


def test_a_get_without_wait_ms_waits_for_nothing() -> None:
    """wait_ms (version 3) may be absent: such a GET is answered at once, as before it."""
    frames = GetRequest(1, KEY, "cl100k_base", EID, (), True, b"prefix", 7).frames()
    head = msgpack.unpackb(frames[0])
    assert parse_request(frames).wait_ms == 7
    del head["wait_ms"]
    assert parse_request([_pack(head), frames[1]]).wait_ms == 0
    with pytest.raises(ProtocolError):
        parse_request([_pack({**head, "wait_ms": 60_001}), frames[1]])
