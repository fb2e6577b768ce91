"""TELLs of a growing text are checked from the digest state the daemon kept after the last
fill, not by decoding the whole chain back to bytes: the same digests are refused or taken."""

from __future__ import annotations

import random

import pytest
import xxhash
import zmq
from flashtoken.client import Client

from flashtoken import AutoPrefixCache, get_encoding
from flashtoken.encodings import encoding_id
from flashtoken.specials import SpecialPolicy
from flashtoken.wire import AutoHit, AutoRequest, TellRequest, parse_reply
from tests.daemon_fixtures import DaemonProcess, request, wait_until
from tests.test_follow import WORDS

pytestmark = pytest.mark.timeout(120)

BLOCK = 64
SEED = b"s" * 16
TEXT = "The daemon checks every digest a client tells it, block after block. " * 12


def digests(data: bytes, blocks: range) -> list[bytes]:
    state = xxhash.xxh3_128(data[: blocks.start * BLOCK])
    out = []
    for i in blocks:
        state.update(data[i * BLOCK : (i + 1) * BLOCK])
        out.append(state.digest())
    return out


def cut_of(data: bytes, block: int) -> int:
    """Where block ``block``'s chain ends, as every user of chains computes it."""
    cache = AutoPrefixCache("cl100k_base", block_bytes=BLOCK)
    cache.encode_ordinary(data.decode())
    plan = cache.lookup(data.decode(), SpecialPolicy(frozenset(), frozenset()))
    return plan.path[block].cut_byte


def tell(first: int, start: int, told: list[bytes], data: bytes, parent: bytes | None) -> list:
    enc = get_encoding("cl100k_base")
    end = (first + len(told)) * BLOCK
    return TellRequest(
        7, SEED, "cl100k_base", encoding_id(enc), (), BLOCK, first, parent, start, told,
        data[start:end],
    ).frames()  # fmt: skip


def test_a_growing_texts_tells_are_checked_from_the_kept_state(daemon: DaemonProcess) -> None:
    data = TEXT.encode()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(daemon.address)
        sock.send_multipart(tell(0, 0, digests(data, range(2)), data, None))
        wait_until(lambda: daemon.stats()["blocks"] == 2, 10, "the root TELL was not filled")
        parent, start = digests(data, range(2))[1], cut_of(data, 1)
        # A digest that is not that of its bytes, checked from the kept state: refused.
        sock.send_multipart(tell(2, start, [bytes(16)], data, parent))
        wait_until(lambda: daemon.stats()["tells_refused"] == 1, 10, "a lying TELL was taken")
        assert daemon.stats()["blocks"] == 2 and daemon.stats()["tells_from_state"] == 1
        # A TELL that numbers its blocks otherwise than the kept state: not checked from it
        # (the whole chain is decoded, and the digests of block 3 on are not those of 2 on).
        sock.send_multipart(tell(3, start, digests(data, range(2, 3)), data, parent))
        wait_until(lambda: daemon.stats()["tells_refused"] == 2, 10, "a misnumbered TELL was taken")
        assert daemon.stats()["blocks"] == 2 and daemon.stats()["tells_from_state"] == 1
        for first in (2, 3, 4):  # the genuine ones, each from the state its parent's fill kept
            start = cut_of(data, first - 1)
            parent = digests(data, range(first))[-1]
            told = digests(data, range(first, first + 1))
            sock.send_multipart(tell(first, start, told, data, parent))
            wait_until(lambda f=first: daemon.stats()["blocks"] == f + 1, 10, "not filled")
        assert not sock.poll(200)  # placed: no answer
    finally:
        sock.close(0)
    stats = daemon.stats()
    assert stats["tells_from_state"] == 4 and stats["tells_refused"] == 2
    # The blocks stored from the state are found by a lookup of the text and spell it.
    enc = get_encoding("cl100k_base")
    ask = AutoRequest(8, SEED, "cl100k_base", encoding_id(enc), (), False, BLOCK, 0, data)
    reply = parse_reply(request(daemon.address, ask.frames()))
    assert isinstance(reply, AutoHit) and reply.blocks == 5 and reply.start == 0
    assert list(reply.tokens) == enc.encode_ordinary(data[: reply.cut_byte].decode())
    assert enc.encode_ordinary(TEXT)[: len(reply.tokens)] == list(reply.tokens)


def long_chat(turns: int, seed: int) -> list[str]:
    """A chat whose turns are longer than a block (as a model's answers are): the generation
    prompt each request ends with is rewritten after the last block the next one shares."""
    rng = random.Random(seed)
    history, out = "<|im_start|>system\nBe exact.<|im_end|>\n", []
    for i in range(turns):
        user = f"<|im_start|>user\n{i}: {rng.choice(WORDS)}?<|im_end|>\n"
        out.append(history + user + "<|im_start|>assistant\n<think>\n")
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120)))
        history += user + f"<|im_start|>assistant\n{answer}<|im_end|>\n"
    return out


def test_workers_telling_a_chat_in_turn_stay_exact(daemon: DaemonProcess) -> None:
    """Two workers take a chat's turns in turn, each telling its new blocks: the daemon checks
    TELLs from kept states (how many depends on how soon each worker follows the other's
    blocks), and a third worker is served the whole chain exactly."""
    enc = get_encoding("cl100k_base")
    texts = long_chat(24, 5)
    with (
        Client(daemon.address, "cl100k_base", timeout_ms=5000) as one,
        Client(daemon.address, "cl100k_base", timeout_ms=5000) as two,
    ):
        for i, text in enumerate(texts):
            client = (one, two)[i % 2]
            assert client.encode_ordinary(text) == enc.encode_ordinary(text)
            wait_until(lambda: daemon.stats()["fills_pending"] == 0, 30, "fills never finished")
    stats = daemon.stats()
    assert stats["tells_from_state"] > 0, stats
    assert stats["tells_refused"] == 0 and stats["tells_unplaced"] == 0
    with Client(daemon.address, "cl100k_base", timeout_ms=5000, auto_local_bytes=0) as three:
        for text in texts[-3:]:
            assert three.encode_ordinary(text) == enc.encode_ordinary(text)
        assert three.stats()["auto_hit_bytes"] > len(texts[-3]) // 2
