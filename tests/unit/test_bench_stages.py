"""Pure parts of the webhook and IMAP bench stages: percentiles and matching deliveries to posts."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cli.bench_stats import nearest_rank, summarize
from cli.bench_webhooks import created_message_id, match_latencies


def test_nearest_rank_small_lists() -> None:
    assert nearest_rank([3.0], 50) == 3.0
    assert nearest_rank([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert nearest_rank([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    # p99 of 20 samples is the largest: 19 of them cover only 95%
    assert nearest_rank([float(i) for i in range(20)], 99) == 19.0
    assert nearest_rank([float(i) for i in range(1, 101)], 99) == 99.0


def test_nearest_rank_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        nearest_rank([], 50)
    with pytest.raises(ValueError):
        nearest_rank([1.0], 0)
    with pytest.raises(ValueError):
        nearest_rank([1.0], 101)


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1), st.floats(min_value=0.01, max_value=100))
def test_nearest_rank_is_a_sample_with_p_percent_at_or_below(values: list[float], p: float) -> None:
    r = nearest_rank(values, p)
    assert r in values
    assert sum(v <= r for v in values) >= p / 100 * len(values)
    assert sum(v < r for v in values) < p / 100 * len(values)


def test_summarize_in_milliseconds() -> None:
    s = summarize([0.1, 0.2, 0.3])
    assert s.count == 3
    assert s.p50_ms == pytest.approx(200)
    assert s.p99_ms == s.max_ms == pytest.approx(300)
    assert "p99 300 ms" in s.text()


def _body(type_: str = "message.created", object_: str = "message", id_: str = "281474976710657") -> bytes:
    return orjson.dumps(
        {
            "type": type_,
            "timestamp": "2026-11-23T13:01:02.123456Z",
            "data": {"object": object_, "id": id_, "account_id": "1", "change_type": type_.split(".")[1]},
        }
    )


def test_created_message_id() -> None:
    assert created_message_id(_body()) == 281474976710657
    assert created_message_id(_body("message.updated")) is None
    assert created_message_id(_body(object_="account")) is None
    assert created_message_id(_body(id_="not a number")) is None
    assert created_message_id(b"not json") is None
    assert created_message_id(b'{"type": "message.created"}') is None
    assert created_message_id(b"[]") is None


def test_match_latencies_only_counts_posted_messages() -> None:
    sent_at = {"k1": 10.0, "k2": 11.0}
    key_of_id = {1: "k1", 2: "k2", 3: "other"}
    delivered_at = {1: 10.25, 2: 11.5, 3: 12.0, 4: 13.0}
    assert sorted(match_latencies(sent_at, key_of_id, delivered_at)) == [0.25, 0.5]
    assert match_latencies(sent_at, key_of_id, {}) == []
