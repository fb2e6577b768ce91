"""Automatic prefix reuse through a real daemon: exact for every text, whatever the daemon does.

``Client.encode_ordinary(text)`` / ``encode(text, ...)`` with no ``prefix``: the client's
AutoPrefixCache (L1), then one AUTO round trip for the daemon's longest chain of blocks, then a
local encode of the rest. ``auto_l1_bytes=0`` keeps the L1 empty and ``auto_local_bytes=0``
never skips the round trip, so every call exercises the daemon path (or its fallback).
Following published chains and TELL are in tests/test_follow.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from array import array
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import zmq
from flashtoken.client import AsyncClient, Client
from hypothesis import given, settings
from hypothesis import strategies as st

from flashtoken import get_encoding
from flashtoken.encodings import encoding_id
from flashtoken.wire import (
    ALGORITHM,
    MAGIC,
    VERSION,
    make_chain_seed,
    parse_reply,
    parse_request,
    tokens_to_frame,
)
from tests.corpus import CORPUS
from tests.daemon_fixtures import DaemonProcess, header, request, wait_until
from tests.strategies import texts

pytestmark = pytest.mark.timeout(90)

ENCODINGS = ["cl100k_base", "o200k_base"]
# ms: a real daemon's answer is awaited this long; it comes in ms, only a hang waits it out.
# Not less: on a loaded machine a reply can take longer than 250 ms, and a test counting
# hits then failed for want of a few ms (a timing assertion in disguise).
TIMEOUT_MS = 5000
BLOCK = 64  # small blocks (the least a daemon takes): many block boundaries in short texts
POLICIES = [(frozenset(), "all"), ("all", ()), (frozenset(), ()), ({"<|endoftext|>"}, "all")]


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "tokens", fn()
    except ValueError as exc:
        return "error", str(exc)


def settle(daemon: DaemonProcess) -> None:
    wait_until(lambda: daemon.stats()["fills_pending"] == 0, 30, "fills never finished")


def client(daemon: DaemonProcess, name: str = "cl100k_base", **options: Any) -> Client:
    options = {
        "timeout_ms": TIMEOUT_MS,
        "auto_l1_bytes": 0,
        "auto_block_bytes": BLOCK,
        "auto_local_bytes": 0,  # always ask: these tests are about the AUTO round trip
        "min_uses": 1,  # and declared prefixes are filled from their first request
        **options,
    }
    return Client(daemon.address, name, **options)


def check(c: Client, enc: Any, text: str, policy: tuple[Any, Any] | None = None) -> None:
    if policy is None:
        assert c.encode_ordinary(text) == enc.encode_ordinary(text)
        return
    kwargs = dict(allowed_special=policy[0], disallowed_special=policy[1])
    assert outcome(lambda: c.encode(text, **kwargs)) == outcome(lambda: enc.encode(text, **kwargs))


@pytest.mark.parametrize("name", ENCODINGS)
def test_texts_sharing_prefixes_through_the_daemon(shared_daemon: DaemonProcess, name: str) -> None:
    enc = get_encoding(name)
    writer, reader = client(shared_daemon, name), client(shared_daemon, name)

    @settings(max_examples=60)
    @given(pieces=st.lists(texts, min_size=1, max_size=5), data=st.data())
    def run(pieces: list[str], data: st.DataObject) -> None:
        seen: list[str] = []
        policies = []
        for piece in pieces:
            base = data.draw(st.sampled_from(seen)) if seen else ""
            # Share all, part (inside a block, a few bytes) or none of an earlier text.
            text = base[: data.draw(st.integers(0, len(base)))] + piece * 3
            seen.append(text)
            policies.append(data.draw(st.sampled_from([None, *POLICIES])))
            check(writer, enc, text, policies[-1])  # mostly misses: local encode + fill
        settle(shared_daemon)
        # The daemon's chains, confirmed and checked:
        for text, policy in zip(seen, policies, strict=True):
            check(reader, enc, text, policy)

    try:
        run()
    finally:
        writer.close()
        reader.close()
    assert reader.stats()["rejected_hits"] == writer.stats()["rejected_hits"] == 0


def _adversarial_texts(rng: random.Random) -> list[str]:
    """Long shared histories whose continuations diverge inside a block, a few bytes in, or
    rewrite their tail; every corpus trap placed at and around block boundaries."""
    history = "".join(
        f"<|im_start|>user\nQuestion {i}: {rng.choice(CORPUS)}<|im_end|>\n" for i in range(12)
    )
    out = []
    for trap in CORPUS[::3]:
        for shift in (-3, -1, 0, 1, 2, 5):
            cut = max(0, (len(history.encode()) // BLOCK - 2) * BLOCK + shift)
            head = history.encode()[:cut].decode("utf-8", "ignore")
            out.append(head + trap)  # diverges inside a block
            out.append(head + trap + "<|im_start|>assistant\n")  # generation prompt
            out.append(head + trap + "<|im_start|>assistant\nOK.<|im_end|>\n")  # rewritten
        out.append(trap[:2] + history)  # shares a few bytes only
    return out


@pytest.mark.parametrize("name", ENCODINGS)
def test_adversarial_divergence_through_the_daemon(shared_daemon: DaemonProcess, name: str) -> None:
    enc = get_encoding(name)
    cases = _adversarial_texts(random.Random(11))
    with client(shared_daemon, name) as writer, client(shared_daemon, name) as reader:
        for text in cases:
            check(writer, enc, text)
        settle(shared_daemon)
        for i, text in enumerate(cases):
            check(reader, enc, text, POLICIES[i % len(POLICIES)] if i % 2 else None)
            check(reader, enc, text)
        stats = reader.stats()
    assert stats["l2_hits"] > len(cases) // 2
    assert stats["rejected_hits"] == stats["errors"] == stats["timeouts"] == 0


def _chat(turns: int, seed: int) -> list[str]:
    """Requests of a growing chat whose template renders past assistant turns without the
    generation prompt's ``<think>`` line: each request's tail is rewritten by the next."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "中文", "don't", "12345", "  ", "\n", "é", "<|endoftext|>", "x"]
    history, out = "<|im_start|>system\nBe exact.<|im_end|>\n", []
    for i in range(turns):
        history += f"<|im_start|>user\nTurn {i}: {' '.join(rng.choices(words, k=12))}<|im_end|>\n"
        out.append(history + "<|im_start|>assistant\n<think>\n")
        history += f"<|im_start|>assistant\n{' '.join(rng.choices(words, k=40))}<|im_end|>\n"
    return out


