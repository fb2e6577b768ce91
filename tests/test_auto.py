"""AutoPrefixCache: any text, exact, reusing the longest cached prefix."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashtoken import AutoPrefixCache
from tests.strategies import texts

POLICIES = [(frozenset(), "all"), ("all", ()), (frozenset(), ())]


def outcome(fn):
    try:
        return "tokens", fn()
    except ValueError as exc:
        return "error", str(exc)


@given(
    pieces=st.lists(texts, min_size=1, max_size=6),
    data=st.data(),
    block=st.sampled_from([16, 32, 64]),
)
def test_texts_sharing_prefixes_encode_as_tiktoken(enc, pieces, data, block):
    cache = AutoPrefixCache(enc, block_bytes=block)
    seen = []
    for piece in pieces:
        base = data.draw(st.sampled_from(seen)) if seen else ""
        text = base[: data.draw(st.integers(0, len(base)))] + piece * 3
        seen.append(text)
        assert cache.encode_ordinary(text) == enc.encode_ordinary(text)
        allowed, disallowed = data.draw(st.sampled_from(POLICIES))
        kwargs = dict(allowed_special=allowed, disallowed_special=disallowed)
        assert outcome(lambda: cache.encode(text, **kwargs)) == outcome(
            lambda: enc.encode(text, **kwargs)
        )


@given(data=st.data(), block=st.sampled_from([16, 64, 512]))
def test_rewritten_tails_near_and_far_from_the_end(enc, data, block):
    """The last lookup's path is reused from the characters two texts share: a text that
    extends the last one, rewrites its last few characters, its last few KB, or more."""
    cache = AutoPrefixCache(enc, block_bytes=block)
    text = ""
    for _ in range(data.draw(st.integers(1, 8))):
        back = data.draw(st.sampled_from([len(text), 80, 5000]))  # anywhere, near, far
        keep = data.draw(st.integers(max(0, len(text) - back), len(text)))
        text = text[:keep] + data.draw(texts) * data.draw(st.integers(1, 200))
        assert cache.encode_ordinary(text) == enc.encode_ordinary(text)
    assert cache.encode_ordinary(text) == enc.encode_ordinary(text)  # from the memo


def test_a_growing_chat_reuses_its_history(enc):
    cache = AutoPrefixCache(enc, block_bytes=64)
    history = "<|im_start|>system\nYou are brief.<|im_end|>\n"
    for turn in range(30):
        history += f"<|im_start|>user\nQuestion number {turn}?<|im_end|>\n"
        rendered = history + "<|im_start|>assistant\n"  # rewritten every turn
        assert cache.encode_ordinary(rendered) == enc.encode_ordinary(rendered)
        history += f"<|im_start|>assistant\nAnswer {turn}.<|im_end|>\n"
    stats = cache.stats()
    assert stats["reused_bytes"] > 5 * stats["encoded_bytes"]


def test_memory_stays_within_max_bytes_and_results_stay_exact(enc):
    cache = AutoPrefixCache(enc, block_bytes=32, max_bytes=4000)
    for i in range(40):
        text = f"document {i}: " + "lorem ipsum dolor sit amet " * 10
        assert cache.encode_ordinary(text) == enc.encode_ordinary(text)
        assert cache.stats()["bytes"] <= 4000
    assert cache.stats()["evictions"] > 0


class _ClumsyHash:
    """A digest with 4 possible values: every lookup collides with another text's block."""

    def __init__(self):
        self._n = 0

    def update(self, data):
        self._n = (self._n + len(bytes(data))) % 4

    def intdigest(self):
        return self._n

    def copy(self):
        twin = _ClumsyHash()
        twin._n = self._n
        return twin


def test_digest_collisions_never_hand_out_another_texts_tokens(enc):
    cache = AutoPrefixCache(enc, block_bytes=16)
    cache._hasher = _ClumsyHash  # test-only: shrink the key space to force collisions
    for i in range(50):
        text = f"tenant {i % 7} secret prompt number {i * 7919} with words " * 2
        assert cache.encode_ordinary(text) == enc.encode_ordinary(text)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="block_bytes"):
        AutoPrefixCache("cl100k_base", block_bytes=4)
    with pytest.raises(ValueError, match="max_bytes"):
        AutoPrefixCache("cl100k_base", max_bytes=-1)
    with pytest.raises(TypeError, match="text must be a str"):
        AutoPrefixCache("cl100k_base").encode_ordinary(None)


def test_threads_sharing_one_cache_stay_exact(enc):
    """Threads encode overlapping chats through one cache (tiktoken releases the GIL, so the
    lookups, records and evictions interleave), some with a budget small enough to evict."""
    import random
    import threading

    texts = []
    for seed in range(4):
        rng = random.Random(seed)
        history = "<|im_start|>system\nShared system prompt, long enough for blocks.<|im_end|>\n"
        for turn in range(25):
            history += f"<|im_start|>user\n{rng.random()} é 中文 {turn}<|im_end|>\n"
            texts.append(history + "<|im_start|>assistant\n")
    for max_bytes in (64 * 2**20, 3000):
        cache = AutoPrefixCache(enc, block_bytes=32, max_bytes=max_bytes)
        wrong: list[str] = []

        def work(seed: int) -> None:
            rng = random.Random(seed)
            for text in rng.sample(texts, len(texts)):
                if cache.encode_ordinary(text) != enc.encode_ordinary(text):
                    wrong.append(text)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = cache.stats()
        assert wrong == [] and stats["bytes"] <= max_bytes and stats["reused_bytes"] > 0
        assert stats["evictions"] > 0 or max_bytes > 3000
