"""flashtoken.client.Client against a real daemon: exact on every split, whatever it does."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import zmq
from flashtoken.client import Client
from hypothesis import given
from hypothesis import strategies as st

from flashtoken import get_encoding, split_prefix
from flashtoken.errors import DaemonUnavailable
from flashtoken.wire import ALGORITHM, MAGIC, VERSION, parse_request, tokens_to_frame
from tests.corpus import CORPUS, splits
from tests.daemon_fixtures import DaemonProcess, wait_until
from tests.strategies import texts

pytestmark = pytest.mark.timeout(90)

ENCODINGS = ["cl100k_base", "o200k_base"]
# Generous: tests on a loaded CI machine must not fall back for want of a few ms.
# ms: a real daemon's answer is awaited this long; it comes in ms, only a hang waits it out.
# Not less: on a loaded machine a reply can take longer than 250 ms, and a test counting
# hits then failed for want of a few ms (a timing assertion in disguise).
TIMEOUT_MS = 5000


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates: never sent to the daemon
        return False


def _wait_for_fills(daemon: DaemonProcess) -> None:
    wait_until(lambda: daemon.stats()["fills_pending"] == 0, 30, "fills never finished")


@pytest.mark.parametrize("name", ENCODINGS)
def test_exact_on_every_corpus_split(shared_daemon: DaemonProcess, name: str) -> None:
    enc = get_encoding(name)
    pairs = [pair for text in CORPUS for pair in splits(text)]
    pairs += [(p + "\n" + p, s) for p, s in pairs[::7]]  # longer prefixes, same joins
    before = shared_daemon.stats()
    with (
        Client(shared_daemon.address, name, timeout_ms=TIMEOUT_MS, min_uses=1) as cold,
        Client(shared_daemon.address, name, timeout_ms=TIMEOUT_MS, min_uses=1) as warm,
    ):
        for prefix, suffix in pairs:  # misses: local encodes, fills requested
            assert cold.encode_ordinary(suffix, prefix=prefix) == enc.encode_ordinary(
                prefix + suffix
            )
        _wait_for_fills(shared_daemon)
        for prefix, suffix in pairs:  # a cold L1: daemon hits
            expected = enc.encode_ordinary(prefix + suffix)
            assert warm.encode_ordinary(suffix, prefix=prefix) == expected
            assert warm.count_ordinary(suffix, prefix=prefix) == len(expected)
            assert warm.encode_ordinary_array(suffix, prefix=prefix).tolist() == expected
        stats = warm.stats()
    # Every prefix the daemon filled is a hit; one it refused to fill (its queue full, on a
    # loaded machine), gave up on or evicted is a miss, encoded locally, and counted as such.
    after = shared_daemon.stats()
    lost = sum(after[k] - before[k] for k in ("fills_refused", "fills_abandoned", "evictions"))
    sent = len({p for p, _ in pairs if _utf8(p)})
    assert stats["l2_hits"] + stats["misses"] == sent, stats
    assert stats["misses"] <= lost, (stats, after)
    assert stats["errors"] == stats["timeouts"] == stats["rejected_hits"] == 0


@pytest.mark.parametrize("name", ENCODINGS)
def test_exact_with_special_tokens(shared_daemon: DaemonProcess, name: str) -> None:
    enc = get_encoding(name)
    cases = [pair for text in CORPUS if "<|" in text or "|>" in text for pair in splits(text)]
    policies = [
        dict(allowed_special="all"),
        dict(allowed_special={"<|endoftext|>"}),
        dict(disallowed_special=()),
        {},
    ]
    with Client(shared_daemon.address, name, timeout_ms=TIMEOUT_MS) as client:
        for _ in range(2):  # the second pass reads what the first filled
            for prefix, suffix in cases:
                for policy in policies:
                    try:
                        expected = enc.encode(prefix + suffix, **policy)
                    except ValueError as exc:
                        with pytest.raises(ValueError, match="disallowed special token") as raised:
                            client.encode(suffix, prefix=prefix, **policy)
                        assert str(raised.value) == str(exc)
                        continue
                    assert client.encode(suffix, prefix=prefix, **policy) == expected
                    assert client.count(suffix, prefix=prefix, **policy) == len(expected)
            _wait_for_fills(shared_daemon)
        assert client.stats()["l2_hits"] > 0


_random_client: dict[str, Client] = {}


@pytest.mark.parametrize("name", ENCODINGS)
def test_exact_on_random_splits(shared_daemon: DaemonProcess, name: str) -> None:
    enc = get_encoding(name)
    clients = [
        Client(shared_daemon.address, name, timeout_ms=TIMEOUT_MS, l1_bytes=0) for _ in range(2)
    ]

    @given(texts, texts, st.integers(0, 1))
    def check(prefix: str, suffix: str, which: int) -> None:
        # l1_bytes=0: every call goes to the daemon (or falls back), the paths under test.
        assert clients[which].encode_ordinary(suffix, prefix=prefix) == enc.encode_ordinary(
            prefix + suffix
        )

    try:
        check()
    finally:
        for client in clients:
            client.close()


def test_miss_then_l1_then_daemon_hit(shared_daemon: DaemonProcess) -> None:
    enc = get_encoding("cl100k_base")
    prefix = f"System prompt {random.random()}: " + "be exact. " * 500
    with Client(shared_daemon.address, timeout_ms=TIMEOUT_MS, min_uses=1) as first:
        assert first.encode_ordinary(" hi", prefix=prefix) == enc.encode_ordinary(prefix + " hi")
        assert first.encode_ordinary(" yo", prefix=prefix) == enc.encode_ordinary(prefix + " yo")
        # The first call's GET started the fill and waited for it: a hit if it landed within
        # the wait (single flight), else a miss encoded here.
        assert (first.stats()["misses"] + first.stats()["l2_hits"], first.stats()["l1_hits"]) == (
            1,
            1,
        )
    _wait_for_fills(shared_daemon)
    with Client(shared_daemon.address, timeout_ms=TIMEOUT_MS, min_uses=1) as second:
        assert second.encode_ordinary("!", prefix=prefix) == enc.encode_ordinary(prefix + "!")
        stats = second.stats()
    assert (stats["l2_hits"], stats["misses"], stats["fallbacks"], stats["breaker"]) == (
        1,
        0,
        0,
        "closed",
    )


def test_namespaces_share_nothing(shared_daemon: DaemonProcess) -> None:
    prefix = f"tenant data {random.random()}"
    with Client(shared_daemon.address, namespace=b"a", timeout_ms=TIMEOUT_MS, min_uses=1) as a:
        a.encode_ordinary("", prefix=prefix)
    _wait_for_fills(shared_daemon)
    fills = shared_daemon.stats()["fills"]
    with Client(shared_daemon.address, namespace=b"b", timeout_ms=TIMEOUT_MS, min_uses=1) as b:
        b.encode_ordinary("", prefix=prefix)
        # Not a's entry: a fill of its own (waited for, or missed and encoded here).
        assert b.stats()["l2_hits"] + b.stats()["misses"] == 1 and b.stats()["map_hits"] == 0
    _wait_for_fills(shared_daemon)
    assert shared_daemon.stats()["fills"] == fills + 1


def test_no_daemon_is_exact_and_opens_the_breaker(daemon_dir: Path) -> None:
    enc = get_encoding("cl100k_base")
    with Client(f"ipc://{daemon_dir}/absent.sock", timeout_ms=5) as client:
        for i in range(20):
            prefix = f"prefix {i} " * 50
            assert client.encode_ordinary("x", prefix=prefix) == enc.encode_ordinary(prefix + "x")
        stats = client.stats()
        # No socket file: not even a connect (and no wait); three failures open the breaker.
        assert stats["errors"] == 3 and stats["fallbacks"] == 20 and stats["timeouts"] == 0
        assert stats["breaker"] == "open" and stats["untrusted"] == 0
        with pytest.raises(DaemonUnavailable):
            client.daemon_stats(timeout_ms=50)


def test_prefixes_the_daemon_cannot_take_stay_local(shared_daemon: DaemonProcess) -> None:
    enc = get_encoding("cl100k_base")
    before = shared_daemon.stats()["cmd_get"]
    with Client(shared_daemon.address, timeout_ms=TIMEOUT_MS, max_prefix_bytes=1000) as client:
        for prefix in ["lone \ud83d surrogate", "x\udc00", "y" * 1001]:
            assert client.encode_ordinary("\ude00z", prefix=prefix) == enc.encode_ordinary(
                prefix + "\ude00z"
            )
        assert client.stats()["fallbacks"] == 3
    assert shared_daemon.stats()["cmd_get"] == before


def test_forced_collisions_never_return_another_prefix(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    daemon = start_daemon("--debug-key-bytes", "1")  # 256 keys: collisions galore
    enc = get_encoding("cl100k_base")
    rng = random.Random(7)
    prefixes = [
        f"{i} " + " ".join(rng.choice(["alpha", "beta", "gamma"]) for _ in range(30))
        for i in range(600)
    ]
    with Client(daemon.address, timeout_ms=TIMEOUT_MS, l1_bytes=0) as client:
        for _ in range(3):
            for prefix in prefixes:
                assert client.encode_ordinary(" end", prefix=prefix) == enc.encode_ordinary(
                    prefix + " end"
                )
            _wait_for_fills(daemon)
        stats = client.stats()
    assert stats["l2_hits"] > 0 and stats["rejected_hits"] == 0
    assert daemon.stats()["collisions_detected"] > 0


class FakeDaemon:
    """A real ROUTER socket that answers every request with something wrong (or sometimes right)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        os.chmod(address[len("ipc://") :], 0o600)  # a private socket, as the daemon's: trusted
        self.stop = threading.Event()
        self.answered = 0
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def replies(self, request) -> list[list[bytes]]:
        enc = get_encoding(request.enc)
        prefix = request.prefix.decode()
        split = split_prefix(enc, prefix)
        good = tokens_to_frame(__import__("array").array("I", split.head))
        other = tokens_to_frame(__import__("array").array("I", enc.encode_ordinary("another text")))

        def hit(id_: int, cut: int, frame: bytes, n: int | None = None) -> list[bytes]:
            head = {
                "m": MAGIC,
                "v": VERSION,
                "a": ALGORITHM,
                "id": id_,
                "op": "GET",
                "ok": True,
                "hit": True,
                "cut": cut,
                "n": len(frame) // 4 if n is None else n,
            }
            return [msgpack.packb(head), frame]

        rid = request.id
        return [
            [os.urandom(40)],
            [b"\x91" * 5000],
            hit(rid, split.cut, other),  # another prefix's tokens
            hit(rid, len(prefix) + 5, good),  # cut beyond the prefix
            hit(rid, split.cut, good, n=10**9),  # declared length is a lie
            hit(rid, split.cut, tokens_to_frame(__import__("array").array("I", [2**32 - 1] * 3))),
            hit(rid, split.cut, tokens_to_frame(__import__("array").array("I", [100257]))),
            hit(rid, split.cut, good[:-2]),  # truncated
            hit(rid + 1, split.cut, good),  # someone else's id
            [
                msgpack.packb(
                    {
                        "m": MAGIC,
                        "v": VERSION,
                        "a": ALGORITHM,
                        "id": rid,
                        "op": "GET",
                        "ok": True,
                        "hit": "yes",
                    }
                )
            ],
            [
                msgpack.packb(
                    {
                        "m": MAGIC,
                        "v": VERSION,
                        "a": ALGORITHM,
                        "id": rid,
                        "ok": False,
                        "error": "CLIENT_ERROR",
                        "message": 5,
                    }
                )
            ],
            hit(rid, split.cut, good),  # right, at last
        ]

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50, zmq.POLLIN):
                continue
            identity, *frames = self.sock.recv_multipart()
            request = parse_request(frames)
            options = self.replies(request)
            reply = options[self.answered % len(options)]
            self.answered += 1
            self.sock.send_multipart([identity, *reply])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close(linger=0)
        self.ctx.term()