def test_chat_across_four_workers_with_a_rewritten_prompt(shared_daemon: DaemonProcess) -> None:
    enc = get_encoding("cl100k_base")
    rng = random.Random(3)
    # A real L1 this time (small, to see evictions): the production path.
    workers = [
        client(shared_daemon, auto_l1_bytes=16 * 1024, auto_block_bytes=64) for _ in range(4)
    ]
    try:
        for i, text in enumerate(_chat(40, 5)):
            worker = rng.choice(workers)
            if i % 3 == 2:
                check(worker, enc, text, ("all", ()))
            else:
                check(worker, enc, text)
            assert worker.count_ordinary(text) == len(enc.encode_ordinary(text))
            assert worker.encode_ordinary_array(text).tolist() == enc.encode_ordinary(text)
        stats = [w.stats() for w in workers]
    finally:
        for w in workers:
            w.close()
    assert sum(s["l2_hits"] for s in stats) > 10
    assert sum(s["rejected_hits"] + s["errors"] for s in stats) == 0


def test_forced_collisions_never_hand_out_another_texts_tokens(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    daemon = start_daemon("--debug-key-bytes", "1", encodings="cl100k_base,o200k_base")
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", " ", "\n", "1", "'s"]
    texts_ = [
        f"tenant {i % 5}: " + "".join(rng.choice(words) for _ in range(rng.randint(20, 90)))
        for i in range(150)
    ]
    clients = {
        (name, ns): client(daemon, name, namespace=ns) for name in ENCODINGS for ns in (b"a", b"b")
    }
    try:
        for _ in range(2):
            for i, text in enumerate(texts_):
                for (name, _ns), c in clients.items():
                    check(c, get_encoding(name), text, POLICIES[i % 4] if i % 3 == 0 else None)
            settle(daemon)
        stats = [c.stats() for c in clients.values()]
    finally:
        for c in clients.values():
            c.close()
    # The daemon's own confirmation (bytes, parent, encoding, policy) catches every collision:
    # no client ever had to reject a hit.
    assert daemon.stats()["collisions_detected"] > 0
    assert sum(s["l2_hits"] for s in stats) > 0
    assert sum(s["rejected_hits"] for s in stats) == 0


def test_daemon_killed_mid_run_stays_exact_then_recovers(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    daemon = start_daemon()
    enc = get_encoding("cl100k_base")
    chat = _chat(45, 9)
    with client(daemon, timeout_ms=20, breaker_cooldown_ms=50) as c:
        for text in chat[:15]:
            check(c, enc, text)
        daemon.kill9()
        for text in chat[15:30]:
            check(c, enc, text)
        assert c.stats()["breaker"] in ("open", "half-open")
        before = c.stats()["l2_hits"]
        start_daemon()  # the same address: the client reconnects by itself
        for text in chat[30:]:
            check(c, enc, text)

        def served() -> bool:
            check(c, enc, chat[-1])
            return c.stats()["l2_hits"] > before

        wait_until(served, 10, "the client never used the restarted daemon")


def test_declared_prefixes_and_chains_share_one_budget(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    daemon = start_daemon("--max-bytes", "48KiB")
    enc = get_encoding("cl100k_base")
    both_held = 0  # the turns after which blocks and a declared prefix were held together
    with client(daemon) as c:
        for i, text in enumerate(_chat(30, 2)):
            check(c, enc, text)
            prefix = f"system prompt {i} " * 40
            assert c.encode_ordinary(" hi", prefix=prefix) == enc.encode_ordinary(prefix + " hi")
            settle(daemon)
            stats = daemon.stats()
            assert stats["bytes"] <= stats["limit_maxbytes"] == 48 * 1024
            both_held += stats["blocks"] > 0 and stats["curr_items"] > stats["blocks"]
    # Which one the LRU evicts last depends on the order of the daemon's fills (a TELL's blocks
    # and a GET's prefix fill in parallel): any one turn may end with blocks only, not all.
    assert stats["evictions"] > 0 and both_held > 0
    assert stats["evictions"] + stats["curr_items"] == stats["total_items"]


def _auto_frames(text: bytes, **overrides: Any) -> list[bytes]:
    enc = get_encoding("cl100k_base")
    eid = encoding_id(enc)
    fields = dict(
        op="AUTO",
        id=5,
        seed=make_chain_seed(b"", eid, (), 64),
        enc="cl100k_base",
        eid=eid,
        allowed=[],
        fill=False,
        block=64,
        skip=0,
    )
    fields.update(overrides)
    return [header(**{k: v for k, v in fields.items() if v is not None}), text]


def test_invalid_auto_requests_get_client_errors(shared_daemon: DaemonProcess) -> None:
    text = ("hello world " * 40).encode()
    bad = [
        dict(block=8),
        dict(block=True),
        dict(skip=len(text) // 64 + 1),
        dict(skip=-1),
        dict(seed=b"short"),
        dict(seed=None),
        dict(eid=bytes(32)),
        dict(enc="nope"),
        dict(allowed=["<|endoftext|>", "<|endoftext|>"]),
        dict(allowed=["not special"]),
        dict(fill=1),
    ]
    for fields in bad:
        reply = parse_reply(request(shared_daemon.address, _auto_frames(text, **fields)))
        assert (reply.ok, reply.error) == (False, "CLIENT_ERROR"), fields
    frames = _auto_frames(text)
    for broken in ([frames[0]], [frames[0], b"\xff\xfe"], [*frames, b"extra"]):
        reply = parse_reply(request(shared_daemon.address, broken))
        assert reply.error == "CLIENT_ERROR"
    reply = parse_reply(request(shared_daemon.address, _auto_frames(text)))
    assert reply.ok and reply.hit is False and reply.blocks == 0
    assert parse_request(_auto_frames(text)[:1] + [text]).op == "AUTO"


class LyingDaemon:
    """A ROUTER that answers every AUTO with a hit that is wrong in one way or another."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        os.chmod(address[len("ipc://") :], 0o600)  # a private socket, as the daemon's: trusted
        self.stop = threading.Event()
        self.n = 0
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def reply(self, req: Any) -> list[bytes]:
        enc = get_encoding(req.enc)
        text = req.text
        cut = (len(text) // req.block) * req.block
        cut -= 5
        good = enc.encode_ordinary(text[:cut].decode("utf-8", "ignore"))
        other = enc.encode_ordinary("another tenant's text " * 5)
        lies = [
            (0, cut, other),  # another text's tokens
            (0, cut + 1, good),  # a cut that does not match the tokens
            (1, cut, good),  # a start that is not the client's
            (0, len(text) + 8, good),  # beyond the text
            (0, cut, [10**6] * 3),  # ids outside the vocabulary
            (0, cut, good[:-1]),  # one token short
        ]
        start, cut_byte, tokens = lies[self.n % len(lies)]
        self.n += 1
        head = {
            "m": MAGIC,
            "v": VERSION,
            "a": ALGORITHM,
            "id": req.id,
            "op": "AUTO",
            "ok": True,
            "hit": True,
            "blocks": 1 + req.skip,
            "filling": False,
            "start": start,
            "cut_byte": cut_byte,
            "n": len(tokens),
        }
        if self.n % 7 == 0:
            return [b"garbage"]
        return [msgpack.packb(head, use_bin_type=True), tokens_to_frame(array("I", tokens))]

    def run(self) -> None:
        while not self.stop.is_set():
            if self.sock.poll(20):
                identity, *frames = self.sock.recv_multipart()
                req = parse_request(frames)
                if req.op != "TELL":  # a TELL wants no answer
                    self.sock.send_multipart([identity, *self.reply(req)])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def test_a_lying_daemon_never_changes_a_token(daemon_dir: Any) -> None:
    liar = LyingDaemon(f"ipc://{daemon_dir}/liar.sock")
    enc = get_encoding("cl100k_base")
    try:
        with Client(
            f"ipc://{daemon_dir}/liar.sock",
            timeout_ms=TIMEOUT_MS,
            auto_l1_bytes=0,
            auto_block_bytes=BLOCK,
            auto_local_bytes=0,
            breaker_failures=1000,
        ) as c:
            for text in _chat(30, 4):
                check(c, enc, text)
            stats = c.stats()
    finally:
        liar.close()
    assert stats["l2_hits"] == 0 and stats["errors"] == 30 and stats["rejected_hits"] >= 20


def test_async_client_automatic_reuse(shared_daemon: DaemonProcess) -> None:
    enc = get_encoding("o200k_base")
    chat = _chat(20, 8)

    async def main() -> dict[str, Any]:
        async with AsyncClient(
            shared_daemon.address,
            "o200k_base",
            timeout_ms=TIMEOUT_MS,
            auto_l1_bytes=0,
            auto_block_bytes=BLOCK,
        ) as c:
            for text in chat:
                assert await c.encode_ordinary(text) == enc.encode_ordinary(text)
                assert await c.count(text, allowed_special="all") == len(
                    enc.encode(text, allowed_special="all")
                )
            with pytest.raises(ValueError, match="disallowed special token"):
                await c.encode("x <|endoftext|>")
            return c.stats()

    stats = asyncio.run(main())
    assert stats["l2_hits"] > 0 and stats["rejected_hits"] == 0


def test_declared_prefix_is_a_one_block_chain(shared_daemon: DaemonProcess) -> None:
    """A declared prefix of exactly one block's bytes is, in the store, the same thing as the
    first block of a chain: the same bytes, cut and tokens (so one can stand for the other)."""
    from flashtoken import AutoPrefixCache, split_prefix

    enc = get_encoding("cl100k_base")
    text = "You are a helpful assistant; answer in one line. " * 3
    block = len(text[:64].encode())
    cache = AutoPrefixCache(enc, block_bytes=block)
    cache.encode_ordinary(text + "Hello")
    (node,) = [n for n in cache._store.nodes.values() if n.parent is None]
    split = split_prefix(enc, text.encode()[:block].decode())
    assert (node.tokens, node.cut) == (split.head, split.cut)
