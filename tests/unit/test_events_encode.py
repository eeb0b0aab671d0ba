"""libs.events.encode writes pydantic-core's JSON: the very bytes orjson wrote over the model's
JSON dump before it (what transform and the IMAP sync put on the topics), on any text, time and id;
json_bytes the very bytes of model_dump_json without nulls (transform's changelog values), which
decode to the same state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
from hypothesis import given
from hypothesis import strategies as st

from libs.events import Event, EventType, PostflightRecord, encode, json_bytes
from libs.lifecycle import apply

TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)


@given(
    text=TEXT,
    account=st.integers(1, 2**64 - 1),
    size=st.integers(0, 2**64 - 1),
    offset_min=st.integers(-1439, 1439),
    micro=st.integers(0, 999_999),
)
def test_encode_is_orjson_over_the_json_dump(
    text: str, account: int, size: int, offset_min: int, micro: int
) -> None:
    when = datetime(2026, 5, 6, 7, 8, 9, micro, tzinfo=timezone(timedelta(minutes=offset_min)))
    event = Event.model_validate({
        "event_id": text[:64], "account_id": account, "message_key": "k" + text[:100],
        "type": "message.delivered", "direction": "outbound", "occurred_at": when,
        "received_at": datetime(2026, 5, 6, tzinfo=UTC),
        "content": {"subject": text, "from": {"name": text, "email": text}, "to": [text],
                    "size_bytes": size, "body_text": text, "date": when},
        "flags": {"labels": [text[:100]], "unread": True, "folder": text[:255]},
    })  # fmt: skip
    outcome = apply(None, event, position=7)
    assert isinstance(outcome.record, PostflightRecord)
    for model in (event, outcome.record):
        assert encode(model) == orjson.dumps(model.model_dump(mode="json", by_alias=True, exclude_none=True))
    assert outcome.state is not None
    assert json_bytes(outcome.state) == outcome.state.model_dump_json(exclude_none=True).encode()
    assert type(outcome.state).model_validate_json(json_bytes(outcome.state)) == outcome.state


CONTENT = st.fixed_dictionaries(
    {},
    optional={
        "subject": TEXT,
        "body_text": TEXT,
        "body_html": TEXT,
        "from": st.fixed_dictionaries({"email": TEXT}, optional={"name": TEXT}),
        "to": st.lists(TEXT, max_size=3),
        "error_code": TEXT.map(lambda t: t[:64]),
        "size_bytes": st.integers(0, 2**64 - 1),
        "attachments": st.lists(
            st.fixed_dictionaries({"size_bytes": st.integers(0, 10**9)}, optional={"filename": TEXT}),
            max_size=2,
        ),
        "message_id": TEXT.map(lambda t: f"<{t}>"),
        "references": st.lists(TEXT.map(lambda t: f"<{t}>"), max_size=2),
    },
)
FLAGS = st.fixed_dictionaries(
    {}, optional={"unread": st.booleans(), "starred": st.booleans(), "labels": st.lists(TEXT, max_size=2)}
)


@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(list(EventType)),
            st.sampled_from(["inbound", "outbound", None]),
            st.none() | CONTENT,
            st.none() | FLAGS,
            st.integers(-1439, 1439),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_an_outcomes_value_is_its_record_encoded(
    steps: list[tuple[EventType, str | None, dict[str, object] | None, dict[str, object] | None, int]],
) -> None:
    """transform sends Outcome.value, encoded from the record's fields without the model: the
    very bytes of encode(outcome.record), through every kind of record a lifecycle emits (first
    records, updates with and without content, patches, erasures) and any time zone."""
    state = None
    for i, (type_, direction, content, flags, offset_min) in enumerate(steps):
        raw: dict[str, object] = {
            "event_id": f"e{i}", "account_id": 77, "message_key": "k", "type": type_.value,
            "occurred_at": datetime(2026, 5, 6, 7, 8, 9, i, tzinfo=timezone(timedelta(minutes=offset_min))),
            "received_at": datetime(2026, 5, 6, tzinfo=UTC),
        }  # fmt: skip
        for name, value in (("direction", direction), ("content", content), ("flags", flags)):
            if value is not None:
                raw[name] = value
        outcome = apply(state, Event.model_validate(raw), position=i)
        if outcome.postflight is not None:
            assert outcome.record is not None
            assert outcome.value == encode(outcome.record)
        state = outcome.state
