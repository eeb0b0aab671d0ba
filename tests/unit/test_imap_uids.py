"""UID sets from a hostile server stay ranges; body fetches are planned in bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.imap.client import ImapError, parse_search, parse_select
from libs.imap.uids import (
    MAX_UID,
    UidSet,
    UidSetTooLarge,
    format_uid_set,
    plan_fetch_batches,
)
from libs.mime import MAX_RAW_BYTES


def test_the_whole_uid_space_is_one_range() -> None:
    vanished = UidSet.parse(b"1:4294967295")
    assert vanished.ranges == ((1, MAX_UID),)
    assert len(vanished) == MAX_UID
    assert 1 in vanished and MAX_UID in vanished and 0 not in vanished
    held = [3, 70_000, 4_000_000_000]
    assert vanished.select(held) == held


def test_ranges_are_sorted_merged_and_reversed_bounds_accepted() -> None:
    s = UidSet.parse(b"9:7,1,2,3:4,20")
    assert s.ranges == ((1, 4), (7, 9), (20, 20))
    assert [u for u in range(25) if u in s] == [1, 2, 3, 4, 7, 8, 9, 20]
    assert s.select([20, 5, 8, 1]) == [20, 8, 1]
    assert format_uid_set([5, 3, 4, 9, 1, 1]) == "1,3:5,9"


@pytest.mark.parametrize(
    "text",
    [b"0", b"1:0", b"4294967296", b"1:*", b"1,,2", b"x", b"", b"9" * 5000, b"1:" + b"9" * 5000],
)
def test_what_is_no_uid_set_is_refused(text: bytes) -> None:
    with pytest.raises(ValueError):
        UidSet.parse(text)


def test_too_many_ranges_are_refused_without_reading_them_all() -> None:
    with pytest.raises(UidSetTooLarge):
        UidSet.parse(b",".join(str(u).encode() for u in range(1, 40, 2)), max_ranges=10)


def test_a_select_with_a_huge_vanished_holds_ranges() -> None:
    info = parse_select(
        [b"OK [UIDVALIDITY 7] UIDs valid", b"VANISHED (EARLIER) 1:4294967295", b"0 EXISTS", b"OK done"]
    )
    assert info.uidvalidity == 7 and info.exists == 0
    assert info.vanished is not None and info.vanished.ranges == ((1, MAX_UID),)


def test_a_vanished_of_too_many_ranges_falls_back_to_listing_uids() -> None:
    many = b",".join(str(u).encode() for u in range(1, 250_000, 2))
    assert parse_select([b"VANISHED (EARLIER) " + many, b"OK done"]).vanished is None


def test_a_search_result_is_capped() -> None:
    assert parse_search([b"1 2 3 2", b"OK done"], max_uids=3) == {1, 2, 3}
    with pytest.raises(ImapError, match="more than 3"):
        parse_search([b"1 2 3 4", b"OK done"], max_uids=3)
    with pytest.raises(ImapError, match="no UID"):
        parse_search([b"1 99999999999999999999", b"OK done"], max_uids=3)


def test_batches_are_planned_in_bytes() -> None:
    kib = 1024
    sizes: list[tuple[int, int | None]] = [(1, 100 * kib), (2, 100 * kib), (3, 300 * kib), (4, 10 * kib)]
    assert plan_fetch_batches(
        sizes, max_bytes=400 * kib, max_messages=10, per_message_cap_bytes=384 * kib
    ) == [
        [1, 2],
        [3, 4],
    ]
    # a size the server lies about counts at most the cap; an unknown one counts the cap
    lying: list[tuple[int, int | None]] = [(1, 10**15), (2, None), (3, 1)]
    assert plan_fetch_batches(
        lying, max_bytes=800 * kib, max_messages=10, per_message_cap_bytes=384 * kib
    ) == [[1, 2, 3]]
    assert plan_fetch_batches(sizes, max_bytes=10**9, max_messages=3, per_message_cap_bytes=384 * kib) == [
        [1, 2, 3],
        [4],
    ]


@given(
    sizes=st.lists(
        st.one_of(st.none(), st.integers(min_value=-5, max_value=10 * MAX_RAW_BYTES)), max_size=200
    ),
    max_bytes=st.integers(min_value=1, max_value=8 * MAX_RAW_BYTES),
    max_messages=st.integers(min_value=1, max_value=300),
)
def test_every_plan_keeps_order_and_bounds(
    sizes: list[int | None], max_bytes: int, max_messages: int
) -> None:
    pairs = list(enumerate(sizes, start=1))
    batches = plan_fetch_batches(
        pairs, max_bytes=max_bytes, max_messages=max_messages, per_message_cap_bytes=MAX_RAW_BYTES
    )
    assert [u for b in batches for u in b] == [u for u, _ in pairs]
    cost = {u: MAX_RAW_BYTES if s is None else max(0, min(s, MAX_RAW_BYTES)) for u, s in pairs}
    for batch in batches:
        assert 1 <= len(batch) <= max_messages
        assert len(batch) == 1 or sum(cost[u] for u in batch) <= max_bytes


@given(
    st.lists(st.tuples(st.integers(1, 10_000), st.integers(1, 10_000)), max_size=50), st.integers(0, 10_001)
)
def test_a_set_holds_exactly_its_ranges(ranges: list[tuple[int, int]], probe: int) -> None:
    s = UidSet(ranges)
    expected = {u for a, b in ranges for u in range(min(a, b), max(a, b) + 1)}
    assert (probe in s) == (probe in expected)
    assert len(s) == len(expected)
    assert UidSet.parse(format_uid_set(expected).encode() or b"1") == (s if expected else UidSet([(1, 1)]))
