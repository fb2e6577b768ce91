"""Following chains: blocks another process encoded, published by the daemon, taken into an L1.

A worker whose L1 is behind (the previous turns went to other workers) takes their blocks from
the daemon's PUB socket on a background thread (client/follow.py), after checking them like its
own (``AutoPrefixCache.adopt``). A worker that encoded a text itself TELLs the daemon, which
fills and publishes the new blocks. Exact whatever is published: tampered, foreign or garbage
messages cost a block, never a token.
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
import xxhash
import zmq
from flashtoken.client import AsyncClient, Client

from flashtoken import AutoPrefixCache, get_encoding
from flashtoken.encodings import encoding_id
from flashtoken.errors import ProtocolError
from flashtoken.specials import SpecialPolicy
from flashtoken.wire import (
    MAGIC,
    VERSION,
    Blocks,
    TellRequest,
    make_chain_seed,
    parse_request,
    publish_address,
    tokens_to_frame,
)
from tests.corpus import CORPUS
from tests.daemon_fixtures import DaemonProcess, header, request, wait_until
from tests.polling import poll

pytestmark = pytest.mark.timeout(120)

BLOCK = 64
ORDINARY = SpecialPolicy(frozenset(), frozenset())


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


WORDS = [text for text in CORPUS if _utf8(text)]  # a lone surrogate is never cached


def chat(turns: int, seed: int) -> list[str]:
    """A growing chat's requests, each ending in a generation prompt the next one rewrites."""
    rng = random.Random(seed)
    history, out = "<|im_start|>system\nBe exact.<|im_end|>\n", []
    for i in range(turns):
        user = f"<|im_start|>user\n{i}: {rng.choice(WORDS)} {rng.choice(WORDS)}<|im_end|>\n"
        out.append(history + user + "<|im_start|>assistant\n<think>\n")
        history += user + f"<|im_start|>assistant\n{rng.choice(WORDS)} ok.<|im_end|>\n"
    return out


# -- the core: AutoPrefixCache.adopt ------------------------------------------------------------


def published(cache: AutoPrefixCache, text: str, first: int) -> dict[str, Any]:
    """What a daemon would publish for blocks ``first ..`` of ``text`` in ``cache``'s chain."""
    data = text.encode()
    nodes = []
    node = max(cache._store.nodes.values(), key=lambda n: n.cut_byte)  # the chain's last block
    while node is not None:
        nodes.append(node)
        node = node.parent
    nodes.reverse()
    parent = nodes[first - 1] if first else None
    start = parent.cut_byte if parent else 0
    new = nodes[first:]
    end = (first + len(new)) * BLOCK
    while end < len(data) and data[end] & 0xC0 == 0x80:
        end += 1
    ends, n = [], 0
    for node in new:
        n += len(node.tokens)
        ends.append((node.cut_byte, n))
    return dict(
        policy=ORDINARY,
        first=first,
        parent_digest=parent.key[1] if parent else None,
        start_byte=start,
        digests=[node.key[1] for node in new],
        ends=ends,
        span=data[start:end],
        tokens=[t for node in new for t in node.tokens],
    )


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
@pytest.mark.parametrize("seed", range(4))
def test_adopted_blocks_are_used_and_exact(name: str, seed: int) -> None:
    enc = get_encoding(name)
    texts = chat(12, seed)
    writer = AutoPrefixCache(enc, block_bytes=BLOCK)
    reader = AutoPrefixCache(enc, block_bytes=BLOCK)
    reader.encode_ordinary(texts[2])
    for text in texts:
        writer.encode_ordinary(text)
    shared = len(reader.lookup(texts[-1], ORDINARY).path)  # the blocks the reader holds
    assert reader.adopt(**published(writer, texts[-1], shared)) > 0
    before = reader.stats()["encoded_bytes"]
    assert reader.encode_ordinary(texts[-1]) == enc.encode_ordinary(texts[-1])
    # Only the last, partial block and what follows the chain's cut was encoded here.
    assert reader.stats()["encoded_bytes"] - before < 2 * BLOCK + 64
    assert reader.stats()["blocks_adopted"] > 0 and reader.stats()["blocks_refused"] == 0


