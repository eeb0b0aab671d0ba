"""services.ingest.validation.check_batch: one validation per batch, the same answers as item by
item (msgspec's narrower check first, pydantic's where it refuses), and inflight values that the
transform decodes into the very events ingest validated."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from libs.events import Event, EventType, Participant, decode_event
from services.ingest import validation
from services.ingest.validation import Accepted, ItemError, check_batch, item_errors, normalise_item

ACCOUNT = 3 << 48 | 5
RECEIVED = datetime(2026, 11, 30, 9, 0, 0, 123456, tzinfo=UTC)


def _item(**extra: Any) -> dict[str, Any]:
    return {
        "event_id": "e1",
        "account_id": str(ACCOUNT),
        "message_key": "k",
        "type": "message.queued",
        "occurred_at": "2025-01-02T03:04:05Z",
        **extra,
    }


def _one_by_one(items: list[Any]) -> tuple[dict[int, Event], list[ItemError]]:
    events: dict[int, Event] = {}
    errors: list[ItemError] = []
    for index, item in enumerate(items):
        try:
            events[index] = normalise_item(item, RECEIVED)
        except (ValidationError, ValueError) as exc:
            errors.extend(item_errors(index, exc))
    return events, errors


def test_a_valid_batch_becomes_its_events_and_their_values() -> None:
    items = [
        _item(),
        _item(event_id="e2", type="message.sent", source="provider-x", direction=None),
        {
            k: v
            for k, v in _item(content={"from": "a@example.test", "to": ["b@example.test"]}).items()
            if k != "event_id"
        },
    ]
    checked = check_batch(items, RECEIVED)
    assert checked.errors == []
    assert list(checked.events) == [0, 1, 2]
    generated = checked.events[2].event_id
    assert len(generated) == 32
    decoded = [decode_event(value) for value in checked.values]
    for index, event in enumerate(decoded):
        assert (event.event_id, event.account_id, event.message_key) == checked.events[index]
        assert event.received_at == RECEIVED and event.schema_version == 1
        assert orjson.loads(checked.values[index])["schema_version"] == 1
    assert decoded[1].source == "provider-x"
    assert decoded[2].content is not None and decoded[2].content.sender == Participant(email="a@example.test")
    # The posted items are as they were: a bad one goes to the DLQ as posted.
    assert "event_id" not in items[2] and "received_at" not in items[0]


def test_a_bad_item_gets_the_errors_item_by_item_would_give() -> None:
    items: list[Any] = [
        _item(),
        _item(type="message.teleported"),
        "not an object",
        _item(received_at="2025-01-01T00:00:00Z"),
        _item(message_key="é" * 255, occurred_at="9999-12-31T23:00:00-05:00"),
    ]
    checked = check_batch(items, RECEIVED)
    events, errors = _one_by_one(items)
    assert checked.errors == errors
    assert list(checked.events) == list(events) == [0]
    assert checked.values == []
    assert {e.index: e.field for e in errors} == {1: "type", 2: "(item)", 3: "received_at", 4: "occurred_at"}


offsets = st.builds(
    timezone,
    st.timedeltas(min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59)),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
times = st.one_of(
    st.datetimes(timezones=offsets).map(datetime.isoformat),
    st.datetimes().map(datetime.isoformat),  # naive: refused
    st.sampled_from(["9999-12-31T23:00:00-05:00", "1000-01-01T00:30:00+01:00", "2025-01-02", "yesterday"]),
    st.integers(min_value=-(10**12), max_value=10**12),
    json_scalars,
)
ids = st.one_of(
    st.integers(min_value=-1, max_value=2**64 + 1),
    st.integers(min_value=1, max_value=2**64 + 1).map(str),
    st.sampled_from(["", " 12", "+12", "1_2", "\uff11\uff12", "0x1f", "12.0"]),
    json_scalars,
)
keys = st.one_of(st.text(max_size=70), st.text(alphabet="é😀a", min_size=60, max_size=130), json_scalars)
texts = st.one_of(st.text(max_size=20), json_scalars)
flags = st.fixed_dictionaries(
    {},
    optional={
        "unread": st.one_of(
            st.booleans(), st.sampled_from(["true", "no", "1", 0, 1, 2, "maybe"]), json_scalars
        ),
        "starred": st.one_of(st.booleans(), json_scalars),
        "folder": texts,
        "labels": st.one_of(st.lists(texts, max_size=3), json_scalars),
    },
)
content = st.fixed_dictionaries(
    {},
    optional={
        "from": texts,
        "sender": texts,
        "to": st.one_of(st.lists(st.emails(), max_size=3), st.lists(json_scalars, max_size=2), json_scalars),
        "subject": texts,
        "body_text": texts,
        "raw_mime": st.one_of(st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode()), texts),
        "size_bytes": st.one_of(st.integers(min_value=-1, max_value=2**64 - 1), json_scalars),
        "attachments": st.one_of(
            st.lists(
                st.fixed_dictionaries({}, optional={"filename": texts, "size_bytes": ids, "inline": texts}),
                max_size=2,
            ),
            json_scalars,
        ),
        "extra": json_scalars,
    },
)
items = st.fixed_dictionaries(
    {},
    optional={
        "schema_version": st.one_of(st.sampled_from([1, 1.0, "1", True, 2]), json_scalars),
        "event_id": texts,
        "account_id": ids,
        "message_key": keys,
        "type": st.one_of(st.sampled_from([t.value for t in EventType]), texts),
        "occurred_at": times,
        "source": texts,
        "direction": st.one_of(st.sampled_from(["inbound", "outbound"]), texts),
        "content": st.one_of(content, json_scalars),
        "flags": st.one_of(flags, json_scalars),
        "surprise": json_scalars,
    },
)
# Valid items, with values of every JSON type the lax model takes: where an odd value is accepted
# is where a difference between the two would hide. `items` brings the refused ones.
odd_flags = st.fixed_dictionaries(
    {},
    optional={
        "unread": st.sampled_from([True, False, "true", "no", "1", 0, 1, None]),
        "starred": st.sampled_from([True, "off", 1.0, None]),
        "folder": st.sampled_from(["INBOX", None]),
        "labels": st.sampled_from([[], ["a", "b"], ["l" * 100], ["l" * 101], [""], ["l"] * 51, None]),
    },
)
# Every form a participant takes, and the edges of each: a string ending in ">" with a "<" in it
# is parsed as "Name <address>"; any other is a bare address.
participants = st.one_of(
    st.sampled_from([
        "a@example.test", "Ann <a@example.test>", "<a@x>", "a@x>", "<a@x", "<", ">", "", "x" * 320,
        "x" * 321, "Bob <bob>", "a <b> c", "a>\n", "<a>\n", "x" * 300 + " <" + "y" * 30 + ">",
        {"email": "a@x"}, {"email": ""}, {"email": "e" * 321}, {"name": "n" * 256, "email": "e"},
        {"name": "n" * 257, "email": "e"}, {"name": None, "email": "e"}, {"name": "n"},
        {"email": "e", "x": 1},
    ]),
    st.text(alphabet="<>a@ \n\"", max_size=8),
)  # fmt: skip
odd_content: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {},
    optional={
        "from": st.one_of(st.none(), participants),
        "to": st.one_of(st.none(), st.lists(participants, max_size=3)),
        "date": st.one_of(st.none(), times),
        "references": st.sampled_from([["<a@x>"], [""], ["x" * 998], ["x" * 999], ["<r>"] * 101, None]),
        "thread_key": st.sampled_from(["t", "t" * 64, "t" * 65, None]),
        "subject": st.one_of(st.text(max_size=10), st.none()),
        "size_bytes": st.sampled_from([0, 12, 12.0, "12", 2**64 - 1, True, None]),
        "raw_mime": st.sampled_from([base64.b64encode(b"Subject: x\r\n\r\nhi").decode(), "", None]),
        "attachments": st.sampled_from([[], [{}], [{"size_bytes": "3", "inline": "yes"}], None]),
        "channel": st.sampled_from(["email", None]),
    },
)
mostly_valid = st.fixed_dictionaries(
    {
        "account_id": st.sampled_from([str(ACCOUNT), ACCOUNT, float(ACCOUNT), True]),
        "message_key": st.one_of(st.text(min_size=1, max_size=20), st.sampled_from(["é" * 127, "a" * 255])),
        "type": st.sampled_from([t.value for t in EventType]),
        "occurred_at": st.one_of(
            st.datetimes(timezones=offsets).map(datetime.isoformat),
            st.integers(min_value=0, max_value=2 * 10**9),
            st.floats(min_value=0, max_value=2e9),
            st.sampled_from(["2025-01-02T03:04:05Z", "1000-01-01T00:00:00Z", "9999-12-30T23:59:59.999999Z"]),
        ),
    },
    optional={
        "schema_version": st.sampled_from([1, 1.0, True]),
        "source": st.sampled_from(["api", "x" * 64]),
        "direction": st.sampled_from(["inbound", "outbound", None]),
        "content": st.one_of(odd_content, st.none()),
        "flags": st.one_of(odd_flags, st.none()),
    },
)


# Items of strict JSON types, as msgspec's check takes them, at the edges of each limit.
edge_times = st.one_of(
    st.datetimes(timezones=offsets).map(datetime.isoformat),
    st.sampled_from([
        "1000-12-31T23:59:59.9999999+23:59", "1001-01-01T00:00:00+23:59", "1000-01-01T00:00:00Z",
        "9998-12-31T23:59:59.9999999Z", "9998-12-31T23:59:59-23:59", "9999-01-01T00:00:00Z",
        "2025-01-02 03:04:05z", "2025-01-02T03:04:05,5Z", "2025-01-02T03:04Z", "2025-01-02T03:04:05",
    ]),
)  # fmt: skip
strict_valid = st.fixed_dictionaries(
    {
        "account_id": st.sampled_from(
            [str(ACCOUNT), ACCOUNT, "0", 0, -1, str(2**64), 2**64 - 1, "0012", "\uff11"]
        ),
        "message_key": st.one_of(
            st.text(min_size=1, max_size=3),
            st.text(alphabet="é😀a", min_size=60, max_size=260),
            st.sampled_from(["a" * 255, "a" * 256, "é" * 127, "é" * 128, ""]),
        ),
        "type": st.sampled_from([t.value for t in EventType]),
        "occurred_at": edge_times,
    },
    optional={
        "event_id": st.sampled_from(["e", "e" * 64, "e" * 65, ""]),
        "schema_version": st.sampled_from([1, 2]),
        "source": st.sampled_from(["api", "x" * 64, "x" * 65, ""]),
        "direction": st.sampled_from(["inbound", "outbound", "sideways", None]),
        "content": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {},
                optional={
                    "from": participants,
                    "to": st.lists(participants, max_size=3),
                    "cc": st.sampled_from([["c@x"] * 100, ["c@x"] * 101]),
                    "subject": st.sampled_from(["s" * 998, "s" * 999, ""]),
                    "channel": st.sampled_from(["c" * 32, "c" * 33, ""]),
                    "error_code": st.sampled_from(["e" * 64, "e" * 65]),
                    "size_bytes": st.sampled_from([0, -1, 2**64 - 1]),
                    "date": edge_times,
                    "message_id": st.sampled_from(["", "m", "m" * 998, "m" * 999]),
                    "parse_warnings": st.sampled_from([["w"] * 20, ["w"] * 21, [""]]),
                    "raw_mime": st.none(),
                    "attachments": st.none(),
                },
            ),
        ),
        "flags": st.one_of(st.none(), odd_flags),
    },
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(mostly_valid, mostly_valid, mostly_valid, strict_valid, strict_valid, items),
        min_size=1,
        max_size=2,
    )
)
def test_one_call_agrees_with_item_by_item_and_the_transform_reads_what_was_validated(
    posted: list[dict[str, Any]],
) -> None:
    try:
        batch: list[Any] = orjson.loads(orjson.dumps(posted))  # as the request parser gives it
    except orjson.JSONEncodeError:
        return  # not JSON (an int orjson cannot write): never posted
    for item in batch:
        item.setdefault("event_id", "fixed")  # generated ids aside, the answers are comparable
    checked = check_batch(batch, RECEIVED)
    events, errors = _one_by_one(batch)
    assert checked.errors == errors
    assert checked.events == {i: Accepted(e.event_id, e.account_id, e.message_key) for i, e in events.items()}
    if errors:
        assert checked.values == []
        return
    assert len(checked.values) == len(batch)
    for index, value in enumerate(checked.values):
        assert decode_event(value) == events[index]


class _NotCalled:
    def validate_python(self, data: Any) -> Any:
        raise AssertionError("pydantic validated a batch msgspec should have taken")


def test_a_batch_shaped_as_clients_post_it_never_reaches_pydantic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "_EVENTS", _NotCalled())
    items = [
        _item(
            type="message.accepted", direction="outbound", source="provider-x",
            content={
                "from": "a@example.test", "to": ["b@example.test", {"name": "C", "email": "c@example.test"}],
                "subject": "s", "body_text": "b", "channel": "email", "date": "2025-01-02T03:04:05+01:00",
                "message_id": "<m@x>", "references": ["<r@x>"],
            },
        ),
        _item(event_id="e2", account_id=ACCOUNT, type="message.updated",
              flags={"unread": False, "labels": ["a"], "folder": "Archive"}),
    ]  # fmt: skip
    checked = check_batch(items, RECEIVED)
    assert checked.errors == []
    assert checked.events == {0: Accepted("e1", ACCOUNT, "k"), 1: Accepted("e2", ACCOUNT, "k")}


@pytest.mark.parametrize("account_id", ["12", 12, 12.0])
def test_an_account_id_stays_what_was_posted_and_reads_the_same(account_id: Any) -> None:
    checked = check_batch([_item(account_id=account_id)], RECEIVED)
    assert checked.events[0].account_id == 12
    assert orjson.loads(checked.values[0])["account_id"] == account_id
    assert decode_event(checked.values[0]).account_id == 12
