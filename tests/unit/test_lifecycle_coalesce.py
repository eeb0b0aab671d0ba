"""libs.lifecycle.coalesced: two records of one message as the one record persist's own fold of
the two makes (services.persist.writer.latest_per_message), encoded as libs.events.encode would
(its keys in another order); None wherever persist would keep them apart."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from libs.events import EventType, MessageContent, MessageFlags, PostflightRecord, encode
from libs.lifecycle import Outcome, coalesced, postflight_value
from services.persist.writer import latest_per_message
from tests.unit.test_lifecycle import ev, run

CONTENT = MessageContent.model_validate({
    "from": "a@example.test", "to": ["b@example.test"], "subject": "hi", "body_text": "hello " * 50,
})  # fmt: skip


def _emitted(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    return [o.postflight for o in outcomes if o.postflight is not None]


def _as_persist_folds(first: dict[str, Any], then: dict[str, Any]) -> None:
    merged = coalesced(first, then)
    assert merged is not None
    record = PostflightRecord.model_validate(merged)
    folded = latest_per_message(
        [PostflightRecord.model_validate(first), PostflightRecord.model_validate(then)]
    )
    assert folded == [record]
    assert orjson.loads(postflight_value(merged)) == orjson.loads(encode(record))  # keys in another order


def test_a_message_sent_then_delivered_goes_out_as_one_delivered_record_with_its_content() -> None:
    _, outcomes = run([
        ev(EventType.ACCEPTED, content=CONTENT), ev(EventType.QUEUED, at=1), ev(EventType.SENT, at=2),
        ev(EventType.DELIVERED, at=3),
    ])  # fmt: skip
    first, then = _emitted(outcomes)
    _as_persist_folds(first, then)
    merged = coalesced(first, then)
    assert merged is not None
    assert merged["message"]["status"] == "delivered" and merged["message"]["subject"] == "hi"
    assert merged["version"] == then["version"] and merged["content_version"] == first["version"]
    assert "final_at" in merged["message"] and "final_at" not in first["message"]


@given(
    unread=st.sampled_from([True, False, None]),
    starred=st.sampled_from([True, False, None]),
    folder=st.sampled_from(["Archive", None]),
    labels=st.sampled_from([["a", "b"], [], None]),
)
def test_a_flags_change_after_the_first_record_folds_in_as_persist_folds_it(
    unread: bool | None, starred: bool | None, folder: str | None, labels: list[str] | None
) -> None:
    flags = MessageFlags(unread=unread, starred=starred, folder=folder, labels=labels)
    _, outcomes = run([ev(EventType.SENT, content=CONTENT), ev(EventType.UPDATED, at=1, flags=flags)])
    emitted = _emitted(outcomes)
    if len(emitted) == 2:  # a flags change that changes nothing emits nothing
        _as_persist_folds(*emitted)


def test_records_that_carry_content_patch_or_erase_stay_apart() -> None:
    _, outcomes = run([ev(EventType.SENT), ev(EventType.DELIVERED, at=1, content=CONTENT)])
    first, late_content = _emitted(outcomes)
    assert late_content["content_version"] > 0
    assert coalesced(first, late_content) is None
    _, outcomes = run([ev(EventType.SENT, content=CONTENT), ev(EventType.REDACTED, at=1)])
    first, redaction = _emitted(outcomes)
    assert coalesced(first, redaction) is None
    _, outcomes = run([ev(EventType.SENT, content=CONTENT), ev(EventType.DELETED, at=1)])
    assert coalesced(*_emitted(outcomes)) is None
    _, outcomes = run([ev(EventType.UPDATED, flags=MessageFlags(starred=True)), ev(EventType.SENT, at=1)])
    emitted = _emitted(outcomes)
    assert "patch" in emitted[0] and coalesced(emitted[0], emitted[-1]) is None
