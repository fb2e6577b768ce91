"""The host's shared map (flashtoken/sharedmap.py) with a real LMDB file and real processes:
readers in other processes, a writer killed mid-write, a damaged file, fork, dead readers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from array import array
from collections.abc import Callable, Iterator

import pytest

lmdb = pytest.importorskip("lmdb")

from flashtoken import sharedmap  # noqa: E402
from flashtoken.mapentry import pack_entry  # noqa: E402
from flashtoken.mapreader import MapReader  # noqa: E402
from flashtoken.sharedmap import MapWriter  # noqa: E402

EID = bytes(range(32))
NS = b"tenant-a"
ALLOWED = ("<|endoftext|>",)


def _tokens(i: int, size: int = 2000) -> list[int]:
    return [(i * 7919 + j) % 200_000 for j in range(size // 4)]


def _put(writer: MapWriter, i: int) -> bool:
    """Store prefix ``i`` (distinct tokens for every ``i``)."""
    prefix = _prefix(i)
    tokens = array("I", _tokens(i)).tobytes()
    return writer.store(NS, EID, ALLOWED, prefix, len(prefix) - 3, tokens)


def _key(writer: MapWriter, i: int) -> bytes:
    return writer.key(NS, EID, ALLOWED, _prefix(i))


def _prefix(i: int, size: int = 2000) -> bytes:
    return f"prefix {i}: ".encode() + bytes([65 + i % 26]) * size


READER = textwrap.dedent(
    """
    import sys, json
    sys.path.insert(0, {root!r})
    from tests.test_sharedmap import _prefix, EID, NS, ALLOWED
    from flashtoken.mapreader import MapReader
    reader = MapReader({path!r})
    out = {{}}
    for i in {indices!r}:
        hit = reader.get(NS, EID, ALLOWED, _prefix(i))
        out[i] = None if hit is None else [hit.cut, hit.tokens]
    print(json.dumps(out))
    """
)


def _read_elsewhere(path: str, indices: list[int]) -> dict[int, list | None]:
    """Read entries from a separate process, as a worker would."""
    import json

    code = READER.format(root=os.getcwd(), path=path, indices=indices)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return {int(k): v for k, v in json.loads(done.stdout).items()}


def _expected(i: int) -> list:
    return [len(_prefix(i)) - 3, _tokens(i)]


@pytest.fixture
def path(tmp_path) -> str:
    directory = tmp_path / "daemon"
    directory.mkdir(mode=0o700)
    yield sharedmap.map_path(str(directory))
    sharedmap.forget_environment(sharedmap.map_path(str(directory)))


def test_a_worker_reads_what_the_daemon_wrote_and_only_that(path) -> None:
    writer = MapWriter(path, 1 << 24)
    for i in range(5):
        assert _put(writer, i)
    got = _read_elsewhere(path, [0, 1, 2, 3, 4, 5])
    assert got == {i: _expected(i) for i in range(5)} | {5: None}
    # The same prefix asked for by another tenant, encoding or policy is no hit: the key locates,
    # the entry's own fields confirm.
    reader = MapReader(path)
    prefix = _prefix(0)
    assert reader.get(NS, EID, ALLOWED, prefix) is not None
    assert reader.get(b"tenant-b", EID, ALLOWED, prefix) is None
    assert reader.get(NS, bytes(32), ALLOWED, prefix) is None
    assert reader.get(NS, EID, (), prefix) is None


def test_a_colliding_key_is_never_a_hit(path) -> None:
    """An entry stored under another prefix's key (a crafted collision) spells another prefix."""
    writer = MapWriter(path, 1 << 24)
    attacker = _prefix(2)
    value = pack_entry(NS, EID, ALLOWED, attacker, 5, array("I", _tokens(2)).tobytes())
    writer.put(_key(writer, 1), value)
    assert _read_elsewhere(path, [1, 2]) == {1: None, 2: None}


