"""docs/schemas/*.json are what ``python -m cli.topic_schemas`` generates, and the records the
services really produce satisfy them (ingest's posted-batch path, transform's lifecycle, the
change relay's row encoding); the contract tolerates new fields and refuses other versions."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from cli import topic_schemas
from libs.events import ChangeRecord, Event, EventType, PostflightRecord, decode_event, encode
from libs.kafka import CHANGES, INFLIGHT, POSTFLIGHT
from libs.lifecycle import MessageState, apply
from services.ingest.validation import check_batch
from services.persist.relay import change_message

ACCOUNT = 1 << 48 | 7
WHEN = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _validator(topic: str) -> Draft202012Validator:
    [spec] = [s for s in topic_schemas.TOPIC_SCHEMAS if s.topic == topic]
    schema = json.loads((topic_schemas.SCHEMA_DIR / spec.file_name).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _posted() -> list[dict[str, Any]]:
    """Events as an application posts them: ids as strings, nulls, the ``from`` alias."""
    base = {"account_id": str(ACCOUNT), "message_key": "m-1", "occurred_at": WHEN.isoformat()}
    return [
        base
        | {
            "type": "message.accepted",
            "direction": "outbound",
            "content": {"from": "a@x.test", "to": ["b@y.test"], "subject": "hi", "body_text": "hello"},
        },
        base | {"type": "message.sent", "event_id": "e-2", "flags": None},
        base | {"type": "message.delivered", "source": "smtp", "content": {"channel": "email"}},
    ]


def _inflight_values() -> list[bytes]:
    batch = check_batch(_posted(), WHEN)
    assert not batch.errors
    return list(batch.values)


def _postflight_values() -> list[bytes]:
    state: MessageState | None = None
    values = []
    for position, raw in enumerate(_inflight_values()):
        outcome = apply(state, decode_event(raw), now=WHEN, position=position)
        state = outcome.state
        if outcome.record is not None:
            values.append(encode(outcome.record))
    update = Event(
        event_id="e-4",
        account_id=ACCOUNT,
        message_key="m-1",
        type=EventType.UPDATED,
        occurred_at=WHEN,
        flags={"unread": False, "labels": ["x"]},  # type: ignore[arg-type]
    )
    outcome = apply(state, update, now=WHEN, position=9)
    assert outcome.record is not None
    values.append(encode(outcome.record))
    return values


def _change_values() -> list[bytes]:
    rows = [
        (1970324836974593, ACCOUNT, 12, "message", 1970324836974601, "created", 3, "1796040062.12", "sent"),
        (1970324836974594, ACCOUNT, None, "message", 1970324836974601, "updated", 4, "1796040063", None),
    ]
    return [change_message(7, row)[1] for row in rows]


def test_schema_files_are_current() -> None:
    for spec in topic_schemas.TOPIC_SCHEMAS:
        on_disk = (topic_schemas.SCHEMA_DIR / spec.file_name).read_text()
        assert on_disk == topic_schemas.render(spec), (
            f"docs/schemas/{spec.file_name} is out of date: run `python -m cli.topic_schemas` and commit it"
        )


def test_check_mode_fails_on_stale_or_missing_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert topic_schemas.main(["--check", "--output", str(tmp_path)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert topic_schemas.main(["--output", str(tmp_path)]) == 0
    assert topic_schemas.main(["--check", "--output", str(tmp_path)]) == 0
    stale = tmp_path / "postflight.json"
    stale.write_text(stale.read_text().replace('"deleted"', '"removed"'))
    assert topic_schemas.main(["--check", "--output", str(tmp_path)]) == 1


def test_every_consumed_topic_has_a_schema() -> None:
    assert {s.topic for s in topic_schemas.TOPIC_SCHEMAS} == {INFLIGHT, POSTFLIGHT, CHANGES}
    assert [s.model for s in topic_schemas.TOPIC_SCHEMAS] == [Event, PostflightRecord, ChangeRecord]


@pytest.mark.parametrize(
    ("topic", "values"),
    [(INFLIGHT, _inflight_values), (POSTFLIGHT, _postflight_values), (CHANGES, _change_values)],
    ids=["inflight", "postflight", "changes"],
)
def test_produced_records_satisfy_their_schema(topic: str, values: Any) -> None:
    validator = _validator(topic)
    produced = values()
    assert len(produced) >= 2
    for raw in produced:
        record = orjson.loads(raw)
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(record)]
        assert not errors, (record, errors)
        assert record["schema_version"] == 1


def test_change_records_are_what_the_model_says() -> None:
    for raw in _change_values():
        model = ChangeRecord.model_validate_json(raw)  # the model refuses unknown fields
        published = orjson.loads(raw)
        assert model.created_at == datetime.fromisoformat(published.pop("created_at"))
        dumped = model.model_dump(mode="json", exclude={"created_at"})
        if dumped["status"] is None:  # published only when the change moved the status
            del dumped["status"]
        assert dumped == published


@pytest.mark.parametrize(
    ("topic", "values"),
    [(INFLIGHT, _inflight_values), (POSTFLIGHT, _postflight_values), (CHANGES, _change_values)],
    ids=["inflight", "postflight", "changes"],
)
def test_the_contract_tolerates_new_fields_and_refuses_other_versions(topic: str, values: Any) -> None:
    validator = _validator(topic)
    record = orjson.loads(values()[0])
    validator.validate(record | {"added_in_a_later_release": {"any": "thing"}})  # compatible
    for version in (2, 0, "1"):
        with pytest.raises(ValidationError):
            validator.validate(record | {"schema_version": version})
    without = copy.deepcopy(record)
    del without["schema_version"]
    with pytest.raises(ValidationError):
        validator.validate(without)
    broken = copy.deepcopy(record)
    broken["account_id"] = {"not": "an id"}
    with pytest.raises(ValidationError):
        validator.validate(broken)
