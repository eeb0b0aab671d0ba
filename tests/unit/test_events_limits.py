"""The event models refuse up front what the shard schema could never store, naming the field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from libs.events import (
    STORABLE_MAX,
    STORABLE_MIN,
    Event,
    MessageDoc,
    PostflightRecord,
    decode_postflight,
    encode,
    storable_utc,
)
from services.ingest.validation import item_errors, normalise_item

ACCOUNT = 3 << 48 | 5


def _item(**extra: Any) -> dict[str, Any]:
    return {
        "account_id": str(ACCOUNT),
        "message_key": "k",
        "type": "message.queued",
        "occurred_at": "2025-01-02T03:04:05Z",
        **extra,
    }


def _fields(item: dict[str, Any]) -> list[str]:
    """The fields ingest's 422 names for ``item``."""
    try:
        normalise_item(item)
    except ValidationError as exc:
        return [e.field for e in item_errors(0, exc)]
    return []


def test_the_issues_two_poisons_are_refused_by_field() -> None:
    assert _fields(_item(message_key="é" * 255)) == ["message_key"]  # 510 bytes for VARBINARY(255)
    assert _fields(_item(occurred_at="9999-12-31T23:00:00-05:00")) == ["occurred_at"]  # year 10000 in UTC


@pytest.mark.parametrize("account_id", [True, False, "true", "", "-1", "1e3", "١٢"])
def test_an_account_id_is_a_decimal_string_or_a_number_never_a_boolean(account_id: object) -> None:
    assert _fields(_item(account_id=account_id)) == ["account_id"]


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("a" * 255, True),
        ("é" * 127 + "a", True),
        ("é" * 128, False),
        ("😀" * 64, False),
        ("😀" * 63 + "abc", True),
    ],
)
def test_message_key_is_counted_in_utf8_bytes(key: str, ok: bool) -> None:
    assert len(key.encode()) <= 255 if ok else len(key.encode()) > 255
    assert _fields(_item(message_key=key)) == ([] if ok else ["message_key"])


@pytest.mark.parametrize(
    ("occurred_at", "ok"),
    [
        ("1000-01-01T00:00:00Z", True),
        ("0999-12-31T23:59:59.999999Z", False),
        ("1000-01-01T00:30:00+01:00", False),  # 0999-12-31T23:30 in UTC
        ("1000-01-01T00:30:00-01:00", True),
        ("9999-12-30T23:59:59.999999Z", True),
        ("9999-12-31T00:00:00Z", False),
        ("9999-12-30T20:00:00-05:00", False),  # 9999-12-31T01:00 in UTC
        ("0001-01-01T00:00:00+01:00", False),  # before year 1 in UTC: astimezone overflows
    ],
)
def test_occurred_at_must_be_storable_in_utc(occurred_at: str, ok: bool) -> None:
    assert _fields(_item(occurred_at=occurred_at)) == ([] if ok else ["occurred_at"])


def test_the_422_message_says_why() -> None:
    with pytest.raises(ValidationError) as caught:
        normalise_item(_item(message_key="é" * 255, occurred_at="9999-12-31T23:00:00-05:00"))
    errors = {e.field: e.message for e in item_errors(0, caught.value)}
    assert "510 bytes" in errors["message_key"] and "255" in errors["message_key"]
    assert "outside the storable range" in errors["occurred_at"]


def test_sizes_fit_bigint_unsigned() -> None:
    assert _fields(_item(content={"size_bytes": 2**64})) == ["content.size_bytes"]
    assert _fields(_item(content={"size_bytes": 2**64 - 1})) == []


def _doc(**fields: Any) -> dict[str, Any]:
    return {"status": "delivered", "occurred_at": "2026-01-01T00:00:00Z", **fields}


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (_doc(snippet="x" * 256), "snippet"),  # VARCHAR(255)
        (_doc(subject="x" * 999), "subject"),  # VARCHAR(998)
        (_doc(sender="x" * 321), "sender"),  # VARCHAR(320)
        (_doc(folder="x" * 256), "folder"),
        (_doc(channel="x" * 33), "channel"),
        (_doc(error_code="x" * 65), "error_code"),
        (_doc(source="x" * 65), "source"),
        (_doc(thread_key="x" * 65), "thread_key"),
        (_doc(final_at="9999-12-31T12:00:00Z"), "final_at"),
        (_doc(occurred_at="9999-12-31T23:00:00-05:00"), "occurred_at"),
    ],
)
def test_an_old_postflight_record_over_a_column_does_not_decode(doc: dict[str, Any], field: str) -> None:
    # persist dead-letters what does not decode; the reason names the field.
    raw = orjson.dumps({"account_id": str(ACCOUNT), "message_key": "k", "version": 1, "message": doc})
    with pytest.raises(ValidationError) as caught:
        decode_postflight(raw)
    assert {e["loc"][:2] for e in caught.value.errors()} == {("message", field)}


def test_an_old_postflight_record_with_a_long_key_does_not_decode() -> None:
    raw = orjson.dumps(
        {"account_id": str(ACCOUNT), "message_key": "é" * 255, "version": 1, "message": _doc()}
    )
    with pytest.raises(ValidationError, match="message_key"):
        decode_postflight(raw)


def test_a_record_at_every_limit_round_trips() -> None:
    record = PostflightRecord(
        account_id=ACCOUNT,
        message_key="é" * 127,
        version=2**64 - 1,
        message=MessageDoc.model_validate(
            _doc(
                snippet="é" * 255,
                subject="😀" * 998,
                occurred_at=STORABLE_MIN,
                final_at="9999-12-30T23:59:59Z",
            )
        ),
    )
    assert decode_postflight(encode(record)) == record


offsets = st.builds(
    timezone,
    st.timedeltas(min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59)),
)


@given(st.datetimes(timezones=offsets))
def test_what_the_model_accepts_converts_to_a_datetime_column(when: datetime) -> None:
    try:
        Event.model_validate(_item(event_id="e1", occurred_at=when))
    except ValidationError as exc:
        assert [e["loc"] for e in exc.errors()] == [("occurred_at",)]
        with pytest.raises(ValueError, match="outside the storable range"):
            storable_utc(when)
        return
    utc = storable_utc(when)
    assert utc == when and utc.tzinfo is UTC
    assert STORABLE_MIN <= utc < STORABLE_MAX
    assert 1000 <= utc.replace(tzinfo=None).year <= 9999
