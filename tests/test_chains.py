"""flashtoken/chains.py on its own, under each choice of token storage and confirmation.

A chain is built the way its users build one (block cuts of tiktoken's own encoding of a text),
then another text is looked up block by block with ``ChainStore.step`` and encoded as the head
of its matched path plus one tiktoken call on the rest. Whatever was stored, whatever collides,
whatever the budget evicted, the ids are tiktoken's for the whole text.
"""

from __future__ import annotations

import os
import random
from array import array
from collections.abc import Callable, Hashable
from typing import Any

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from flashtoken import get_encoding
from flashtoken.blocks import block_cuts, token_byte_lengths
from flashtoken.boundary import cut_rule
from flashtoken.chains import BlockBytes, ChainStore, Decoded, FrameTokens, ListTokens, Node
from flashtoken.specials import ORDINARY
from flashtoken.wire import tokens_from_frame, tokens_to_frame
from tests.strategies import ATOMS

ENC = get_encoding("cl100k_base")
RULE = cut_rule(ENC)
LENGTHS = token_byte_lengths(ENC)
BLOCK = 64
SCOPE = "cl100k_base/ordinary"
EXAMPLES = int(os.environ.get("FLASHTOKEN_HYPOTHESIS_EXAMPLES", "60"))


class Choice:
    """One way to build the store: how tokens are held, joined and confirmed."""

    def __init__(
        self, name: str, make: Callable[[int], ChainStore], keep: Callable, join: Callable
    ):
        self.name, self.make, self.keep, self.join = name, make, keep, join

    def __repr__(self) -> str:
        return self.name


def _decoder(scope: Hashable) -> Callable[[bytes], bytes]:
    return lambda frame: ENC.decode_bytes(tokens_from_frame(frame))


CHOICES = [
    Choice(
        "lists+bytes",
        lambda budget: ChainStore(budget, ListTokens(), BlockBytes(), overhead=160),
        ListTokens.keep,
        lambda parts: [t for p in parts for t in p],
    ),
    Choice(
        "frames+decoded",
        lambda budget: ChainStore(budget, FrameTokens(), Decoded(_decoder, b"".join), overhead=512),
        lambda tokens: tokens_to_frame(array("I", tokens)),
        lambda parts: list(tokens_from_frame(b"".join(parts))),
    ),
]


def _keys(data: bytes, key_bits: int | None) -> list[Hashable]:
    """The key of each full block: the digest of the text up to its end (``key_bits``: only
    that many bits of it, so that blocks of different texts collide)."""
    state, out = xxhash.xxh3_128(), []
    for end in range(BLOCK, len(data) + 1, BLOCK):
        state.update(data[end - BLOCK : end])
        digest = state.intdigest()
        out.append(digest if key_bits is None else digest % (1 << key_bits))
    return out


def walk(store: ChainStore, data: bytes, key_bits: int | None) -> list[Node]:
    path: list[Node] = []
    for i, key in enumerate(_keys(data, key_bits)):
        node = store.step(path[-1] if path else None, key, SCOPE, data, i * BLOCK, (i + 1) * BLOCK)
        if node is None:
            break
        path.append(node)
    return path[: store.confirm(data, path, 0)]


def encode(store: ChainStore, choice: Choice, text: str, key_bits: int | None = None) -> list[int]:
    """The ids of ``text`` from the chain store: its matched path's tokens, then tiktoken on
    the rest; the blocks after the path recorded, as AutoPrefixCache does."""
    data = text.encode("utf-8")
    path = walk(store, data, key_bits)
    if path:
        store.use(path[-1])
    parent = path[-1] if path else None
    cut = parent.cut if parent else 0
    cut_byte = parent.cut_byte if parent else 0
    tail = ENC.encode_ordinary(text[cut:])
    keys = _keys(data, key_bits)
    cuts = block_cuts(
        RULE, ORDINARY, LENGTHS, text, data, BLOCK, len(path), len(keys), cut, cut_byte, tail
    )
    added: list[Node] = []
    taken = 0
    for i, (c, cb, n) in enumerate(cuts, len(path)):
        before = added[-1] if added else parent
        tokens = choice.keep(tail[taken:n])
        added.append(
            store.node(keys[i], before, SCOPE, data, i * BLOCK, (i + 1) * BLOCK, c, cb, tokens)
        )
        taken = n
    store.add(parent, added)
    return choice.join([node.tokens for node in path]) + tail


def _check_invariants(store: ChainStore) -> None:
    assert store.bytes == sum(store.size(n) for n in store.nodes.values()) <= store.max_bytes
    for node in store.nodes.values():
        if node.parent is not None:
            assert store.holds(node.parent)  # leaves go first: a held node's path is held
        assert node.children == sum(1 for n in store.nodes.values() if n.parent is node)