def test_the_budget_holds_and_recently_used_entries_stay(path) -> None:
    budget = 40 * 4096
    writer = MapWriter(path, budget)
    keys = []
    for i in range(100):
        _put(writer, i)
        keys.append(_key(writer, i))
        writer.touch([keys[0]])  # a reader keeps hitting the first one
        assert writer.bytes <= budget
    assert keys[0] in writer and keys[99] in writer and keys[1] not in writer
    assert writer.evictions == 100 - len(writer)
    assert not writer.put(b"k" * 16, b"x" * (budget + 1))  # larger than the budget: refused
    held = [i for i, k in enumerate(keys) if k in writer]
    assert writer.tokens == sum(len(_tokens(i)) for i in held)  # map_tokens in stats
    got = _read_elsewhere(path, list(range(100)))
    assert {i for i, v in got.items() if v is not None} == set(held)
    assert all(got[i] == _expected(i) for i in held)


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from tests.test_sharedmap import _put
    from flashtoken.sharedmap import MapWriter
    writer = MapWriter({path!r}, {budget})
    i = 0
    while True:
        _put(writer, i)
        if i == 50:
            print("written", flush=True)
        i += 1
    """
)


def test_a_daemon_killed_mid_write_leaves_a_map_that_is_exact(path) -> None:
    """kill -9 while writing and evicting: the map reopens hot, and every entry reads exact."""
    code = WRITER.format(root=os.getcwd(), path=path, budget=60 * 4096)
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout.readline().strip() == "written"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    writer = MapWriter(path, 60 * 4096)
    assert 0 < len(writer) and writer.rebuilds == 0  # hot: a killed writer loses nothing
    got = _read_elsewhere(path, list(range(2000)))
    present = [i for i, v in got.items() if v is not None]
    assert len(present) == len(writer)
    assert all(got[i] == _expected(i) for i in present)


def test_a_damaged_map_is_never_believed(path) -> None:
    writer = MapWriter(path, 1 << 24)
    for i in range(30):
        _put(writer, i)
    writer.close()
    data = os.path.join(path, "data.mdb")
    size = os.path.getsize(data)
    with open(data, "r+b") as f:  # garbage over the middle of the file: entries and pages
        f.seek(size // 3)
        f.write(os.urandom(size // 3))
    got = _read_elsewhere(path, list(range(30)))
    assert all(v is None or v == _expected(i) for i, v in got.items())
    reopened = MapWriter(path, 1 << 24)  # indexes what holds together, or rebuilds
    got = _read_elsewhere(path, list(range(30)))
    assert all(v is None or v == _expected(i) for i, v in got.items())
    assert _put(reopened, 99)
    assert _read_elsewhere(path, [99]) == {99: _expected(99)}


def test_a_map_open_to_others_is_neither_read_nor_kept(path) -> None:
    writer = MapWriter(path, 1 << 24)
    _put(writer, 0)
    writer.close()
    os.chmod(os.path.join(path, "data.mdb"), 0o644)
    assert _read_elsewhere(path, [0]) == {0: None}  # a worker refuses it
    rebuilt = MapWriter(path, 1 << 24)  # the daemon starts afresh
    assert rebuilt.rebuilds == 1 and len(rebuilt) == 0
    assert sharedmap.trusted(path)


def test_a_forked_worker_opens_its_own_view(path) -> None:
    writer = MapWriter(path, 1 << 24)
    _put(writer, 3)
    writer.close()  # the daemon is another process; here, a worker (gunicorn's master) forks
    reader = MapReader(path)
    assert reader.get(NS, EID, ALLOWED, _prefix(3)) is not None  # used before the fork
    pid = os.fork()
    if pid == 0:  # the child: a fresh environment, and the same answer
        hit = reader.get(NS, EID, ALLOWED, _prefix(3))
        os._exit(0 if hit is not None and [hit.cut, hit.tokens] == _expected(3) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert reader.get(NS, EID, ALLOWED, _prefix(3)) is not None  # the parent's still works


HOLDER = textwrap.dedent(
    """
    import sys, time
    import lmdb
    env = lmdb.open({path!r}, readonly=True, create=False, lock=True, max_readers=1024)
    txn = env.begin()
    print("reading", flush=True)
    sys.stdin.read()
    """
)


def test_a_worker_killed_mid_read_does_not_block_the_writer(path) -> None:
    writer = MapWriter(path, 30 * 4096)
    _put(writer, 0)
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(path=path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout.readline().strip() == "reading"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    assert writer.check_readers() == 1
    for i in range(200):  # many times the budget: pages are reused, the map never fills
        assert _put(writer, i)
    assert writer.bytes <= 30 * 4096


SERVING_READER = textwrap.dedent(
    """
    import sys, json
    sys.path.insert(0, {root!r})
    from tests.test_sharedmap import _prefix, EID, NS, ALLOWED
    from flashtoken.mapreader import MapReader
    reader = MapReader({path!r})
    reader.RECHECK_S = 0.0  # look for a rebuilt map on every read, not once a second
    for line in sys.stdin:
        hits = {{}}
        for i in json.loads(line):
            hit = reader.get(NS, EID, ALLOWED, _prefix(i))
            hits[i] = None if hit is None else [hit.cut, hit.tokens]
        print(json.dumps(hits), flush=True)
    """
)


@contextlib.contextmanager
def serving_reader(path: str) -> Iterator[Callable[[list[int]], dict[int, list | None]]]:
    """A worker process holding a MapReader on ``path`` open between questions: ``ask(indices)``
    gives its answer for each prefix, ``[cut, tokens]`` or None."""
    worker = subprocess.Popen(
        [sys.executable, "-c", SERVING_READER.format(root=os.getcwd(), path=path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdin is not None and worker.stdout is not None

    def ask(indices: list[int]) -> dict[int, list | None]:
        worker.stdin.write(json.dumps(indices) + "\n")
        worker.stdin.flush()
        return {int(k): v for k, v in json.loads(worker.stdout.readline()).items()}

    try:
        yield ask
    finally:
        worker.stdin.close()
        assert worker.wait(timeout=60) == 0
        worker.stdout.close()


def test_a_worker_follows_a_map_the_daemon_rebuilt(path) -> None:
    """A worker that holds the old map open moves to the new one: it reads what the new daemon
    wrote, and nothing of the old file (which it may go on reading until it notices)."""
    writer = MapWriter(path, 1 << 24)
    _put(writer, 0)
    with serving_reader(path) as ask:
        assert ask([0, 1]) == {0: _expected(0), 1: None}
        writer.close()
        os.chmod(os.path.join(path, "data.mdb"), 0o644)  # untrusted: the next daemon rebuilds
        rebuilt = MapWriter(path, 1 << 24)
        assert rebuilt.rebuilds == 1
        _put(rebuilt, 1)
        assert ask([0, 1]) == {0: None, 1: _expected(1)}


def _fill(writer: MapWriter, mib: int) -> None:
    """Entries of 1 MiB of tokens each, until the map's data passes ``mib`` MiB."""
    ballast = array("I", range(256 * 1024)).tobytes()
    for n in range(mib):
        assert writer.store(NS, EID, ALLOWED, b"ballast %d " % n + b"z" * 4000, 4000, ballast)
    assert writer.bytes > mib << 20


