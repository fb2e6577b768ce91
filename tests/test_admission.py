"""Admission on the second sight (flashtoken/admission.py): bounded, and exact in what it says."""

from __future__ import annotations

import threading

import pytest

from flashtoken.admission import SecondSight


def test_a_text_is_admitted_on_its_second_sight_only() -> None:
    seen = SecondSight(capacity=8)
    assert not seen.seen_before(b"a")
    assert seen.seen_before(b"a")
    assert seen.seen_before(b"a")
    assert not seen.seen_before(b"b")
    seen.forget(b"a")
    assert not seen.seen_before(b"a")


def test_a_flood_of_distinct_texts_stays_within_capacity() -> None:
    seen = SecondSight(capacity=100)
    for i in range(10_000):
        assert not seen.seen_before(i.to_bytes(16, "little"))
        assert len(seen) <= 100
    # The most recent half survives a flood: a text that comes back soon is still admitted.
    assert seen.seen_before((9_999).to_bytes(16, "little"))
    assert not seen.seen_before((0).to_bytes(16, "little"))


def test_threads_offering_one_text_see_exactly_one_first_sight() -> None:
    seen = SecondSight()
    firsts = []
    barrier = threading.Barrier(8)

    def offer() -> None:
        barrier.wait()
        firsts.append(not seen.seen_before(b"same"))

    threads = [threading.Thread(target=offer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(firsts) == [False] * 7 + [True]


def test_a_capacity_below_two_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity must be 2 or more"):
        SecondSight(capacity=1)
