"""A fresh worker's first request, taken from the host map, and the prefixes too short to share.

The hit path checked piece by piece against its definition (the entry's confirmation, the token
list), then whole: a new worker process whose first request is a map hit, with the daemon running
and SIGSTOPped, every id tiktoken's; and the short prefixes a fast backend encodes whole rather
than look up (``share_min_bytes``), exact for every policy.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from array import array
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("zmq")
pytest.importorskip("lmdb")

from flashtoken.client import Client  # noqa: E402

from flashtoken import get_encoding, ids  # noqa: E402
from flashtoken.mapentry import confirm, pack_entry  # noqa: E402
from tests.daemon_fixtures import DaemonProcess  # noqa: E402
from tests.polling import wait_until  # noqa: E402

TIMEOUT_MS = 5000
ENC = "cl100k_base"
EID = bytes(range(32))
token_ids = st.lists(st.integers(0, ids.MAX_TOKEN_ID - 1), max_size=300)


@settings(max_examples=200, deadline=None)
@given(token_ids)
def test_the_token_list_is_the_stored_ids(stored: list[int]) -> None:
    """Whatever the ids (beyond the table made so far included), the list is theirs, with
    the shared int of each value."""
    got = ids.token_list_from_bytes(memoryview(array("I", stored).tobytes()))
    assert got == stored
    assert all(a is b for a, b in zip(got, ids.token_list(stored), strict=True))


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=200),
    st.binary(max_size=8),
    st.lists(st.sampled_from(["<|endoftext|>", "<|fim_prefix|>"]), unique=True),
    st.data(),
)
def test_an_entry_is_confirmed_only_for_its_own_fields(
    prefix: bytes, namespace: bytes, allowed: list[str], data: st.DataObject
) -> None:
    """The entry confirms for the fields it was written for; one byte changed in the prefix, the
    namespace or anywhere in the stored value that carries something makes it no hit."""
    policy = tuple(sorted(allowed))
    tokens = array("I", range(len(prefix) // 2)).tobytes()
    cut = data.draw(st.integers(0, len(prefix)))
    value = pack_entry(namespace, EID, policy, prefix, cut, tokens)
    found = confirm(value, namespace, EID, policy, prefix)
    assert found is not None and found[0] == cut and bytes(found[1]) == tokens
    if prefix:
        at = data.draw(st.integers(0, len(prefix) - 1))
        other = prefix[:at] + bytes([prefix[at] ^ 1]) + prefix[at + 1 :]
        assert confirm(value, namespace, EID, policy, other) is None
    if namespace:
        other_ns = bytes([namespace[0] ^ 1]) + namespace[1:]
        assert confirm(value, other_ns, EID, policy, prefix) is None
    assert confirm(value, namespace, EID, policy + ("<|fim_suffix|>",), prefix) is None
    at = data.draw(st.integers(0, len(value) - 1))
    damaged = bytearray(value)
    damaged[at] ^= 0x10
    # No hit, or (a byte of the header's padding, which carries nothing) the same hit.
    after = confirm(bytes(damaged), namespace, EID, policy, prefix)
    assert after is None or (after[0] == cut and bytes(after[1]) == tokens)
    assert after is None or 5 <= at < 8


FRESH_WORKER = textwrap.dedent(
    """
    import json, sys
    from flashtoken import get_encoding
    from flashtoken.client import Client
    address, prefix, suffix = json.loads(sys.stdin.read())
    enc = get_encoding("cl100k_base")
    # preload_bytes=0: the map read itself (test_preload.py: the hot prefixes taken at start).
    client = Client(address, "cl100k_base", timeout_ms=5000, preload_bytes=0)
    tokens = client.encode_ordinary(suffix, prefix=prefix)
    source = client.last_source
    # The hit is reported later, never by the request that took it (that would make the
    # socket on this request's path).
    unsent = len(client._core.hostmap._touched)
    again = client.encode_ordinary(suffix, prefix=prefix)
    print(json.dumps({"exact": tokens == again == enc.encode_ordinary(prefix + suffix),
                      "source": source, "unsent": unsent, "stats": client.stats()}))
    client.close()
    """
)


def run_worker(code: str, payload: list, env: dict[str, str] | None = None) -> dict:
    """A new worker process running ``code`` on ``payload`` (JSON on its stdin): its JSON."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _fresh_worker(address: str, prefix: str, suffix: str) -> dict:
    return run_worker(FRESH_WORKER, [address, prefix, suffix])


HELD_PREFIX = "System: be exact; écrivez clairement; 注意 1,234.5 's\n\n " * 300
SUFFIXES = ["", " Q?", "s", "'s more", "\n\n", " 中文", "<|endoftext|>", "1"]