def test_a_worker_keeps_reading_a_map_that_grew_past_its_first_size(path) -> None:
    """A worker that opened the map while it was small reads what the daemon wrote after its
    data outgrew that size (LMDB's default reader map is 10 MiB: every read then failed with
    MDB_MAP_RESIZED, and the worker stopped using the map for good)."""
    writer = MapWriter(path, 1 << 26)
    _put(writer, 0)
    with serving_reader(path) as ask:
        assert ask([0]) == {0: _expected(0)}  # opened now, with ~8 KiB of data
        _fill(writer, 16)
        _put(writer, 1)
        assert ask([0, 1]) == {0: _expected(0), 1: _expected(1)}


def test_a_worker_adopts_the_map_a_restarted_daemon_made_larger(path) -> None:
    """A daemon restarted with a larger ``--max-bytes`` grows the map the workers hold open;
    once its data passes the size they mapped, they adopt the new one (MDB_MAP_RESIZED, then
    the size recorded in the file) and read on, the old entries and the new."""
    small = MapWriter(path, 1 << 20)  # a map of 2 MiB + 64 MiB
    _put(small, 0)
    with serving_reader(path) as ask:
        assert ask([0]) == {0: _expected(0)}  # mapped at the small size
        small.close()
        larger = MapWriter(path, 80 << 20)  # restarted: a map of 224 MiB, the entry kept
        _fill(larger, 70)  # past the 66 MiB the worker mapped
        _put(larger, 1)
        assert ask([0, 1]) == {0: _expected(0), 1: _expected(1)}


def test_ids_come_out_of_the_map_as_shared_ints() -> None:
    """A hit's list holds one int object per id value (8 bytes a token in a worker's L1, not
    ~40), equal to the ids stored, including ids above any table made so far."""
    from flashtoken import ids

    stored = [0, 5, 100_000, 199_999, 5, 3_000_000]
    got = ids.token_list_from_bytes(array("I", stored).tobytes())
    assert got == stored
    again = ids.token_list_from_bytes(memoryview(array("I", stored[::-1]).tobytes()))
    assert again == stored[::-1]
    assert all(a is b for a, b in zip(got, again[::-1], strict=True))
    with pytest.raises(ValueError, match="token ids must lie in"):
        ids.token_list_from_bytes(array("I", [ids.MAX_TOKEN_ID]).tobytes())
    assert ids.token_list([7, 200_001]) == [7, 200_001]