def test_a_daemon_answering_garbage_changes_no_token(daemon_dir: Path) -> None:
    enc = get_encoding("cl100k_base")
    fake = FakeDaemon(f"ipc://{daemon_dir}/fake.sock")
    try:
        with Client(fake.address, timeout_ms=1000, l1_bytes=0, breaker_failures=10**6) as client:
            for i in range(120):
                prefix = f"Garbage in, {i} exact tokens out. " * 20
                assert client.encode_ordinary(" ok", prefix=prefix) == enc.encode_ordinary(
                    prefix + " ok"
                )
            stats = client.stats()
    finally:
        fake.close()
    # Of every 12 replies: one right (a hit), one for another id (discarded: a timeout), ten wrong.
    assert (stats["l2_hits"], stats["timeouts"], stats["errors"]) == (10, 10, 100)
    assert stats["rejected_hits"] > 0 and stats["late_replies"] > 0


def test_client_made_before_fork_works_in_the_child(shared_daemon: DaemonProcess) -> None:
    enc = get_encoding("cl100k_base")
    prefix = f"preloaded {random.random()} " * 40
    client = Client(shared_daemon.address, timeout_ms=TIMEOUT_MS, min_uses=1)
    client.encode_ordinary("x", prefix=prefix)  # the parent's socket is open now
    _wait_for_fills(shared_daemon)
    before = client.stats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # the child: exit with the verdict, never return into pytest
        code = 1
        try:
            ok = client.encode_ordinary("y", prefix=prefix) == enc.encode_ordinary(prefix + "y")
            other = prefix + " child"
            ok &= client.encode_ordinary("z", prefix=other) == enc.encode_ordinary(other + "z")
            stats = client.stats()
            keys = ("l1_hits", "misses", "l2_hits", "errors", "timeouts")
            counted = {k: stats[k] - before[k] for k in keys}
            # The other prefix: a miss, or a hit of the fill its GET waited for.
            counted["misses"] += counted.pop("l2_hits")
            code = (
                0
                if ok and counted == {"l1_hits": 1, "misses": 1, "errors": 0, "timeouts": 0}
                else 2
            )
        finally:
            os._exit(code)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's socket still works after the child used its own.
        other = prefix + " parent"
        assert client.encode_ordinary("w", prefix=other) == enc.encode_ordinary(other + "w")
        assert client.stats()["errors"] == 0
    finally:
        client.close()


