"""Forking while threads run every client path: each child answers, exactly (issue 11).

A lock a parent's thread holds at ``fork()`` stays held in the child forever. The clients and
``AutoPrefixCache`` re-make theirs in the child (``os.register_at_fork``) and check the pid before
taking any. Here parent threads run every path (sync and asyncio, with and without a prefix, with
a daemon and without one) while the main thread forks children that each run every path once.
A child that hangs is killed at a generous deadline and fails the test; nothing is timed.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import random
import signal
import threading
import warnings
from collections.abc import Callable

import pytest
from flashtoken.client import AsyncClient, Client

from flashtoken import AutoPrefixCache, get_encoding
from tests.daemon_fixtures import DaemonProcess
from tests.polling import poll

CHILDREN = 24
CHILD_DEADLINE = 60.0  # s: a child doing a dozen encodes; only a deadlock comes near it

enc = get_encoding("cl100k_base")
HISTORY = "".join(f"user: question {i} about forks?\nassistant: answer {i}.\n" for i in range(150))
PREFIX = "You are a careful assistant. " * 60


def _texts(rng: random.Random) -> tuple[str, str]:
    cut = rng.randrange(len(HISTORY) // 2, len(HISTORY))
    return HISTORY[:cut] + f" turn {rng.random()}", f" suffix {rng.random()}"


def _paths(
    sync: Client, down: Client, aio: AsyncClient, auto: AutoPrefixCache, rng: random.Random
) -> list[tuple[str, Callable[[], list[int]], list[int]]]:
    """(name, call, tiktoken's answer) for every path."""
    text, suffix = _texts(rng)
    special = text + "<|endoftext|>"
    calls: list[tuple[str, Callable[[], list[int]], list[int]]] = [
        ("sync prefix", lambda: sync.encode_ordinary(suffix, prefix=PREFIX + text[:40]), []),
        ("sync auto", lambda: sync.encode_ordinary(text), []),
        ("sync auto special", lambda: sync.encode(special, allowed_special="all"), []),
        ("down prefix", lambda: down.encode_ordinary(suffix, prefix=PREFIX), []),
        ("down auto", lambda: down.encode_ordinary(text), []),
        ("cache", lambda: auto.encode_ordinary(text), []),
        (
            "async prefix",
            lambda: asyncio.run(aio.encode_ordinary(suffix, prefix=PREFIX + text[-30:])),
            [],
        ),
        ("async auto", lambda: asyncio.run(aio.encode_ordinary(text)), []),
    ]
    expected = {
        "sync prefix": enc.encode_ordinary(PREFIX + text[:40] + suffix),
        "down prefix": enc.encode_ordinary(PREFIX + suffix),
        "async prefix": enc.encode_ordinary(PREFIX + text[-30:] + suffix),
        "sync auto special": enc.encode(special, allowed_special="all"),
    }
    return [(name, call, expected.get(name, enc.encode_ordinary(text))) for name, call, _ in calls]


def _wait_child(pid: int) -> int | None:
    """The child's exit code, or None if it did not exit by the deadline (then it is killed)."""

    def exited() -> tuple[int, int] | None:
        done = os.waitpid(pid, os.WNOHANG)
        return done if done[0] else None

    found = poll(exited, CHILD_DEADLINE, 0.01)
    if found is not None:
        return os.waitstatus_to_exitcode(found[1])
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # 3.12+: fork with threads
def test_children_forked_while_threads_run_every_path_answer_exactly(daemon: DaemonProcess) -> None:
    sync = Client(daemon.address, timeout_ms=200, breaker_failures=10**6)
    down = Client(f"ipc://{daemon.directory}/nobody.sock", timeout_ms=5)
    aio = AsyncClient(daemon.address, timeout_ms=200, breaker_failures=10**6)
    auto = AutoPrefixCache(enc, block_bytes=64)
    stop = threading.Event()
    wrong: list[str] = []

    def hammer(seed: int, names: set[str]) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            for name, call, expected in _paths(sync, down, aio, auto, rng):
                if name in names and call() != expected:
                    wrong.append(name)

    groups = [
        {"sync prefix", "sync auto"},
        {"sync auto special", "cache"},
        {"down prefix", "down auto", "cache"},
        {"sync auto", "cache"},
    ]
    threads = [threading.Thread(target=hammer, args=(i, g)) for i, g in enumerate(groups)]
    # The asyncio client on a loop of its own in a thread: both of its paths, many tasks.
    loop = asyncio.new_event_loop()

    async def async_hammer() -> None:
        rng = random.Random(99)
        while not stop.is_set():
            text, suffix = _texts(rng)
            got = await asyncio.gather(
                aio.encode_ordinary(text), aio.encode_ordinary(suffix, prefix=PREFIX)
            )
            if got != [enc.encode_ordinary(text), enc.encode_ordinary(PREFIX + suffix)]:
                wrong.append("async")

    threads.append(threading.Thread(target=lambda: loop.run_until_complete(async_hammer())))
    for thread in threads:
        thread.start()
    outcomes: list[int | None] = []
    try:
        for i in range(CHILDREN):
            # Forked at whatever point the threads are: often inside a lock.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # the child: exit with the verdict, never return into pytest
                code = 3
                try:
                    # A hung child shows where before it is killed (on the test's stderr).
                    faulthandler.dump_traceback_later(CHILD_DEADLINE - 15, exit=True)
                    paths = _paths(sync, down, aio, auto, random.Random(1000 + i))
                    bad = [name for name, call, expected in paths if call() != expected]
                    code = 0 if not bad else 2
                finally:
                    os._exit(code)
            outcomes.append(_wait_child(pid))
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        loop.close()
        for client in (sync, down, aio):
            client.close()
    hung = outcomes.count(None)
    assert hung == 0, f"{hung} of {CHILDREN} children hung: {outcomes}"
    # 1: hung (faulthandler printed its stack above), 2: a wrong answer, 3: an exception
    assert outcomes == [0] * CHILDREN, outcomes
    assert not wrong, wrong
    assert not any(thread.is_alive() for thread in threads)
