"""The shard-down stage's pure parts: a rate over a window of acknowledgements, the records
missing at the end, and the ratio its figure reports."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cli.bench.shard_down import DownRun, missing, rate_between


def test_rate_between_counts_the_half_open_window() -> None:
    acked = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert rate_between(acked, 1.0, 3.0) == pytest.approx(4 / 2)  # 1.0, 1.5, 2.0, 2.5
    assert rate_between(acked, 3.5, 4.5) == 0.0


def test_rate_between_an_empty_or_inverted_window_is_zero() -> None:
    assert rate_between([1.0], 1.0, 1.0) == 0.0
    assert rate_between([1.0], 2.0, 1.0) == 0.0


@given(
    st.lists(st.floats(min_value=0, max_value=100)), st.floats(min_value=0.01, max_value=50)
)  # a split near 0 overflows a rate
def test_adjacent_windows_add_up(acked: list[float], split: float) -> None:
    whole = rate_between(acked, 0.0, 100.0) * 100.0
    parts = rate_between(acked, 0.0, split) * split + rate_between(acked, split, 100.0) * (100.0 - split)
    assert parts == pytest.approx(whole)


def test_missing_keeps_the_order_written() -> None:
    written = [(1, "sd-0000002"), (2, "sd-0000000"), (1, "sd-0000001")]
    assert missing(written, {(2, "sd-0000000")}) == [(1, "sd-0000002"), (1, "sd-0000001")]
    assert missing(written, set(written)) == []
    # the account is part of the identity: the same key of another account does not count
    assert missing([(1, "k")], {(2, "k")}) == [(1, "k")]


def test_the_ratio_compares_the_down_window_with_the_baseline() -> None:
    run = DownRun(on_a={1: True, 2: False})
    run.acked_at_a = [0.5 + i * 0.1 for i in range(100)]  # 10 a second over [0.5, 10.5)
    run.acked_at_a += [20.0 + i * 0.125 for i in range(40)]  # 8 a second over [20, 25)
    run.baseline = (0.5, 10.5)
    run.killed_at, run.restarted_at = 20.0, 25.0
    assert run.a_up_per_s == pytest.approx(10.0)
    assert run.a_down_per_s == pytest.approx(8.0)
    assert run.ratio == pytest.approx(0.8)


def test_no_baseline_is_no_ratio() -> None:
    assert DownRun(on_a={}).ratio == 0.0
