"""``backend=`` on the Client and ``--backend`` on the daemon: exact with each installed backend.

The real daemon (a separate process on an ipc:// socket), the real host map, real clients.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import pytest
from flashtoken.client import Client
from flashtoken.client.settings import client_settings

from flashtoken import get_encoding
from tests.corpus import CORPUS, splits
from tests.daemon_fixtures import DaemonProcess, wait_until

pytestmark = pytest.mark.timeout(120)

TIMEOUT_MS = 5000
INSTALLED = [
    name
    for name, module in (("toktok", "toktok"), ("gigatoken", "gigatoken"))
    if importlib.util.find_spec(module) is not None
]
BACKENDS = ["tiktoken", *INSTALLED, "fastest"]


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _expected(backend: str) -> str:
    """The backend in use for cl100k_base: each installed one passes its gate here."""
    return backend if backend != "fastest" else (INSTALLED + ["tiktoken"])[0]


def test_the_client_setting_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert client_settings("Client", {})["backend"] == "tiktoken"
    monkeypatch.setenv("FLASHTOKEN_BACKEND", "fastest")
    assert client_settings("Client", {})["backend"] == "fastest"
    assert client_settings("Client", {"backend": "tiktoken"})["backend"] == "tiktoken"
    monkeypatch.setenv("FLASHTOKEN_BACKEND", "nonesuch")
    with pytest.raises(ValueError, match="FLASHTOKEN_BACKEND"):
        client_settings("Client", {})


_SHARED: dict[str, Any] = {"timeout_ms": TIMEOUT_MS, "min_uses": 1, "share_min_bytes": 0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_client_and_a_daemon_with_a_backend_are_exact(
    start_daemon: Callable[..., DaemonProcess], backend: str
) -> None:
    """Misses (local, whole text), fills (the daemon's backend), L2 and L1 hits, automatic
    reuse: every answer is tiktoken's, with the backend on both sides."""
    name = "cl100k_base"
    enc = get_encoding(name)
    daemon = start_daemon("--backend", backend, encodings=name)
    pairs = [pair for text in CORPUS[::3] for pair in splits(text)][::5]
    pairs += [("You are a helpful assistant. " * 40, " Answer: é 中文 👋 <|endoftext|>")]
    with (
        # share_min_bytes=0: the corpus's short prefixes go to the daemon too (its hits tested).
        Client(daemon.address, name, **_SHARED, backend=backend) as a,
        Client(daemon.address, name, **_SHARED, backend=backend) as b,
    ):
        assert a.stats()["backend"] == _expected(backend)
        for prefix, suffix in pairs:  # misses: encoded here, fills asked for
            assert a.encode_ordinary(suffix, prefix=prefix) == enc.encode_ordinary(prefix + suffix)
        wait_until(lambda: daemon.stats()["fills_pending"] == 0, 60, "fills never finished")
        for prefix, suffix in pairs:  # the daemon's splits (hits), then the L1's
            for _ in range(2):
                want = enc.encode_ordinary(prefix + suffix)
                assert b.encode_ordinary(suffix, prefix=prefix) == want, (prefix, suffix)
                assert b.count_ordinary(suffix, prefix=prefix) == len(want)
        fills = [p for p, _ in pairs if _utf8(p)]
        assert b.stats()["l2_hits"] >= len(set(fills)) // 2  # the daemon's splits were used
        for text in CORPUS[::4]:  # automatic reuse: the L1 chain, the daemon's, local encodes
            for extra in ("", " and more", text):
                assert a.encode_ordinary(text + extra) == enc.encode_ordinary(text + extra)
    assert daemon.stats()["backend_in_use"] == [f"{name}={_expected(backend)}"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_daemon_reports_its_backend(
    start_daemon: Callable[..., DaemonProcess], backend: str
) -> None:
    daemon = start_daemon("--backend", backend, encodings="cl100k_base")
    with Client(daemon.address, "cl100k_base", timeout_ms=TIMEOUT_MS) as client:
        reply = client.daemon_stats(timeout_ms=TIMEOUT_MS)
    assert reply["settings"]["backend"] == backend
    assert reply["stats"]["backend_in_use"] == [f"cl100k_base={_expected(backend)}"]


def test_the_daemon_refuses_an_unknown_backend(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    with pytest.raises(Exception, match="backend"):
        start_daemon("--backend", "nonesuch", encodings="cl100k_base")
