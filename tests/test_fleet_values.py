"""The fleet tier's value checks (daemon/fleetcodec.py, daemon/fleetspell.py) against tiktoken.

No server: these are the checks a value read from Valkey must pass before a host stores it. The
spelling check (numpy, word by word) must say exactly what ``decode_bytes(ids) == data`` says,
for every encoding, at every token length around its 8-byte words, and must hand special
tokens and unknown ids to tiktoken.
"""

from __future__ import annotations

import random
from array import array
from typing import Any

import pytest
from flashtoken.daemon.encodings import load
from flashtoken.daemon.fleetcodec import check_value, fleet_key, pack_value
from flashtoken.daemon.fleetspell import spells, table_for
from hypothesis import assume, given
from hypothesis import strategies as st

from flashtoken import tiktoken_parts
from flashtoken.prefix import split_prefix
from flashtoken.wire import tokens_to_frame
from tests.conftest import ENCODINGS
from tests.strategies import texts

pytest.importorskip("numpy")

SECRET = b"fleet-values-secret-0123456789ab"


@pytest.fixture(params=ENCODINGS, scope="module")
def loaded(request: Any) -> Any:
    return load(request.param)


def frame(ids: list[int]) -> bytes:
    return tokens_to_frame(array("I", ids))


def decoded_equal(loaded: Any, ids: list[int], data: bytes) -> bool:
    return loaded.enc.decode_bytes(ids) == data


def ordinary_ids(loaded: Any) -> list[int]:
    return sorted(tiktoken_parts.mergeable_ranks(loaded.enc).values())


def by_length(loaded: Any, length: int) -> list[int]:
    return [r for t, r in tiktoken_parts.mergeable_ranks(loaded.enc).items() if len(t) == length]


def signed(loaded: Any, text: str, allowed: tuple[str, ...] = ()) -> tuple[bytes, bytes, Any]:
    """The key and the value a host would write for ``text``, and its split."""
    data = text.encode()
    split = split_prefix(loaded.enc, text, allowed_special=frozenset(allowed))
    key = fleet_key(b"ft:", b"ns", loaded.eid, allowed, data)
    cut_byte = len(text[: split.cut].encode())
    value = pack_value(SECRET, key, frame(split.head), split.cut, cut_byte, len(data))
    return key, value, split


@given(text=texts, tail=texts)
def test_every_value_a_host_writes_passes(loaded: Any, text: str, tail: str) -> None:
    text += tail
    try:
        data = text.encode()
    except UnicodeEncodeError:
        assume(False)  # a lone surrogate: no client sends it as a prefix
    key, value, split = signed(loaded, text)
    found = check_value([SECRET], key, value, loaded, (), data, text)
    assert found is not None
    assert found.tokens == frame(split.head) and found.cut == split.cut
    assert found.cut_byte == len(text[: split.cut].encode())


@given(data=st.data())
def test_spelling_check_says_what_decode_bytes_says(loaded: Any, data: Any) -> None:
    """Random ordinary ids, then spelled right, one byte changed, two tokens swapped, a token
    dropped, or another text of the same length: the same answer as tiktoken's decode."""
    pool = ordinary_ids(loaded)
    ids = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=40))
    spelled = loaded.enc.decode_bytes(ids)
    table = table_for(loaded.eid, loaded.enc)
    cases = [spelled, spelled[:-1], spelled + b"x", bytes(len(spelled))]
    at = data.draw(st.integers(0, len(spelled) - 1)) if spelled else 0
    if spelled:
        cases.append(spelled[:at] + bytes([spelled[at] ^ 1]) + spelled[at + 1 :])
    for case in cases:
        assert spells(table, frame(ids), case) == decoded_equal(loaded, ids, case)
    i, j = data.draw(st.integers(0, len(ids) - 1)), data.draw(st.integers(0, len(ids) - 1))
    swapped = list(ids)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    assert spells(table, frame(swapped), spelled) == decoded_equal(loaded, swapped, spelled)
    dropped = ids[:i] + ids[i + 1 :]
    assert spells(table, frame(dropped), spelled) == decoded_equal(loaded, dropped, spelled)


@pytest.mark.parametrize("length", [1, 7, 8, 9, 15, 16, 17])
def test_every_byte_of_a_token_is_checked(loaded: Any, length: int) -> None:
    """Tokens at the edges of the 8-byte words: a change at any byte of any of them is seen."""
    rng = random.Random(length)
    pool = by_length(loaded, length)
    if not pool:
        pytest.skip(f"no token of {length} bytes")
    short = by_length(loaded, 3)
    ids = [rng.choice(short), rng.choice(pool), rng.choice(short), rng.choice(pool)]
    table = table_for(loaded.eid, loaded.enc)
    spelled = loaded.enc.decode_bytes(ids)
    assert spells(table, frame(ids), spelled) is True
    for at in range(len(spelled)):
        changed = spelled[:at] + bytes([spelled[at] ^ 0x20]) + spelled[at + 1 :]
        assert spells(table, frame(ids), changed) is False, at


def test_special_tokens_and_unknown_ids_go_to_tiktoken(loaded: Any) -> None:
    table = table_for(loaded.eid, loaded.enc)
    special = loaded.enc.encode("<|endoftext|>", allowed_special="all")
    ordinary = loaded.enc.encode_ordinary("hello")
    assert spells(table, frame(ordinary + special), b"hello<|endoftext|>") is None
    assert spells(table, frame([table.n + 5]), b"x") is None
    gaps = sorted(set(range(loaded.enc.n_vocab)) - set(ordinary_ids(loaded)))
    gaps = [g for g in gaps if g not in tiktoken_parts.special_tokens(loaded.enc).values()]
    for gap in gaps[:3]:  # an id between the ranks and the specials that no token has
        assert spells(table, frame([gap]), b"") is None
    assert spells(table, frame([]), b"") is True
    assert spells(table, frame([]), b"x") is False


def test_a_special_token_is_used_only_where_the_policy_allows_it(loaded: Any) -> None:
    text = "System: be brief.<|endoftext|> And then more text follows here, then a word"
    allowed = ("<|endoftext|>",)
    key, value, split = signed(loaded, text, allowed)
    assert set(split.head) & set(tiktoken_parts.special_tokens(loaded.enc).values())
    found = check_value([SECRET], key, value, loaded, allowed, text.encode(), text)
    assert found is not None and found.tokens == frame(split.head)
    # The same ids under a policy that forbids the special token: refused, although the ids
    # spell the prefix and the MAC is good (the key is the forbidding policy's).
    key_plain = fleet_key(b"ft:", b"ns", loaded.eid, (), text.encode())
    data = text.encode()
    cut_byte = len(text[: split.cut].encode())
    forged = pack_value(SECRET, key_plain, frame(split.head), split.cut, cut_byte, len(data))
    assert check_value([SECRET], key_plain, forged, loaded, (), data, text) is None


def test_a_wrong_cut_byte_is_refused(loaded: Any) -> None:
    text = "naïve café 東京 " * 40 + "end"
    data = text.encode()
    split = split_prefix(loaded.enc, text)
    key = fleet_key(b"ft:", b"ns", loaded.eid, (), data)
    cut_byte = len(text[: split.cut].encode())
    for wrong in (cut_byte - 1, cut_byte + 1, split.cut):
        if wrong == cut_byte:
            continue
        value = pack_value(SECRET, key, frame(split.head), split.cut, wrong, len(data))
        assert check_value([SECRET], key, value, loaded, (), data, text) is None
