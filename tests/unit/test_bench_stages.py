"""Pure parts of the bench stages: percentiles, matching webhook deliveries to posts, and the
transform-memory stage's readings (proc status, restore log line, metrics) and event generator."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cli.bench.drive import created_message_id
from cli.bench.stats import nearest_rank, summarize
from cli.bench.transform_memory import (
    ChangelogFold,
    events_of,
    growth_per_thousand,
    inbound_events,
    parse_restore_line,
    proc_status_bytes,
    sample_total,
)
from cli.bench.webhooks import match_latencies
from libs.events import EventType


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


# --- transform-memory stage (cli.bench.transform_memory) -------------------------------------

_STATUS = "Name:\tpython\nVmPeak:\t  900000 kB\nVmHWM:\t  113664 kB\nVmRSS:\t   98304 kB\nThreads:\t4\n"


def test_proc_status_bytes() -> None:
    assert proc_status_bytes(_STATUS, "VmRSS") == 98304 * 1024
    assert proc_status_bytes(_STATUS, "VmHWM") == 113664 * 1024
    with pytest.raises(ValueError, match="no VmSwap"):
        proc_status_bytes(_STATUS, "VmSwap")
    with pytest.raises(ValueError, match="not kB"):
        proc_status_bytes(_STATUS, "Threads")


def test_parse_restore_line_from_the_workers_json_log() -> None:
    line = (
        '{"event": "restored 607 states of partitions [0, 1, 2] in 0.19 s", "level": "info", '
        '"logger": "services.transform.worker", "timestamp": "2026-11-30T06:40:00.000000Z"}'
    )
    assert parse_restore_line(line) == (607, 0.19)
    assert parse_restore_line("restored 0 states of partitions [] in 0.00 s") == (0, 0.0)
    assert parse_restore_line('{"event": "revoked [0, 1]"}') is None


def test_sample_total_sums_matching_labels() -> None:
    text = (
        "# HELP flightlog_transform_states Message states in memory, by kind\n"
        "# TYPE flightlog_transform_states gauge\n"
        'flightlog_transform_states{kind="final"} 12.0\n'
        'flightlog_transform_states{kind="pending"} 3.0\n'
        "# HELP flightlog_transform_events_total Inflight events committed, by outcome\n"
        "# TYPE flightlog_transform_events_total counter\n"
        'flightlog_transform_events_total{outcome="emitted"} 5.0\n'
    )
    assert sample_total(text, "flightlog_transform_states") == 15.0
    assert sample_total(text, "flightlog_transform_states", {"kind": "pending"}) == 3.0
    assert sample_total(text, "flightlog_transform_events_total") == 5.0
    assert sample_total(text, "flightlog_transform_nothing") == 0.0


def test_growth_per_thousand() -> None:
    assert growth_per_thousand(100 * 2**20, 101 * 2**20, 2_000) == 2**20 / 2
    assert growth_per_thousand(10, 4, 1_000) == -6  # RSS may fall; the figure says so
    with pytest.raises(ValueError):
        growth_per_thousand(0, 1, 0)


@given(st.integers(min_value=0, max_value=95), st.integers(min_value=0, max_value=45))
def test_inbound_events_count_keys_and_body_size(first: int, count: int) -> None:
    events = list(inbound_events(first, count, 2_000, prefix="p-"))
    assert len(events) == events_of(first, count)
    keys = [e.message_key for e in events]
    assert sorted(set(keys)) == sorted(f"p-{i}" for i in range(first, first + count))
    for e in events:
        if e.content is not None:
            assert e.content.body_text is not None and len(e.content.body_text.encode()) == 2_000
    # each message ends received; those with a pending state first carry the body on receiving
    last = {e.message_key: e for e in events}
    assert all(e.type is EventType.RECEIVED for e in last.values())
    assert all(sum(e.content is not None for e in events if e.message_key == k) == 1 for k in last)


def test_inbound_event_bodies_differ() -> None:
    a, b = (e.content.body_text for e in inbound_events(1, 2, 5_000, prefix="p-") if e.content)
    assert a != b


def test_changelog_fold_keeps_the_last_record_of_each_key() -> None:
    fold = ChangelogFold()
    for key, value in ((b"a", b"xx"), (b"b", b"yyy"), (b"a", b"z"), (b"b", None), (None, b"q"), (b"c", None)):
        fold.add(key, value)
    assert fold.records == 5  # a keyless record is not a state's
    assert fold.live == 1 and fold.live_bytes == 1