chat_turns = st.lists(
    st.lists(
        st.sampled_from([a for a in ATOMS if "\ud83d" not in a and "\ude00" not in a]), max_size=40
    ).map("".join),
    min_size=1,
    max_size=6,
)


@pytest.mark.parametrize("choice", CHOICES, ids=repr)
@settings(max_examples=EXAMPLES, deadline=None)
@given(
    turns=chat_turns,
    budget=st.sampled_from([2_000, 20_000, 1 << 24]),
    bits=st.sampled_from([None, 2]),
)
def test_every_lookup_is_exact(
    choice: Choice, turns: list[str], budget: int, bits: int | None
) -> None:
    """A growing chat and its rewrites, under budgets that evict and keys that collide."""
    store = choice.make(budget)
    history = "System: answer in one line.\n" * 6
    for turn in turns:
        for text in (history + turn, history + turn + "\nassistant:"):
            assert encode(store, choice, text, bits) == ENC.encode_ordinary(text)
            _check_invariants(store)
        history += turn


@pytest.mark.parametrize("choice", CHOICES, ids=repr)
def test_a_collision_is_refused_and_kept(choice: Choice) -> None:
    """Every key collides (0 bits): a node under a text's key that holds other bytes is never
    used, is counted, and stays (replacing it would let anyone evict another's chain)."""
    store = choice.make(1 << 24)
    first = "The first tenant's long system prompt, with its own words. " * 4
    other = "A different tenant's prompt that shares none of those bytes! " * 4
    assert encode(store, choice, first, 0) == ENC.encode_ordinary(first)
    held = dict(store.nodes)
    assert encode(store, choice, other, 0) == ENC.encode_ordinary(other)
    assert store.collisions > 0 and store.nodes == held
    assert encode(store, choice, first + " more", 0) == ENC.encode_ordinary(first + " more")


@pytest.mark.parametrize("choice", CHOICES, ids=repr)
def test_twins_are_followed_and_the_budget_holds(choice: Choice) -> None:
    rng = random.Random(7)
    store = choice.make(30_000)
    texts = [
        "".join(rng.choice(ATOMS[:40]) for _ in range(rng.randrange(50, 400))) for _ in range(40)
    ]
    for text in texts + texts[::-1]:
        count = len(store)
        assert encode(store, choice, text) == ENC.encode_ordinary(text)
        _check_invariants(store)
        assert encode(store, choice, text) == ENC.encode_ordinary(text)
        assert len(store) <= count + len(text.encode()) // BLOCK  # the second time: nothing new
    assert store.evictions > 0
    assert store.evictions + len(store) == store.total_items


def test_decoded_refuses_tokens_that_spell_other_bytes() -> None:
    """A node whose bytes after its cut match but whose tokens spell another head is refused
    (the daemon's confirmation: the head is its tokens, decoded)."""
    choice = CHOICES[1]
    store = choice.make(1 << 24)
    text = "alpha beta gamma delta " * 10
    encode(store, choice, text)
    root = next(n for n in store.nodes.values() if n.parent is None)
    root.tokens = tokens_to_frame(array("I", ENC.encode_ordinary("ALPHA" + text[5 : root.cut])))
    data = text.encode()
    path = walk(store, data, None)
    assert path == [] and store.collisions == 1


@pytest.mark.parametrize("choice", CHOICES, ids=repr)
def test_a_declared_prefix_is_a_chain_of_one_block(choice: Choice) -> None:
    """A root whose block is the whole prefix: found and confirmed by the same step, its head
    the tokens before its stable cut."""
    from flashtoken import split_prefix

    store = choice.make(1 << 20)
    prefix = "You are a careful assistant. Think, then answer."
    data = prefix.encode()
    split = split_prefix(ENC, prefix)
    cut_byte = len(prefix[: split.cut].encode())
    node = store.node(
        "p", None, SCOPE, data, 0, len(data), split.cut, cut_byte, choice.keep(split.head)
    )
    assert store.add_root(node)
    found = store.step(None, "p", SCOPE, data, 0, len(data))
    assert found is node and store.confirm(data, [node], 0) == 1
    head: Any = choice.join([found.tokens])
    assert head + ENC.encode_ordinary(prefix[found.cut :] + "!") == ENC.encode_ordinary(
        prefix + "!"
    )
    other = prefix.replace("careful", "careless").encode()
    assert store.step(None, "p", SCOPE, other, 0, len(other)) is None