def tampered(message: dict[str, Any], enc: Any) -> list[tuple[str, dict[str, Any]]]:
    tokens, ends, span = message["tokens"], message["ends"], message["span"]
    swapped = list(tokens)
    swapped[len(swapped) // 2] = (swapped[len(swapped) // 2] + 1) % 50_000
    cut_byte, n = ends[0]
    return [
        ("another token", {**message, "tokens": swapped}),
        ("a cut moved", {**message, "ends": [(cut_byte - 1, n), *ends[1:]]}),
        ("a count moved", {**message, "ends": [(cut_byte, n - 1), *ends[1:]]}),
        ("a byte of the span", {**message, "span": span[:3] + b"#" + span[4:]}),
        ("a start not the parent's cut", {**message, "start_byte": message["start_byte"] + 1}),
        ("a span too short", {**message, "span": span[: -BLOCK // 2]}),
        ("a span too long", {**message, "span": span + b"0123"}),
        ("an id outside the vocabulary", {**message, "tokens": [*tokens[:-1], 10**7]}),
        ("no blocks", {**message, "ends": [], "digests": []}),
    ]


def test_tampered_blocks_are_refused() -> None:
    enc = get_encoding("cl100k_base")
    texts = chat(10, 7)
    writer = AutoPrefixCache(enc, block_bytes=BLOCK)
    for text in texts:
        writer.encode_ordinary(text)
    reader = AutoPrefixCache(enc, block_bytes=BLOCK)
    reader.encode_ordinary(texts[1])
    shared = len(reader.lookup(texts[-1], ORDINARY).path)
    message = published(writer, texts[-1], shared)
    for what, bad in tampered(message, enc):
        assert reader.adopt(**bad) == 0, what
    assert reader.stats()["blocks_refused"] > 0 and reader.stats()["blocks_adopted"] == 0
    foreign = {**message, "parent_digest": 12345}  # a chain this reader does not hold
    assert reader.adopt(**foreign) == 0
    assert reader.adopt(**message) > 0  # the genuine message still goes in
    for text in texts:
        assert reader.encode_ordinary(text) == enc.encode_ordinary(text)


def test_a_special_id_spelling_ordinary_text_is_refused() -> None:
    """``<|endoftext|>`` as ordinary text: its special id decodes to the same bytes, so only the
    policy check can refuse a block that holds it."""
    enc = get_encoding("cl100k_base")
    text = ("plain words before\n" * 4) + "<|endoftext|>" + (" and after it" * 12)
    writer = AutoPrefixCache(enc, block_bytes=BLOCK)
    writer.encode_ordinary(text)
    message = published(writer, text, 0)
    ordinary = enc.encode_ordinary("<|endoftext|>")
    tokens = message["tokens"]
    at = next(i for i in range(len(tokens)) if tokens[i : i + len(ordinary)] == ordinary)
    special = tokens[:at] + [enc.eot_token] + tokens[at + len(ordinary) :]
    shift = len(ordinary) - 1
    ends = [(c, n - shift if n > at else n) for c, n in message["ends"]]
    reader = AutoPrefixCache(enc, block_bytes=BLOCK)
    assert reader.adopt(**{**message, "tokens": special, "ends": ends}) == 0
    assert reader.encode_ordinary(text) == enc.encode_ordinary(text)


# -- through a real daemon -----------------------------------------------------------------------


def client(daemon: DaemonProcess, name: str = "cl100k_base", **options: Any) -> Client:
    return Client(daemon.address, name, timeout_ms=5000, auto_block_bytes=BLOCK, **options)


def play(clients: list[Any], enc: Any, texts: list[str], rng: random.Random) -> None:
    """Each request to a random client; every answer exact."""
    for text in texts:
        assert rng.choice(clients).encode_ordinary(text) == enc.encode_ordinary(text)


def follow_up(writer: Any, read: Callable[[str], Any], reader: Any, texts: list[str]) -> int:
    """The writer encodes ``texts`` one by one until the reader takes the blocks of one. A
    publication sent before the reader's subscription (or reconnection) is through is lost, and
    the reader then follows that chat again only once it serves it itself: so, between the
    writer's texts, the reader serves the text it missed. Returns how many texts that took."""
    enc = writer.encoding
    for i, text in enumerate(texts):
        before = reader.stats()["auto_l1_adopted"]
        assert writer.encode_ordinary(text) == enc.encode_ordinary(text)
        if poll(lambda: reader.stats()["auto_l1_adopted"] > before, 2):  # noqa: B023
            return i + 1
        assert read(text) == enc.encode_ordinary(text)  # missed: serve it, follow from there
    raise AssertionError("the reader never took a block the writer encoded")


def holds(c: Client, text: str) -> bool:
    """Whether ``c``'s L1 holds every full block of ``text``."""
    return len(c._core.chains.auto.lookup(text, ORDINARY).path) == len(text.encode()) // BLOCK


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_workers_follow_each_others_chains(daemon: DaemonProcess, name: str) -> None:
    enc = get_encoding(name)
    texts = chat(40, 3)
    workers = [client(daemon, name) for _ in range(3)]
    try:
        for w in workers:  # every worker holds the conversation's start (so it follows it)
            assert w.encode_ordinary(texts[0]) == enc.encode_ordinary(texts[0])
        done = 1
        for w in workers[1:]:  # until each one's subscription is through
            done += follow_up(workers[0], w.encode_ordinary, w, texts[done:])
        for w in workers:
            assert w.encode_ordinary(texts[done - 1]) == enc.encode_ordinary(texts[done - 1])
        for i, text in enumerate(texts[done:]):
            assert workers[i % 3].encode_ordinary(text) == enc.encode_ordinary(text)
            # Told, filled, published, taken: the others hold this request's blocks too.
            wait_until(lambda: all(holds(w, text) for w in workers), 30, f"not followed: {i}")
        play(workers, enc, texts, random.Random(5))
        stats = [w.stats() for w in workers]
    finally:
        for w in workers:
            w.close()
    assert all(s["auto_l1_adopted"] > 0 and s["auto_told"] > 0 for s in stats)
    assert all(s["auto_l1_refused"] == s["published_refused"] == s["l2_hits"] == 0 for s in stats)
    daemon_stats = daemon.stats()
    assert daemon_stats["blocks_published"] > 0 and daemon_stats["protocol_errors"] == 0


def test_async_client_follows_too(daemon: DaemonProcess) -> None:
    enc = get_encoding("cl100k_base")
    texts = chat(20, 9)

    async def main() -> dict[str, Any]:
        async with AsyncClient(daemon.address, "cl100k_base", auto_block_bytes=BLOCK) as reader:
            loop = asyncio.get_running_loop()

            def read(text: str) -> list[int]:  # from the writer's thread
                return asyncio.run_coroutine_threadsafe(reader.encode_ordinary(text), loop).result()

            with client(daemon) as writer:
                assert await reader.encode_ordinary(texts[0]) == enc.encode_ordinary(texts[0])
                await loop.run_in_executor(None, follow_up, writer, read, reader, texts[1:])
                for text in texts:
                    assert await reader.encode_ordinary(text) == enc.encode_ordinary(text)
            return reader.stats()

    stats = asyncio.run(main())
    assert stats["auto_l1_adopted"] > 0 and stats["auto_l1_refused"] == 0


def test_following_survives_kill_and_restart(start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(encodings="cl100k_base")
    enc = get_encoding("cl100k_base")
    texts = chat(40, 12)
    writer, reader = client(daemon), client(daemon)
    try:
        for c in (writer, reader):
            assert c.encode_ordinary(texts[0]) == enc.encode_ordinary(texts[0])
        done = 1 + follow_up(writer, reader.encode_ordinary, reader, texts[1:10])
        daemon.kill9()
        for text in texts[done : done + 10]:  # no daemon: local, exact
            assert writer.encode_ordinary(text) == enc.encode_ordinary(text)
            assert reader.encode_ordinary(text) == enc.encode_ordinary(text)
        daemon = start_daemon(encodings="cl100k_base")  # the same address
        # The new daemon knows nothing: it answers the writer's first TELL "not placed", the
        # writer tells its next text from the first block, and the reader follows again once
        # it has reconnected.
        follow_up(writer, reader.encode_ordinary, reader, texts[done + 10 :])
        for text in texts:
            assert reader.encode_ordinary(text) == enc.encode_ordinary(text)
    finally:
        writer.close()
        reader.close()
    assert daemon.stats()["tells_unplaced"] >= 1


def test_fork_gets_its_own_follower(daemon: DaemonProcess) -> None:
    enc = get_encoding("cl100k_base")
    texts = chat(12, 21)
    with client(daemon) as c:
        for text in texts[:6]:
            assert c.encode_ordinary(text) == enc.encode_ordinary(text)
        pid = os.fork()
        if pid == 0:  # the child: the parent's thread is not here; a new follower starts
            try:
                ok = all(c.encode_ordinary(t) == enc.encode_ordinary(t) for t in texts)
                c.close()
                os._exit(0 if ok else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        for text in texts:  # the parent's follower still works
            assert c.encode_ordinary(text) == enc.encode_ordinary(text)


class LyingPublisher:
    """A fake daemon: a ROUTER that answers nothing and a PUB that sends tampered blocks, and
    blocks of another seed, and garbage, on the client's seed."""

    def __init__(self, address: str, messages: list[list[bytes]]) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(address)
        os.chmod(address[len("ipc://") :], 0o600)  # a private socket, as the daemon's: trusted
        where = publish_address(address)
        assert where is not None
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(where)
        os.chmod(where[len("ipc://") :], 0o600)  # a private socket, as the daemon's: trusted
        self.messages = messages
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            for message in self.messages:
                self.pub.send_multipart(message)
            if self.router.poll(20):
                self.router.recv_multipart()  # asks go unanswered: the client times out

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.router.close(0)
        self.pub.close(0)
        self.ctx.term()


def test_a_lying_publisher_never_changes_a_token(daemon_dir: Any) -> None:
    enc = get_encoding("cl100k_base")
    texts = chat(12, 30)
    honest = AutoPrefixCache(enc, block_bytes=BLOCK)
    for text in texts:
        honest.encode_ordinary(text)
    seed = make_chain_seed(b"", encoding_id(enc), (), BLOCK)
    mirror = AutoPrefixCache(enc, block_bytes=BLOCK)  # what the client will hold: texts[:4]
    for text in texts[:4]:
        mirror.encode_ordinary(text)
    genuine = published(honest, texts[-1], len(mirror.lookup(texts[-1], ORDINARY).path))

    def frames(m: dict[str, Any], topic: bytes = seed) -> list[bytes]:
        starts = [0] + [n for _, n in m["ends"][:-1]]
        return Blocks(
            topic,
            m["first"],
            None if m["parent_digest"] is None else m["parent_digest"].to_bytes(16, "big"),
            m["start_byte"],
            [d.to_bytes(16, "big") for d in m["digests"]],
            [c for c, _ in m["ends"]],
            [b - a for a, (_, b) in zip(starts, m["ends"], strict=True)],
            m["span"],
            tokens_to_frame(array("I", m["tokens"][: m["ends"][-1][1]])),
        ).frames()

    lies = [frames(bad) for what, bad in tampered(genuine, enc) if bad["ends"]]
    lies.append([seed, b"garbage", b"", b""])
    lies.append([seed, header(first=0), b"x", b"1234"])
    address = f"ipc://{daemon_dir}/liar.sock"
    liar = LyingPublisher(address, lies)
    try:
        with Client(address, "cl100k_base", timeout_ms=50, auto_block_bytes=BLOCK) as c:
            for text in texts[:4]:
                assert c.encode_ordinary(text) == enc.encode_ordinary(text)
            wait_until(lambda: c.stats()["auto_l1_refused"] > 0, 30, "nothing refused")
            wait_until(lambda: c.stats()["published_refused"] > 0, 30, "no garbage seen")
            for text in texts:
                assert c.encode_ordinary(text) == enc.encode_ordinary(text)
            stats = c.stats()
    finally:
        liar.close()
    assert stats["published_refused"] > 0 and stats["auto_l1_refused"] > 0
    assert stats["auto_l1_adopted"] == 0


# -- TELL on the wire ----------------------------------------------------------------------------


def tell_frames(**changes: Any) -> list[bytes]:
    enc = get_encoding("cl100k_base")
    fields: dict[str, Any] = dict(
        id=7,
        seed=bytes(16),
        enc="cl100k_base",
        eid=encoding_id(enc),
        allowed=(),
        block=BLOCK,
        first=1,
        parent=bytes(16),
        start=BLOCK - 3,
        digests=[bytes(16)],
        span=b"x" * (BLOCK + 3),
    )
    fields.update(changes)
    return TellRequest(**fields).frames()


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(parent=None), "parent"),
        (dict(first=0), "parent"),
        (dict(parent=b"short"), "parent"),
        (dict(start=2 * BLOCK), "start"),
        (dict(digests=[]), "digests"),
        (dict(digests=[b"x" * 15]), "digests"),
        (dict(span=b"x" * (BLOCK + 2)), "span"),
        (dict(span=b"x" * (BLOCK + 7)), "span"),
        (dict(span=b"\xff" * (BLOCK + 3)), "UTF-8"),
    ],
)
def test_malformed_tells_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_request(tell_frames(**changes))


def test_the_daemon_answers_a_bad_tell_and_an_unplaced_one(daemon: DaemonProcess) -> None:
    reply = request(daemon.address, tell_frames(digests=[]))
    assert msgpack.unpackb(reply[0])["error"] == "CLIENT_ERROR"
    # Well formed, but no such parent block: the one answer a good TELL can get.
    reply = request(daemon.address, tell_frames())
    assert msgpack.unpackb(reply[0])["placed"] is False
    assert daemon.stats()["tells_unplaced"] == 1
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(daemon.address)
        # A digest that is not that of its bytes: refused (a client's key is never trusted).
        sock.send_multipart(tell_frames(first=0, parent=None, start=0, span=b"z" * BLOCK))
        wait_until(lambda: daemon.stats()["tells_refused"] == 1, 10, "a lying TELL was taken")
        assert daemon.stats()["blocks"] == 0
        digest = xxhash.xxh3_128(b"y" * BLOCK).digest()
        tell = tell_frames(first=0, parent=None, start=0, span=b"y" * BLOCK, digests=[digest])
        sock.send_multipart(tell)
        wait_until(lambda: daemon.stats()["blocks"] == 1, 10, "a root TELL was not filled")
        assert not sock.poll(200)  # placed: no answer
    finally:
        sock.close(0)
    assert daemon.answers()


def test_daemon_memory_is_linear_in_the_distinct_text(daemon: DaemonProcess) -> None:
    """About 4 bytes a token and a small overhead a block: within 2x of 4 bytes per distinct
    token for a chat, whose requests all share their history (default block size)."""
    enc = get_encoding("cl100k_base")
    texts = chat(60, 40)
    with Client(daemon.address, "cl100k_base", timeout_ms=5000) as c:
        for text in texts:
            assert c.encode_ordinary(text) == enc.encode_ordinary(text)
    wait_until(lambda: daemon.stats()["fills_pending"] == 0, 30, "fills never finished")
    stats = daemon.stats()
    distinct = len(enc.encode_ordinary(texts[-1]))
    assert stats["blocks"] >= len(texts[-1].encode()) // 512 - 1
    assert stats["bytes"] <= 2 * 4 * distinct, stats["bytes"] / (4 * distinct)


def test_magic_and_version_of_a_published_message() -> None:
    out = Blocks(bytes(16), 0, None, 0, [bytes(16)], [3], [1], b"abc", b"\x01\x00\x00\x00").frames()
    head = msgpack.unpackb(out[1])
    assert (head["m"], head["v"]) == (MAGIC, VERSION)
