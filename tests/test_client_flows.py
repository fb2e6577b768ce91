"""The clients' flows (client/flows.py) stepped by hand, and the clients' typed settings.

A flow is a generator over a real ``ClientCore``: a test plays the driver, so the order of the
steps (the L1 checked again under the lock, the breaker's probe taken only under it) is
checked deterministically, without racing two threads for a lock.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("zmq")

from flashtoken.client import AsyncClient, Client  # noqa: E402
from flashtoken.client.breaker import Breaker  # noqa: E402
from flashtoken.client.core import ClientCore  # noqa: E402
from flashtoken.client.flows import Acquire, Drop, Release, Send, _touch, fetch_prefix  # noqa: E402
from flashtoken.client.l1 import l1_key  # noqa: E402
from flashtoken.client.requests import RequestContext  # noqa: E402
from flashtoken.client.settings import CLIENT_SETTINGS, client_settings  # noqa: E402

from flashtoken import get_encoding  # noqa: E402
from flashtoken.prefix import FixedPrefixTokenCache  # noqa: E402

PREFIX = "You are a helpful assistant. " * 20


def _core(tmp_path: Path, **given: Any) -> ClientCore:
    settings = client_settings("test", dict(given, encoding="cl100k_base", min_uses=1))
    core = ClientCore(settings)
    core.attach(f"ipc://{tmp_path}/none.sock")
    return core


def _step(flow: Any, result: Any = None) -> Any:
    try:
        return flow.send(result)
    except StopIteration as stop:
        return ("returned", stop.value)


def test_the_l1_is_checked_again_under_the_lock(tmp_path: Path) -> None:
    core = _core(tmp_path)
    key = l1_key(PREFIX, frozenset())
    flow = fetch_prefix(core, PREFIX, frozenset(), key, False)
    assert _step(flow) == Acquire(core.timeout)
    # While this caller waited for the socket, the one holding it put the prefix in the L1.
    theirs = FixedPrefixTokenCache(get_encoding("cl100k_base"), PREFIX)
    core.l1.put(key, theirs)
    assert _step(flow, True) == Release()
    assert _step(flow) == ("returned", (theirs, "l1"))
    assert core.counters["fallbacks"] == 0  # no request prepared, none sent


def test_a_half_open_breaker_keeps_its_probe_for_a_caller_that_gets_the_lock(
    tmp_path: Path,
) -> None:
    core = _core(tmp_path)
    for _ in range(core.breaker.threshold):
        core.breaker.failure()
    core.breaker.open_until = 0.0  # the cool-down is over: one probe may go out
    assert core.breaker.state == "half-open"
    key = l1_key(PREFIX, frozenset())
    busy = fetch_prefix(core, PREFIX, frozenset(), key, False)
    assert _step(busy) == Acquire(core.timeout)
    kind, (cache, source) = _step(busy, False)  # the socket stayed busy for the whole budget
    assert kind == "returned" and source == "local"
    assert cache.encode_ordinary("!") == get_encoding("cl100k_base").encode_ordinary(PREFIX + "!")
    # The probe was not taken by the caller that never sent it: the next one may send it.
    assert core.breaker.state == "half-open"
    again = fetch_prefix(core, "another " + PREFIX, frozenset(), "another " + PREFIX, False)
    assert _step(again) == Acquire(core.timeout)
    step = _step(again, True)
    assert isinstance(step, Send) and step.deadline is not None
    assert core.breaker.state == "probing"


def test_a_socket_error_is_a_failure_and_drops_the_socket(tmp_path: Path) -> None:
    core = _core(tmp_path)
    key = l1_key(PREFIX, frozenset())
    flow = fetch_prefix(core, PREFIX, frozenset(), key, False)
    assert _step(flow) == Acquire(core.timeout)
    assert isinstance(_step(flow, True), Send)
    import zmq

    assert flow.throw(zmq.ZMQError(zmq.ENOTSOCK)) == Drop()
    assert _step(flow) == Release()
    kind, (_, source) = _step(flow)
    assert (kind, source) == ("returned", "local")
    assert core.counters["errors"] == 1 and core.breaker.failures == 1


def test_a_touch_that_could_not_be_sent_goes_with_the_next(tmp_path: Path) -> None:
    """A report that fell due on a socket still connecting (its one try failed) is kept, not
    dropped: a worker's first map hits used to go uncounted by the daemon that way."""
    core = _core(tmp_path)
    assert core.hostmap is not None
    core.hostmap.sighted(b"k" * 16)  # due at once: sightings go within 50 ms
    flow = _touch(core, False)
    assert _step(flow) == Acquire(None)
    send = _step(flow, True)
    assert isinstance(send, Send) and send.deadline is None and send.frames[-1] == b"k" * 16
    assert _step(flow, False) == Release()  # not sent (ZMQ_IMMEDIATE: not connected yet)
    assert _step(flow) == ("returned", None)
    core.hostmap.sighted(b"j" * 16)
    again = core.touch_request(closing=True)
    assert again is not None and again.keys == b"k" * 16 + b"j" * 16
    assert core.touch_request(closing=True) is None  # each key reported once


