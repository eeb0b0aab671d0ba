"""libs.events.encode writes pydantic-core's JSON: the very bytes orjson wrote over the model's
JSON dump before it (what transform and the IMAP sync put on the topics), on any text, time and id;
json_bytes the very bytes of model_dump_json (transform's changelog values)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
from hypothesis import given
from hypothesis import strategies as st

from libs.events import Event, PostflightRecord, encode, json_bytes
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
    assert json_bytes(outcome.state) == outcome.state.model_dump_json().encode()
