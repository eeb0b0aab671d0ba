"""The per-key token buckets, driven by a fake clock."""

from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.ratelimit import KeyedSlots, KeyedTokenBuckets, SlotsTaken


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def buckets(
    rate: float = 10.0, burst: int = 20, max_keys: int = 100
) -> tuple[KeyedTokenBuckets[str], FakeClock]:
    clock = FakeClock()
    return KeyedTokenBuckets(rate, burst, max_keys=max_keys, clock=clock), clock


def test_new_key_starts_full_and_spends() -> None:
    b, _ = buckets()
    assert b.acquire({"a": 20}) is None
    denied = b.acquire({"a": 1})
    assert denied is not None
    assert denied.key == "a"
    assert denied.retry_after_s == pytest.approx(0.1)


def test_refill_is_linear_and_capped_at_burst() -> None:
    b, clock = buckets()
    assert b.acquire({"a": 20}) is None
    clock.now += 0.5
    assert b.available("a") == pytest.approx(5)
    clock.now += 100
    assert b.available("a") == 20


def test_retry_after_is_time_until_enough_tokens() -> None:
    b, clock = buckets()
    assert b.acquire({"a": 15}) is None  # 5 left
    denied = b.acquire({"a": 12})
    assert denied is not None
    assert denied.retry_after_s == pytest.approx(0.7)
    clock.now += denied.retry_after_s
    assert b.acquire({"a": 12}) is None


def test_all_or_nothing_across_keys() -> None:
    b, _ = buckets()
    assert b.acquire({"b": 18}) is None
    denied = b.acquire({"a": 5, "b": 5})
    assert denied is not None and denied.key == "b"
    assert b.available("a") == 20  # untouched by the refused batch
    assert b.available("b") == pytest.approx(2)


def test_more_than_burst_never_fits() -> None:
    b, _ = buckets()
    denied = b.acquire({"a": 21})
    assert denied is not None and math.isinf(denied.retry_after_s)
    assert b.available("a") == 20


def test_refund_gives_back_up_to_burst() -> None:
    b, _ = buckets()
    assert b.acquire({"a": 10}) is None
    b.refund({"a": 10})
    assert b.available("a") == 20
    b.refund({"a": 10})
    assert b.available("a") == 20


def test_tracked_keys_are_capped_least_recently_used_first() -> None:
    b, _ = buckets(max_keys=3)
    for key in "abc":
        assert b.acquire({key: 20}) is None
    assert b.acquire({"a": 0}) is None  # a is now the most recently used
    assert b.acquire({"d": 1}) is None
    assert len(b) == 3
    assert b.available("b") == 20  # forgotten: a full bucket again
    assert b.available("a") == 0
    assert b.available("c") == 0


def test_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        KeyedTokenBuckets(0, 10)
    with pytest.raises(ValueError):
        KeyedTokenBuckets(1, 0)


@given(
    rate=st.floats(min_value=0.5, max_value=1000),
    burst=st.integers(min_value=1, max_value=5000),
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=5), st.integers(min_value=0, max_value=6000)), max_size=60
    ),
)
def test_granted_never_exceeds_burst_plus_refill(
    rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    clock = FakeClock()
    b: KeyedTokenBuckets[str] = KeyedTokenBuckets(rate, burst, clock=clock)
    start, granted = clock.now, 0
    for dt, cost in steps:
        clock.now += dt
        denied = b.acquire({"k": cost})
        if denied is None:
            granted += cost
        else:
            assert denied.retry_after_s > 0
            assert cost > burst or cost > b.available("k")
        assert 0 <= b.available("k") <= burst + 1e-9
    assert granted <= burst + (clock.now - start) * rate + 1e-6


def test_retry_after_is_when_the_bucket_has_the_cost_again() -> None:
    b, clock = buckets(rate=2.0, burst=3)
    assert b.retry_after_s("a") == 0
    assert b.acquire({"a": 3}) is None
    assert b.retry_after_s("a") == pytest.approx(0.5)
    assert b.retry_after_s("a", 2) == pytest.approx(1.0)
    clock.now += 0.5
    assert b.retry_after_s("a") == 0


def test_slots_are_limited_per_key_and_released_however_the_block_ends() -> None:
    slots: KeyedSlots[int] = KeyedSlots(2)
    with slots.slot(1), slots.slot(1):
        with pytest.raises(SlotsTaken) as taken:
            with slots.slot(1):
                pass
        assert (taken.value.key, taken.value.limit) == (1, 2)
        with slots.slot(2):  # another key has its own
            assert (slots.held(1), slots.held(2), len(slots)) == (2, 1, 2)
    assert (slots.held(1), len(slots)) == (0, 0)  # nothing kept for a key holding nothing
    with pytest.raises(RuntimeError), slots.slot(1):
        raise RuntimeError("the stream failed")
    assert slots.held(1) == 0


@given(st.lists(st.integers(0, 3), max_size=50))
def test_slots_held_never_exceed_the_limit(keys: list[int]) -> None:
    slots: KeyedSlots[int] = KeyedSlots(3)
    with contextlib.ExitStack() as stack:
        open_per_key: dict[int, int] = {}
        for key in keys:
            try:
                stack.enter_context(slots.slot(key))
                open_per_key[key] = open_per_key.get(key, 0) + 1
            except SlotsTaken:
                assert open_per_key.get(key, 0) == 3
            assert slots.held(key) == open_per_key.get(key, 0) <= 3
    assert len(slots) == 0
