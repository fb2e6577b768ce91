"""The daemon's loop never waits on work proportional to a request, and stops when asked (issue 11).

Behaviour, never timing: a fill stuck inside tiktoken (an encoding whose loading never ends,
as a download without a timeout does) is abandoned and counted while the loop goes on serving;
walks and chain fills are bounded in blocks; tiny blocks are refused with a message; SIGTERM
stops a daemon whose fill threads are busy.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from flashtoken.client import Client
from flashtoken.daemon.chains import MAX_FILL_BLOCKS

from flashtoken import get_encoding
from flashtoken.encodings import encoding_id
from flashtoken.wire import (
    MIN_BLOCK_BYTES,
    AutoRequest,
    GetRequest,
    make_chain_seed,
    parse_reply,
)
from tests.daemon_fixtures import DaemonProcess, request, wait_until

# A tiktoken plugin whose encoding never finishes loading: its constructor waits forever, inside
# tiktoken's registry lock, as tiktoken's download does on a network that never answers.
HANG_PLUGIN = """
import threading
ENCODING_CONSTRUCTORS = {"hang_base": lambda: threading.Event().wait()}
"""


def _hanging_env(directory: Path) -> dict[str, str]:
    import os

    plugin = directory / "plugin" / "tiktoken_ext"
    plugin.mkdir(parents=True)
    (plugin / "hang_ext.py").write_text(HANG_PLUGIN)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(directory / "plugin"), env.get("PYTHONPATH", "")])
    env["FLASHTOKEN_DAEMON_FILL_BUDGET_S"] = "1"
    return env


def _get(daemon: DaemonProcess, prefix: bytes, enc: str, eid: bytes, rid: int) -> dict:
    # The key is the client's today; the daemon derives its own from the bytes (issue 11).
    frames = GetRequest(rid, b"k" * 16, enc, eid, (), True, prefix).frames()
    return vars(parse_reply(request(daemon.address, frames, timeout_ms=10_000)))


def test_a_fill_that_never_ends_is_abandoned_and_the_loop_serves_on(
    start_daemon: Callable[..., DaemonProcess], daemon_dir: Path
) -> None:
    daemon = start_daemon(env=_hanging_env(daemon_dir))
    # The fill thread is now stuck in tiktoken's registry lock, for good.
    assert _get(daemon, b"never loads", "hang_base", bytes(32), 1)["filling"] is True
    wait_until(
        lambda: daemon.stats()["fills_abandoned"] == 1, 60, "the stuck fill was never abandoned"
    )
    # Asked again: remembered as failed (a SERVER_ERROR naming the budget), not retried.
    again = parse_reply(
        request(
            daemon.address,
            GetRequest(2, b"k" * 16, "hang_base", bytes(32), (), True, b"never loads").frames(),
            timeout_ms=10_000,
        )
    )
    assert again.error == "SERVER_ERROR" and "budget" in again.message
    # The loop and the pool serve on: a fill of a loaded encoding still lands, and hits.
    enc = get_encoding("cl100k_base")
    with Client(daemon.address, timeout_ms=5000, min_uses=1) as client:
        prefix = "served while a fill hangs " * 40
        for suffix in ("a", "b"):
            assert client.encode_ordinary(suffix, prefix=prefix) == enc.encode_ordinary(
                prefix + suffix
            )
        wait_until(lambda: daemon.stats()["curr_items"] >= 1, 60, "no fill after the stuck one")
    stats = daemon.stats()
    assert stats["fills_abandoned"] == 1 and stats["fills"] >= 1
    # Asked to stop, it stops by itself (no SIGKILL) although a fill thread is still stuck.
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    try:
        assert daemon.proc.wait(60) == 0
    except subprocess.TimeoutExpired:
        pytest.fail("the daemon did not stop on SIGTERM with a fill running")


def _auto(daemon: DaemonProcess, text: bytes, block: int, rid: int, skip: int = 0) -> dict:
    enc = get_encoding("cl100k_base")
    eid = encoding_id(enc)
    seed = make_chain_seed(b"bounds", eid, (), block)
    frames = AutoRequest(rid, seed, enc.name, eid, (), True, block, skip, text).frames()
    reply = parse_reply(request(daemon.address, frames, timeout_ms=10_000))
    return {**vars(reply), "ok": reply.ok}


def test_walks_and_chain_fills_are_bounded_in_blocks(daemon: DaemonProcess) -> None:
    block = MIN_BLOCK_BYTES
    text = ("one two three four five six seven eight nine ten " * 12000).encode()  # ~600 KB
    assert len(text) // block > 3 * MAX_FILL_BLOCKS
    assert _auto(daemon, text, block, 1)["blocks"] == 0
    wait_until(lambda: daemon.stats()["total_blocks"] > 0, 60, "no chain fill")
    wait_until(lambda: daemon.stats()["fills_pending"] == 0, 60, "fill never ended")
    # One fill records at most MAX_FILL_BLOCKS blocks: the loop stores them in one go.
    assert 0 < daemon.stats()["total_blocks"] <= MAX_FILL_BLOCKS
    # Each request extends the chain by at most one more fill.
    found = []
    for rid in range(2, 8):
        found.append(_auto(daemon, text, block, rid)["blocks"])
        wait_until(lambda: daemon.stats()["fills_pending"] == 0, 60, "fill never ended")
        assert daemon.stats()["total_blocks"] <= (rid + 1) * MAX_FILL_BLOCKS
    assert found == sorted(found) and found[-1] > MAX_FILL_BLOCKS
    # (A walk from scratch stops after MAX_WALK_BLOCKS: tests/test_store.py.)
    assert daemon.stats()["protocol_errors"] == 0


def test_tiny_blocks_are_refused_with_a_message(daemon: DaemonProcess) -> None:
    reply = _auto(daemon, b"x" * 4096, 16, 1)
    assert reply["ok"] is False and reply["error"] == "CLIENT_ERROR"
    assert "block" in reply["message"] and str(MIN_BLOCK_BYTES) in reply["message"]
    with pytest.raises(ValueError, match=f"auto_block_bytes >= {MIN_BLOCK_BYTES}"):
        Client(daemon.address, auto_block_bytes=16)