def holding_daemon(start_daemon: Callable[..., DaemonProcess]) -> DaemonProcess:
    """A daemon whose map holds ``HELD_PREFIX``."""
    daemon = start_daemon()
    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS, min_uses=1) as filler:
        filler.encode_ordinary(" Q?", prefix=HELD_PREFIX)  # a miss: the daemon fills it
    wait_until(lambda: daemon.stats()["map_curr_items"] == 1, 30, "the fill never landed")
    return daemon


def test_a_fresh_workers_first_request_is_a_map_hit_also_with_the_daemon_frozen(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    daemon = holding_daemon(start_daemon)
    prefix, suffixes = HELD_PREFIX, SUFFIXES
    for suffix in suffixes:
        got = _fresh_worker(daemon.address, prefix, suffix)
        assert got["exact"] and got["source"] == "map" and got["unsent"] == 1, got
    daemon.signal(signal.SIGSTOP)
    try:
        for suffix in suffixes[:3]:
            got = _fresh_worker(daemon.address, prefix, suffix)
            assert got["exact"] and got["source"] == "map", got
            assert got["stats"]["timeouts"] == 0 and got["stats"]["fallbacks"] == 0, got
    finally:
        daemon.signal(signal.SIGCONT)


def _fast_backend() -> str:
    for name, module in (("toktok", "toktok"), ("gigatoken", "gigatoken")):
        try:
            __import__(module)
        except ImportError:
            continue
        from flashtoken.backends import get_encoder

        if get_encoder(ENC, name).backend == name:
            return name
    pytest.skip("no fast backend installed that passes its gate")


short_texts = st.text(st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["", " ", "'s", "<|endoftext|>", "<|endof", "text|>", "\n\n", "中Za", "a's"]
)


@settings(max_examples=150, deadline=None)
@given(prefix=short_texts, suffix=short_texts)
def test_a_prefix_too_short_to_share_is_encoded_whole_and_exact(
    short_client: Client, prefix: str, suffix: str
) -> None:
    enc = get_encoding(ENC)
    for _ in range(2):  # whole, then (seen twice) from the L1
        assert short_client.encode_ordinary(suffix, prefix=prefix) == enc.encode_ordinary(
            prefix + suffix
        )
        assert short_client.last_source in ("whole", "local", "l1")
        for allowed in (frozenset(), "all"):
            try:
                want = enc.encode(prefix + suffix, allowed_special=allowed)
            except ValueError:
                with pytest.raises(ValueError):
                    short_client.encode(suffix, prefix=prefix, allowed_special=allowed)
                continue
            assert short_client.encode(suffix, prefix=prefix, allowed_special=allowed) == want


@pytest.fixture(scope="module")
def short_client(shared_daemon: DaemonProcess) -> Iterator[Client]:
    client = Client(shared_daemon.address, ENC, timeout_ms=TIMEOUT_MS, backend=_fast_backend())
    yield client
    client.close()


def test_short_prefixes_never_leave_the_worker(
    short_client: Client, shared_daemon: DaemonProcess
) -> None:
    """After the property test above: nothing was asked for, filled or sighted."""
    stats = shared_daemon.stats()
    assert stats["get_hits"] + stats["get_misses"] == 0 and stats["fills"] == 0, stats
    assert short_client.stats()["map_hits"] == 0 and short_client.stats()["short_prefixes"] > 0


def test_the_threshold_follows_the_backend_and_the_setting(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    backend = _fast_backend()
    daemon = start_daemon()
    enc = get_encoding(ENC)
    prefix = "You are a helpful assistant. " * 20  # 580 bytes: below a fast backend's threshold
    want = enc.encode_ordinary(prefix + " Q?")
    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS, backend=backend, l1_bytes=0) as off:
        sources = set()
        for _ in range(3):
            assert off.encode_ordinary(" Q?", prefix=prefix) == want
            sources.add(off.last_source)
        assert sources == {"whole"}  # no L1 to hold it: whole every time, never looked up
        assert off.stats()["short_prefixes"] == 3
    options = {"timeout_ms": TIMEOUT_MS, "min_uses": 1, "share_min_bytes": 0}
    with Client(daemon.address, ENC, backend=backend, **options) as shared:
        assert shared.encode_ordinary(" Q?", prefix=prefix) == want
        assert shared.stats()["short_prefixes"] == 0  # asked for, as any prefix
    with Client(daemon.address, ENC, timeout_ms=TIMEOUT_MS) as default:
        assert default.encode_ordinary(" Q?", prefix=prefix) == want
        assert default.stats()["short_prefixes"] == 0  # tiktoken's threshold is 0


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.integers(0, 60))
def test_too_short_to_share_counts_utf8_bytes(prefix: str, limit: int) -> None:
    from flashtoken.client.core import CLIENT_DEFAULTS, ClientCore

    core = ClientCore(dict(CLIENT_DEFAULTS, encoding=ENC, share_min_bytes=limit))
    size = len(prefix.encode("utf-8", "surrogatepass"))
    assert core.too_short_to_share(prefix) == (size < limit)
