"""libs.event_structs.decode_inflight, transform's fast decoding: what it accepts, pydantic's
Event accepts too, with the same values (a status event as a StatusEvent, one with content or
flags as an Event built without validation); everything else (raw MIME, attachments, any value it
is not sure of) is left to pydantic."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from libs.event_structs import StatusEvent, decode_inflight
from libs.events import Event, EventType, MessageContent, MessageFlags, Participant
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


def _same(fast: StatusEvent | Event, event: Event) -> None:
    assert fast.occurred_at.utcoffset() == event.occurred_at.utcoffset()
    if isinstance(fast, StatusEvent):
        assert fast == StatusEvent(
            event.event_id, event.account_id, event.message_key, event.type, event.occurred_at,
            event.source, event.direction,
        )  # fmt: skip
        assert event.content is None and event.flags is None
        return
    # Built without validation: the same models, values and encoding as pydantic's.
    assert fast == event
    assert fast.model_dump_json() == event.model_dump_json()
    assert fast.content is None or type(fast.content) is MessageContent
    assert fast.flags is None or type(fast.flags) is MessageFlags
    if fast.content is not None:
        people = [
            fast.content.sender,
            *(p for role in ("to", "cc", "bcc", "reply_to") for p in getattr(fast.content, role) or []),
        ]
        assert all(type(p) is Participant for p in people if p is not None)


def test_a_status_event_is_decoded_as_pydantic_decodes_it() -> None:
    raw = _value()
    fast, event = decode_inflight(raw), _pydantic(raw)
    assert fast is not None and event is not None
    _same(fast, event)
    assert fast.occurred_at == datetime(2025, 1, 2, 1, 4, 5, 123456, tzinfo=UTC)
    numeric = decode_inflight(_value(account_id=ACCOUNT, direction=None))
    assert isinstance(numeric, StatusEvent) and numeric.account_id == ACCOUNT and numeric.direction is None


def test_an_event_with_content_and_flags_is_the_event_pydantic_decodes() -> None:
    raw = _value(
        content={
            "from": {"name": "Ann", "email": "ann@example.test"}, "to": ["bob@example.test"],
            "cc": [{"email": "cy@example.test"}], "subject": "s", "body_text": "b", "channel": "email",
            "thread_key": "t", "size_bytes": 12, "date": "2025-01-02T03:04:05-07:00",
            "message_id": "<m@x>", "references": ["<r@x>"], "parse_warnings": ["w"],
        },
        flags={"unread": False, "labels": ["a", "b"]},
    )  # fmt: skip
    fast, event = decode_inflight(raw), _pydantic(raw)
    assert isinstance(fast, Event) and event is not None
    _same(fast, event)
    assert fast.content is not None and fast.content.sender == Participant(
        name="Ann", email="ann@example.test"
    )
    assert fast.content.to == [Participant(email="bob@example.test")]


def test_what_only_pydantic_can_judge_goes_to_pydantic() -> None:
    for extra in (
        {"content": {"raw_mime": "AAAA"}},
        {"content": {"attachments": [{"filename": "a"}]}},
        {"content": {"from": "Ann <ann@example.test>"}},  # parsed by pydantic's path
        {"content": {"sender": "ann@example.test"}},  # "from" is its name in JSON
        {"flags": {"unread": "true"}},
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
        assert decode_inflight(_value(**extra)) is None, extra
    assert decode_inflight(b"{") is None
    assert decode_inflight(b"[]") is None


BASE = {
    "event_id": "e", "account_id": str(ACCOUNT), "message_key": "k", "occurred_at": "2025-01-02T03:04:05Z",
}  # fmt: skip
someone = st.one_of(
    st.emails(),
    texts,
    st.sampled_from(["Ann <ann@example.test>", "<a@x>", "a@x>", "x" * 321]),
    st.fixed_dictionaries({"email": st.one_of(st.emails(), texts)}, optional={"name": texts, "extra": texts}),
)
people = st.one_of(st.lists(someone, max_size=3), json_scalars)
# Content the fast path takes, with odd values among it.
rich_content = st.fixed_dictionaries(
    {},
    optional={
        "from": someone, "to": people, "cc": people, "bcc": people, "reply_to": people,
        "channel": texts, "subject": texts, "body_text": texts, "body_html": texts, "error_code": texts,
        "thread_key": texts,
        "size_bytes": st.one_of(st.integers(min_value=-1, max_value=2**64), json_scalars),
        "date": times, "message_id": texts, "in_reply_to": texts,
        "references": st.one_of(st.lists(texts, max_size=3), json_scalars),
        "parse_warnings": st.one_of(st.lists(texts, max_size=3), json_scalars),
        "raw_mime": st.none(), "attachments": st.none(),
    },
)  # fmt: skip
# A valid status event with any of its fields replaced by odd or wrong values: where the two
# decoders differ is where such a value is accepted.
overrides = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from([t.value for t in EventType]), texts)},
    optional={
        "schema_version": st.one_of(st.sampled_from([1, 1.0, "1", True, 2]), json_scalars),
        "event_id": texts, "account_id": ids, "message_key": keys,
        "occurred_at": times, "received_at": times, "source": texts,
        "direction": st.one_of(st.sampled_from(["inbound", "outbound"]), texts),
        "content": st.one_of(content, rich_content, json_scalars), "flags": st.one_of(flags, json_scalars),
        "surprise": json_scalars,
    },
)  # fmt: skip


@given(overrides)
def test_the_fast_path_never_accepts_what_pydantic_refuses_nor_reads_it_otherwise(
    changed: dict[str, Any],
) -> None:
    item = {**BASE, **changed}
    raw = json.dumps(item).encode()  # orjson refuses integers past 64 bits; a producer may not
    fast = decode_inflight(raw)
    if fast is not None:
        event = _pydantic(raw)
        assert event is not None, item
        _same(fast, event)


@settings(max_examples=300)
@given(rich_content, st.one_of(st.none(), flags))
def test_content_and_flags_the_fast_path_takes_are_read_as_pydantic_reads_them(
    given_content: dict[str, Any], given_flags: dict[str, Any] | None
) -> None:
    item = {**BASE, "type": "message.sent", "content": given_content}
    if given_flags is not None:
        item["flags"] = given_flags
    raw = json.dumps(item).encode()
    fast = decode_inflight(raw)
    if fast is not None:
        event = _pydantic(raw)
        assert event is not None, item
        _same(fast, event)
