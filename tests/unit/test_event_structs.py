"""libs.event_structs.decode_status_event, transform's fast decoding: what it accepts, pydantic's
Event accepts too, with the same values; everything else (content, flags, any value it is not sure
of) is left to pydantic."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from libs.event_structs import StatusEvent, decode_status_event
from libs.events import Event, EventType
from tests.unit.test_ingest_batch import content, flags, ids, json_scalars, keys, texts, times

ACCOUNT = 3 << 48 | 5


def _value(**extra: Any) -> bytes:
    return orjson.dumps({
        "schema_version": 1, "event_id": "e1", "account_id": str(ACCOUNT), "message_key": "k",
        "type": "message.queued", "occurred_at": "2025-01-02T03:04:05.123456+02:00",
        "source": "api", "direction": "outbound", "received_at": "2025-01-02T01:04:06Z", **extra,
    })  # fmt: skip


def _pydantic(raw: bytes) -> Event | None:
    try:
        return Event.model_validate_json(raw)
    except ValidationError:
        return None


def _same(fast: StatusEvent, event: Event) -> None:
    assert fast == StatusEvent(
        event.event_id, event.account_id, event.message_key, event.type, event.occurred_at,
        event.source, event.direction,
    )  # fmt: skip
    assert fast.occurred_at.utcoffset() == event.occurred_at.utcoffset()
    assert event.content is None and event.flags is None


def test_a_status_event_is_decoded_as_pydantic_decodes_it() -> None:
    raw = _value()
    fast, event = decode_status_event(raw), _pydantic(raw)
    assert fast is not None and event is not None
    _same(fast, event)
    assert fast.occurred_at == datetime(2025, 1, 2, 1, 4, 5, 123456, tzinfo=UTC)
    numeric = decode_status_event(_value(account_id=ACCOUNT, direction=None))
    assert numeric is not None and numeric.account_id == ACCOUNT and numeric.direction is None


def test_content_flags_and_what_only_pydantic_can_judge_go_to_pydantic() -> None:
    for extra in (
        {"content": {"subject": "s"}},
        {"flags": {"unread": True}},
        {"account_id": "0"},
        {"account_id": str(2**64)},
        {"account_id": "+12"},
        {"account_id": True},
        {"message_key": "é" * 200},  # 400 bytes of UTF-8
        {"occurred_at": "0999-12-31T23:00:00Z"},
        {"occurred_at": "2025-01-02T03:04:05"},  # naive
        {"occurred_at": 1735787045},
        {"received_at": "9999-12-31T23:00:00-05:00"},
        {"schema_version": 2},
        {"surprise": 1},
        {"type": "message.teleported"},
    ):
        assert decode_status_event(_value(**extra)) is None, extra
    assert decode_status_event(b"{") is None
    assert decode_status_event(b"[]") is None


BASE = {
    "event_id": "e", "account_id": str(ACCOUNT), "message_key": "k", "occurred_at": "2025-01-02T03:04:05Z",
}  # fmt: skip
# A valid status event with any of its fields replaced by odd or wrong values: where the two
# decoders differ is where such a value is accepted.
overrides = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from([t.value for t in EventType]), texts)},
    optional={
        "schema_version": st.one_of(st.sampled_from([1, 1.0, "1", True, 2]), json_scalars),
        "event_id": texts, "account_id": ids, "message_key": keys,
        "occurred_at": times, "received_at": times, "source": texts,
        "direction": st.one_of(st.sampled_from(["inbound", "outbound"]), texts),
        "content": st.one_of(content, json_scalars), "flags": st.one_of(flags, json_scalars),
        "surprise": json_scalars,
    },
)  # fmt: skip


@given(overrides)
def test_the_fast_path_never_accepts_what_pydantic_refuses_nor_reads_it_otherwise(
    changed: dict[str, Any],
) -> None:
    item = {**BASE, **changed}
    raw = json.dumps(item).encode()  # orjson refuses integers past 64 bits; a producer may not
    fast = decode_status_event(raw)
    if fast is not None:
        event = _pydantic(raw)
        assert event is not None, item
        _same(fast, event)