def test_request_ids_are_unique_across_threads() -> None:
    context = RequestContext(get_encoding("cl100k_base"), b"", True)
    taken: list[list[int]] = [[] for _ in range(4)]

    def take(out: list[int]) -> None:
        for _ in range(5000):
            out.append(context.next_id())

    threads = [threading.Thread(target=take, args=(out,)) for out in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [i for out in taken for i in out]
    assert len(set(ids)) == len(ids) == 20000 and 0 not in ids


# -- typed settings ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Client, AsyncClient], ids=lambda c: c.__name__)
def test_the_signature_is_the_settings_table(cls: type) -> None:
    params = inspect.signature(cls).parameters
    assert list(params) == [s.name for s in CLIENT_SETTINGS]
    for setting in CLIENT_SETTINGS:
        param = params[setting.name]
        # None: "not given", so that FLASHTOKEN_* applies; the table holds the real default.
        assert param.default is None, setting.name
        positional = setting.name in ("address", "encoding")
        assert (param.kind == param.POSITIONAL_OR_KEYWORD) is positional, setting.name
        assert param.kind == param.POSITIONAL_OR_KEYWORD or param.kind == param.KEYWORD_ONLY
        assert "None" in str(param.annotation), setting.name


@pytest.mark.parametrize("cls", [Client, AsyncClient], ids=lambda c: c.__name__)
def test_unset_keywords_take_the_tables_defaults(
    cls: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for setting in CLIENT_SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)
    client = cls(f"ipc://{tmp_path}/none.sock")
    try:
        for setting in CLIENT_SETTINGS:
            if setting.name != "address":
                assert client.settings[setting.name] == setting.default, setting.name
        assert client.settings["address"] == client.address == f"ipc://{tmp_path}/none.sock"
        defaults = {s.name: s.default for s in CLIENT_SETTINGS}
        assert client._core.timeout == defaults["timeout_ms"] / 1000
    finally:
        client.close()


def test_a_misspelt_keyword_fails_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="timeout_msec"):
        Client(f"ipc://{tmp_path}/none.sock", timeout_msec=5)  # type: ignore[call-arg]


def test_async_close_runs_without_a_loop(tmp_path: Path) -> None:
    client = AsyncClient(f"ipc://{tmp_path}/none.sock", "cl100k_base", min_uses=1)

    async def use() -> list[int]:
        return await client.encode_ordinary(" hi", prefix=PREFIX)

    assert asyncio.run(use()) == get_encoding("cl100k_base").encode_ordinary(PREFIX + " hi")
    client.close()  # no loop runs here: the closing flow needs none
    assert asyncio.run(use()) == get_encoding("cl100k_base").encode_ordinary(PREFIX + " hi")
    assert client.last_source is None  # this thread's context made no call itself


def test_the_breaker_opens_probes_and_backs_off() -> None:
    now = [0.0]
    breaker = Breaker(failures=2, cooldown=1.0, max_cooldown=3.0, clock=lambda: now[0])
    breaker.failure()
    assert breaker.allow() and breaker.state == "closed"
    breaker.failure()  # the second in a row: open for the cool-down
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 1.0
    assert breaker.state == "half-open"
    assert breaker.allow() and not breaker.allow()  # one probe, no second
    breaker.failure()  # the probe failed: open twice as long
    now[0] = 2.9
    assert not breaker.allow()
    now[0] = 3.0
    assert breaker.allow()
    breaker.failure()
    assert breaker.cooldown == 3.0  # capped at max_cooldown
    now[0] = 6.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.cooldown == 1.0 and breaker.allow()
