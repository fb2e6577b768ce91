"""A client records a text's new blocks on its follower's thread, off the request's path; the
next lookup and ``stats`` first finish what is left, so a process always sees its own texts."""

from __future__ import annotations

import threading

import pytest
from flashtoken.client import Client

from flashtoken import get_encoding
from tests.daemon_fixtures import DaemonProcess
from tests.test_tell_states import long_chat

pytestmark = pytest.mark.timeout(120)


def test_the_next_text_finds_the_last_ones_blocks(daemon: DaemonProcess) -> None:
    enc = get_encoding("cl100k_base")
    texts = long_chat(12, 3)
    with Client(daemon.address, "cl100k_base", timeout_ms=5000) as client:
        chains = client._core.chains
        for i, text in enumerate(texts):
            before = chains.auto.stats()
            assert client.encode_ordinary(text) == enc.encode_ordinary(text)
            if i >= 2:  # the follower runs by now: the record waited for it or for us
                assert chains.follower is not None
            after = client.stats()  # finishes the record first
            assert after["auto_l1_items"] >= before["curr_items"]
            stats = chains.auto.stats()
            assert stats["lookups"] == before["lookups"] + 1  # recorded, once
            if i:  # only the new turn (and the rewritten last block) was encoded
                assert stats["encoded_bytes"] - before["encoded_bytes"] < 4096
        assert not chains._unrecorded


def test_threads_sharing_a_client_stay_exact(daemon: DaemonProcess) -> None:
    enc = get_encoding("cl100k_base")
    texts = long_chat(16, 4)
    wrong: list[int] = []
    with Client(daemon.address, "cl100k_base", timeout_ms=5000) as client:

        def run(offset: int) -> None:
            for i in range(offset, len(texts), 2):
                if client.encode_ordinary(texts[i]) != enc.encode_ordinary(texts[i]):
                    wrong.append(i)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for text in texts:  # and once more, from what every thread recorded
            assert client.encode_ordinary(text) == enc.encode_ordinary(text)
        assert client.stats()["auto_l1_items"] > 0
    assert wrong == []
