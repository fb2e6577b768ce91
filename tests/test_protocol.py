"""flashtoken.wire: every field checked, every limit enforced, on both sides."""

from __future__ import annotations

import os
import stat
from array import array
from pathlib import Path

import msgpack
import pytest

from flashtoken.errors import ProtocolError
from flashtoken.wire import (
    ALGORITHM,
    MAGIC,
    MAX_HEADER_BYTES,
    VERSION,
    GetRequest,
    default_address,
    make_key,
    pack_error,
    pack_get,
    pack_hit,
    pack_miss,
    pack_simple,
    parse_reply,
    parse_request,
    request_id_of,
    runtime_dir,
    tokens_from_frame,
    tokens_to_frame,
)

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
    }
    fields.update(override)
    return {k: v for k, v in fields.items() if v is not _DROP}


_DROP = object()


def _pack(h: dict) -> bytes:
    return msgpack.packb(h, use_bin_type=True)


def test_get_round_trip() -> None:
    frames = pack_get(42, KEY, "o200k_base", EID, ("<|endoftext|>",), False, "héllo".encode())
    request = parse_request(frames)
    assert request == GetRequest(
        "GET",
        42,
        ns=KEY,
        enc="o200k_base",
        eid=EID,
        allowed=("<|endoftext|>",),
        fill=False,
        prefix="héllo".encode(),
    )


@pytest.mark.parametrize("op", ["STATS", "PING"])
def test_simple_ops(op: str) -> None:
    request = parse_request(pack_simple(op, 2**64 - 1))
    assert (request.op, request.id) == (op, 2**64 - 1)


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
    "oversized header": [_pack({"m": MAGIC, "v": 1, "pad": b"x" * MAX_HEADER_BYTES}), b"x"],
    "GET without prefix": [_pack(_get_header())],
    "GET with 3 frames": [_pack(_get_header()), b"x", b"y"],
    "100 frames": [_pack(_get_header())] + [b"x"] * 99,
    "PING with a frame": [_pack({"m": MAGIC, "v": 1, "op": "PING", "id": 1}), b"x"],
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


def test_reply_round_trips() -> None:
    hit = parse_reply(pack_hit(5, 3, tokens_to_frame(array("I", [1, 2]))))
    assert (hit.id, hit.ok, hit.fields["cut"], list(hit.tokens)) == (5, True, 3, [1, 2])
    miss = parse_reply(pack_miss(6, True))
    assert (miss.ok, miss.tokens, miss.fields["filling"]) == (True, None, True)
    error = parse_reply(pack_error(7, "CLIENT_ERROR", "bad"))
    assert (error.ok, error.error, error.fields["message"]) == (False, "CLIENT_ERROR", "bad")


BAD_REPLIES = {
    "n larger than the frame": [
        _pack({"m": MAGIC, "v": 1, "id": 1, "ok": True, "hit": True, "cut": 0, "n": 3}),
        b"\x00" * 8,
    ],
    "n smaller than the frame": [
        _pack({"m": MAGIC, "v": 1, "id": 1, "ok": True, "hit": True, "cut": 0, "n": 1}),
        b"\x00" * 8,
    ],
    "hit without frame": [
        _pack({"m": MAGIC, "v": 1, "id": 1, "ok": True, "hit": True, "cut": 0, "n": 0})
    ],
    "negative cut": [
        _pack({"m": MAGIC, "v": 1, "id": 1, "ok": True, "hit": True, "cut": -1, "n": 0}),
        b"",
    ],
    "cut as str": [
        _pack({"m": MAGIC, "v": 1, "id": 1, "ok": True, "hit": True, "cut": "0", "n": 0}),
        b"",
    ],
    "ok missing": [_pack({"m": MAGIC, "v": 1, "id": 1})],
    "unknown error type": [
        _pack({"m": MAGIC, "v": 1, "id": 1, "ok": False, "error": "OOPS", "message": ""})
    ],
    "miss with a frame": [_pack({"m": MAGIC, "v": 1, "id": 1, "ok": True, "hit": False}), b"x"],
    "wrong magic": [_pack({"m": b"ZZ", "v": 1, "id": 1, "ok": True})],
    "three frames": [b"a", b"b", b"c"],
}


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