def test_threads_share_a_client(shared_daemon: DaemonProcess) -> None:
    enc = get_encoding("cl100k_base")
    errors: list[BaseException] = []
    prefixes = [f"thread prompt {i} {random.random()} " * 30 for i in range(40)]

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(100):
                prefix = rng.choice(prefixes)
                suffix = rng.choice(["", " a", "1", "\n\n", "'s"])
                assert client.encode_ordinary(suffix, prefix=prefix) == enc.encode_ordinary(
                    prefix + suffix
                )
        except BaseException as exc:  # reported below
            errors.append(exc)

    with Client(shared_daemon.address, timeout_ms=TIMEOUT_MS) as client:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not errors


def test_closed_client_still_answers(shared_daemon: DaemonProcess) -> None:
    enc = get_encoding("cl100k_base")
    client = Client(shared_daemon.address, timeout_ms=TIMEOUT_MS, min_uses=1)
    client.close()
    assert client.encode_ordinary("b", prefix="a closed client ") == enc.encode_ordinary(
        "a closed client b"
    )
    assert client.stats()["fallbacks"] == 0 and client.stats()["misses"] == 0


def test_interpreter_exit_never_hangs(
    daemon_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    daemon = start_daemon()
    daemon.signal(__import__("signal").SIGSTOP)  # a frozen daemon: requests queue, no replies
    try:
        code = (
            "from flashtoken.client import Client\n"
            f"c = Client({daemon.address!r}, timeout_ms=20)\n"
            "assert c.count_ordinary('x', prefix='y' * 1000) > 0\n"
            f"d = Client('ipc://{daemon_dir}/absent.sock', timeout_ms=20)\n"
            "assert d.count_ordinary('x', prefix='z' * 1000) > 0\n"
            "print('done')\n"  # and exit without close()
        )
        # A hang at exit raises TimeoutExpired (a generous deadline, not a timing).
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    finally:
        daemon.signal(__import__("signal").SIGCONT)
