from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from libs.events import (
    Direction,
    Event,
    EventType,
    MessageFlags,
    MessagePatch,
    Participant,
    PostflightRecord,
    Status,
    decode_event,
    encode,
)
from libs.lifecycle import (
    DROPPED_WHEN_FINAL,
    MAX_SEEN_EVENT_IDS,
    MessageState,
    Outcome,
    OutcomeKind,
    apply,
    make_snippet,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ACCOUNT = 7 << 48 | 1

_counter = iter(range(10**9))


def ev(type_: EventType, *, at: int = 0, key: str = "m1", event_id: str | None = None, **kw: Any) -> Event:
    return Event(
        event_id=event_id or f"e{next(_counter)}",
        account_id=ACCOUNT,
        message_key=key,
        type=type_,
        occurred_at=T0 + timedelta(seconds=at),
        **kw,
    )


def run(
    events: Iterable[Event], state: MessageState | None = None
) -> tuple[MessageState | None, list[Outcome]]:
    """Apply ``events`` in turn. Every step also checks that apply leaves the state it was given
    as it was (it builds its states without pydantic's validation or copy) and that the state it
    returns is one the model validates as it is."""
    outcomes = []
    for event in events:
        before = None if state is None else state.model_dump()
        outcome = apply(state, event)
        assert state is None or state.model_dump() == before
        if outcome.state is not None:
            assert MessageState.model_validate(outcome.state.model_dump()) == outcome.state
        outcomes.append(outcome)
        state = outcome.state
    return state, outcomes


def records(outcomes: list[Outcome]) -> list[PostflightRecord]:
    return [o.record for o in outcomes if o.record is not None]


def test_outbound_in_order_is_stored_when_sent_and_updated_when_delivered() -> None:
    state, outcomes = run([
        ev(EventType.ACCEPTED, at=0, content={"from": "a@x.io", "to": ["b@y.io"], "subject": "Hi",
                                             "body_text": "  Hello\n\n  world  "}),
        ev(EventType.QUEUED, at=1),
        ev(EventType.SENDING, at=2),
        ev(EventType.SENT, at=3),
        ev(EventType.DELIVERED, at=4),
    ])  # fmt: skip
    assert [o.kind for o in outcomes] == [OutcomeKind.APPLIED] * 3 + [OutcomeKind.EMITTED] * 2
    sent, delivered = records(outcomes)
    assert sent.version == 1 and sent.content_version is None and not sent.deleted
    doc = sent.message
    assert doc.status is Status.SENT and doc.direction is Direction.OUTBOUND
    assert (
        doc.sender == Participant(email="a@x.io")
        and doc.to == [Participant(email="b@y.io")]
        and doc.subject == "Hi"
    )
    assert doc.snippet == "Hello world"
    assert doc.unread is False  # outbound default
    assert doc.occurred_at == T0 and doc.final_at is None
    # The delivery report is an update: the status, no content (persist keeps it).
    assert delivered.version == 2 and delivered.content_version == 0
    assert delivered.message.status is Status.DELIVERED and delivered.message.subject is None
    assert delivered.message.final_at == T0 + timedelta(seconds=4)
    assert state is not None and state.final and state.version == 2 and state.subject is None


def test_a_sent_message_is_not_final_and_keeps_no_content() -> None:
    state, outcomes = run([
        ev(EventType.ACCEPTED, at=0, content={"subject": "Hi"}),
        ev(EventType.SENT, at=1),
    ])  # fmt: skip
    assert outcomes[-1].kind is OutcomeKind.EMITTED and outcomes[-1].reason == "stored: sent"
    assert state is not None and not state.final and state.subject is None
    # Stored, so an update goes out as an update, not as a patch.
    outcome = apply(state, ev(EventType.UPDATED, flags={"starred": True}))
    assert outcome.record is not None and outcome.record.patch is None
    assert outcome.record.message.starred is True and outcome.record.message.status is Status.SENT
    # A late stage's content never set before goes out; a duplicate of it changes nothing.
    late = apply(outcome.state, ev(EventType.QUEUED, content={"channel": "email"}, event_id="q"))
    assert late.record is not None and late.record.message.channel == "email"
    assert apply(late.state, ev(EventType.QUEUED, content={"channel": "email"}, event_id="q2")).record is None


def test_snippet_is_bounded_and_collapsed() -> None:
    assert make_snippet("a\t b\n" + "x" * 500) == ("a b " + "x" * 500)[:200]
    assert make_snippet(None) is None


def test_inbound_defaults_unread_and_synced_is_final_on_arrival() -> None:
    _, outcomes = run([ev(EventType.SYNCED, source="api", content={"subject": "S"},
                          flags={"folder": "INBOX"})])  # fmt: skip
    (record,) = records(outcomes)
    doc = record.message
    assert doc.status is Status.RECEIVED and doc.direction is Direction.INBOUND
    assert doc.unread is True and doc.folder == "INBOX" and doc.source == "imap"

    _, outcomes = run([ev(EventType.SYNCED, direction="outbound", source="imap")])
    (record,) = records(outcomes)
    assert record.message.direction is Direction.OUTBOUND and record.message.status is Status.SENT


def test_inbound_lifecycle_and_raw_mime_is_carried_without_crashing() -> None:
    _, outcomes = run([
        ev(EventType.RECEIVING, at=0, content={"raw_mime": "bm90IHJlYWxseSBNSU1F"}),
        ev(EventType.RECEIVED, at=1),
    ])  # fmt: skip
    (record,) = records(outcomes)
    assert record.message.status is Status.RECEIVED and record.message.unread is True


def test_duplicate_event_id_is_ignored_and_state_unchanged() -> None:
    first = ev(EventType.ACCEPTED, event_id="dup")
    state, _ = run([first])
    outcome = apply(state, first)
    assert outcome.kind is OutcomeKind.IGNORED and not outcome.changed
    assert outcome.state is state
    assert outcome.reason is not None and "duplicate event_id" in outcome.reason


def test_late_lower_status_is_ignored_but_fills_gaps() -> None:
    state, outcomes = run([
        ev(EventType.SENT, at=3),
        ev(EventType.QUEUED, at=1, content={"subject": "from queued", "channel": "email"}),
    ])  # fmt: skip
    # sent is stored: what the late event filled goes out as an update, and leaves the state.
    record = outcomes[1].record
    assert outcomes[1].kind is OutcomeKind.EMITTED and record is not None
    assert record.message.subject == "from queued" and record.content_version == record.version
    assert state is not None and state.status is Status.SENT and state.subject is None
    assert state.occurred_at == T0 + timedelta(seconds=1)
    state, outcomes = run([
        ev(EventType.SENDING, at=3),
        ev(EventType.QUEUED, at=1, content={"subject": "from queued", "channel": "email"}),
    ])  # fmt: skip
    assert outcomes[1].kind is OutcomeKind.IGNORED and outcomes[1].changed
    assert state is not None and state.status is Status.SENDING and state.subject == "from queued"


def test_failed_from_any_non_final_state_and_error_code() -> None:
    for before in (EventType.ACCEPTED, EventType.QUEUED, EventType.SENDING, EventType.SENT):
        _, outcomes = run([ev(before), ev(EventType.FAILED, content={"error_code": "30003"})])
        record = records(outcomes)[-1]
        assert record.message.status is Status.FAILED and record.message.error_code == "30003"


@pytest.mark.parametrize(
    ("events", "reason"),
    [
        ([EventType.FAILED, EventType.DELIVERED], "delivered after failed"),
        ([EventType.UNDELIVERED, EventType.FAILED], "failed after undelivered"),
        ([EventType.DELIVERED, EventType.FAILED], "failed after delivered"),
        ([EventType.RECEIVED, EventType.DELIVERED], "on an inbound message"),
        ([EventType.RECEIVING, EventType.SENT], "on an inbound message"),
        ([EventType.ACCEPTED, EventType.RECEIVED], "on an outbound message"),
        ([EventType.DELIVERED, EventType.DELETED, EventType.UPDATED], "message was deleted"),
        ([EventType.DELIVERED, EventType.DELETED, EventType.REDACTED], "message was deleted"),
    ],
)
def test_impossible_transitions_are_rejected_with_reason(events: list[EventType], reason: str) -> None:
    state, outcomes = run([ev(t, at=i) for i, t in enumerate(events)])
    last = outcomes[-1]
    assert last.kind is OutcomeKind.REJECTED
    assert last.reason is not None and reason in last.reason
    assert last.record is None and not last.changed
    assert state is outcomes[-2].state  # a rejection leaves the state untouched


def test_event_direction_contradicting_its_status_is_rejected() -> None:
    outcome = apply(None, ev(EventType.DELIVERED, direction="inbound"))
    assert outcome.kind is OutcomeKind.REJECTED and outcome.state is None
    assert outcome.reason is not None and "outbound status" in outcome.reason


def test_same_final_again_is_a_duplicate() -> None:
    _, outcomes = run([ev(EventType.DELIVERED), ev(EventType.DELIVERED)])
    assert outcomes[1].kind is OutcomeKind.IGNORED
    assert outcomes[1].reason is not None and "duplicate final" in outcomes[1].reason


def test_updates_after_final_emit_only_real_changes_with_next_versions() -> None:
    _, outcomes = run([
        ev(EventType.RECEIVED, content={"subject": "s", "body_text": "secret"}),
        ev(EventType.UPDATED, flags={"unread": False}),
        ev(EventType.UPDATED, flags={"unread": False}),  # no change
        ev(EventType.UPDATED, flags={"starred": True, "labels": ["a"], "folder": "Archive"}),
        ev(EventType.REDACTED),
        ev(EventType.REDACTED),  # already redacted
        ev(EventType.DELETED),
        ev(EventType.DELETED),  # already deleted
        ev(EventType.RECEIVING),  # late status after deletion
    ])  # fmt: skip
    kinds = [o.kind for o in outcomes]
    assert kinds == [OutcomeKind.EMITTED, OutcomeKind.EMITTED, OutcomeKind.IGNORED, OutcomeKind.EMITTED,
                     OutcomeKind.EMITTED, OutcomeKind.IGNORED, OutcomeKind.EMITTED, OutcomeKind.IGNORED,
                     OutcomeKind.IGNORED]  # fmt: skip
    recs = records(outcomes)
    assert [r.version for r in recs] == [1, 2, 3, 4, 5]
    assert recs[1].message.unread is False
    assert recs[2].message.starred and recs[2].message.labels == ["a"] and recs[2].message.folder == "Archive"
    redacted = recs[3].message
    assert redacted.redacted and redacted.body_text is None and redacted.subject is None
    assert redacted.snippet is None
    assert recs[4].deleted and not recs[3].deleted


def test_updates_before_final_show_in_the_final_record() -> None:
    _, outcomes = run([
        ev(EventType.RECEIVING, content={"body_text": "b", "subject": "s"}),
        ev(EventType.UPDATED, flags={"unread": False, "starred": True}),
        ev(EventType.REDACTED),
        ev(EventType.RECEIVED, content={"body_text": "again"}),  # may not bring content back
    ])  # fmt: skip
    # The update and the redaction go out as patches, for a stored row transform may have forgotten.
    assert [o.kind for o in outcomes[:3]] == [OutcomeKind.APPLIED, OutcomeKind.EMITTED, OutcomeKind.EMITTED]
    flags_patch, redaction, record = records(outcomes)
    assert flags_patch.patch == MessagePatch(flags=MessageFlags(unread=False, starred=True))
    assert redaction.patch == MessagePatch(redacted=True) and redaction.content_version == 0
    assert record.patch is None and record.content_version is None
    doc = record.message
    assert [r.version for r in (flags_patch, redaction, record)] == [1, 2, 3]
    assert doc.unread is False and doc.starred is True and doc.redacted is True
    assert doc.body_text is None and doc.subject is None


def test_deleted_before_final_then_final_is_rejected() -> None:
    _, outcomes = run([ev(EventType.ACCEPTED), ev(EventType.DELETED), ev(EventType.DELIVERED)])
    deletion = outcomes[1].record
    assert deletion is not None and deletion.patch == MessagePatch(deleted=True) and deletion.deleted
    assert outcomes[2].kind is OutcomeKind.REJECTED


def test_seen_ids_are_bounded_and_state_round_trips_as_json() -> None:
    state, _ = run([ev(EventType.RECEIVED)] + [ev(EventType.UPDATED, flags={"unread": i % 2 == 0})
                                              for i in range(100)])  # fmt: skip
    assert state is not None and len(state.seen_event_ids) == MAX_SEEN_EVENT_IDS
    assert MessageState.model_validate_json(state.model_dump_json()) == state


def test_state_of_another_message_is_a_programming_error() -> None:
    state, _ = run([ev(EventType.ACCEPTED, key="a")])
    with pytest.raises(ValueError, match="another message"):
        apply(state, ev(EventType.SENT, key="b"))


def test_a_bounce_of_another_recipient_makes_a_delivered_message_undelivered_in_any_order() -> None:
    sent = [ev(EventType.ACCEPTED, at=0, content={"subject": "Hi"}), ev(EventType.SENT, at=1)]
    delivered = ev(EventType.DELIVERED, at=5, event_id="d", content={"error_code": "2.0.0"})
    bounced = ev(EventType.UNDELIVERED, at=6, event_id="u", content={"error_code": "5.1.1 unknown user"})
    first, first_outcomes = run([*sent, delivered, bounced])
    second, second_outcomes = run([*sent, bounced, delivered])
    assert first is not None and second is not None
    # The late delivery only moves final_at back to the first report.
    assert first_outcomes[-1].record is not None and second_outcomes[-1].record is not None
    assert second_outcomes[-1].record.message.status is Status.UNDELIVERED
    assert _comparable(first) == _comparable(second)
    assert first.status is Status.UNDELIVERED and first.final_at == T0 + timedelta(seconds=5)
    assert stored(records(first_outcomes)) == stored(records(second_outcomes))
    assert stored(records(first_outcomes))["error_code"] == "5.1.1 unknown user"
    # A bounce overrides a delivery only: after failed, it is still impossible.
    _, outcomes = run([*sent, ev(EventType.FAILED, at=2), bounced])
    assert outcomes[-1].kind is OutcomeKind.REJECTED


# -- properties -----------------------------------------------------------------------------------

_PREFIX = (EventType.ACCEPTED, EventType.QUEUED, EventType.SENDING, EventType.SENT)
_FINALS = (EventType.DELIVERED, EventType.UNDELIVERED, EventType.FAILED)
texts = st.text(st.characters(codec="utf-8"), max_size=30)


@st.composite
def valid_outbound(draw: st.DrawFn) -> list[Event]:
    prefix = [t for t in _PREFIX if draw(st.booleans())]
    types = [*prefix, draw(st.sampled_from(_FINALS))]
    events = []
    for i, type_ in enumerate(types):
        content = draw(st.fixed_dictionaries({}, optional={
            "subject": texts, "body_text": texts, "channel": st.sampled_from(["sms", "email"]),
            "to": st.lists(st.emails(), max_size=2),
        }))  # fmt: skip
        flags = draw(st.fixed_dictionaries({}, optional={"starred": st.booleans()})) if i == 0 else {}
        # Round-trip through the wire format, as transform sees the events.
        event = ev(type_, at=i * 10, event_id=f"id-{i}", content=content or None, flags=flags or None)
        events.append(decode_event(encode(event)))
    return events


_FLAG_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "unread": st.booleans(),
    "starred": st.booleans(),
    "folder": st.sampled_from(["INBOX", "Archive", "Receipts"]),
    "labels": st.lists(st.sampled_from(["a", "b", "c"]), max_size=2, unique=True),
}


@st.composite
def valid_message(draw: st.DrawFn) -> list[Event]:
    """One message's events in the order they happened: an outbound or inbound lifecycle, then
    what its owner did to it: updates (each of its own flag, so that any two commute), a
    redaction, a deletion (last: nothing may change a deleted message)."""
    if draw(st.booleans()):
        events = draw(valid_outbound())
    else:
        types = [*([EventType.RECEIVING] if draw(st.booleans()) else []), EventType.RECEIVED]
        events = []
        for i, type_ in enumerate(types):
            content = draw(st.fixed_dictionaries({}, optional={
                "subject": texts, "body_text": texts, "cc": st.lists(st.emails(), max_size=2),
            }))  # fmt: skip
            flags = draw(st.fixed_dictionaries({}, optional={"folder": st.just("INBOX")})) if i == 0 else {}
            event = ev(type_, at=i * 10, event_id=f"in-{i}", content=content or None, flags=flags or None)
            events.append(decode_event(encode(event)))
    changes: list[Event] = []
    for name in draw(st.lists(st.sampled_from(sorted(_FLAG_VALUES)), unique=True, max_size=4)):
        changes.append(ev(EventType.UPDATED, flags={name: draw(_FLAG_VALUES[name])}))
    if draw(st.booleans()):
        changes.append(ev(EventType.REDACTED))
    changes = draw(st.permutations(changes))
    if draw(st.booleans()):
        changes.append(ev(EventType.DELETED))
    for j, change in enumerate(changes):
        event = change.model_copy(
            update={"event_id": f"change-{j}", "occurred_at": T0 + timedelta(seconds=100 + j)}
        )
        events.append(decode_event(encode(event)))
    return events


@st.composite
def shuffled_with_duplicates(draw: st.DrawFn) -> tuple[list[Event], list[Event]]:
    events = draw(valid_message())
    delivered = draw(st.permutations(events + draw(st.lists(st.sampled_from(events), max_size=6))))
    return events, delivered


def _comparable(state: MessageState) -> dict[str, Any]:
    return state.model_dump(exclude={"seen_event_ids", "version"})


def _first_deliveries(delivered: list[Event]) -> list[Event]:
    seen: set[str] = set()
    out = []
    for event in delivered:
        if event.event_id not in seen:
            seen.add(event.event_id)
            out.append(event)
    return out


@settings(max_examples=500, deadline=None)
@given(shuffled_with_duplicates())
def test_any_order_and_duplication_gives_one_first_record_and_same_state(
    case: tuple[list[Event], list[Event]],
) -> None:
    """Outbound and inbound lifecycles with updates, redaction and deletion, in any order of
    arrival and with duplicates: one full record, versions without gaps, and persist (the model
    ``stored``) ends with the row of the events in the order they happened. A deletion that
    arrives before the message's final status makes that status impossible (it is rejected and no
    row is made); a deletion that arrives last ends where the order they happened ends."""
    in_order, delivered = case
    note(repr([(e.type.value, e.event_id, e.content, e.flags) for e in in_order]))
    note(repr([e.event_id for e in delivered]))
    expected, expected_outcomes = run(in_order)
    note(repr(records(expected_outcomes)))
    state, outcomes = run(delivered)
    assert expected is not None and state is not None
    assert sorted(state.seen_event_ids) == sorted(
        o_event.event_id
        for o_event, o in zip(delivered, outcomes, strict=True)
        if o.kind is not OutcomeKind.REJECTED and not (o.reason or "").startswith("duplicate event_id")
    )

    recs = records(outcomes)
    versions = [r.version for r in recs]
    assert versions == list(range(1, len(recs) + 1))
    assert state.version == len(recs)
    full = [r for r in recs if r.patch is None and r.content_version is None]
    assert len(full) <= 1
    final_row = stored(records(expected_outcomes))
    deletion = next((e for e in in_order if e.type is EventType.DELETED), None)
    if deletion is None or _first_deliveries(delivered)[-1].event_id == deletion.event_id:
        assert not any(o.kind is OutcomeKind.REJECTED for o in outcomes)
        assert _comparable(state) == _comparable(expected)
        # The first record: the final status, or sent when the message was sent first.
        assert len(full) == 1 and full[0].message.status in (expected.status, Status.SENT)
        # persist ends with the same row whatever the order of the events, and of the records.
        assert stored(recs) == final_row
        assert stored(reversed(recs)) == final_row
        return
    assert state.deleted
    for o in outcomes:
        if o.kind is OutcomeKind.REJECTED:
            assert o.reason is not None and "message was deleted" in o.reason, o.reason
    row = stored(recs)
    assert row == {} or (row["deleted"] and all(row[k] is None for k in _ERASED))
    if full:
        assert row == stored(reversed(recs))


_STATUS_COLUMNS = ("status", "direction", "unread", "starred", "folder", "labels", "source", "occurred_at",
                   "final_at")  # fmt: skip
_CONTENT_COLUMNS = ("channel", "sender", "to", "cc", "subject", "snippet", "body_text", "body_html",
                    "error_code", "attachments", "thread_key", "size_bytes", "parse_warnings")  # fmt: skip
_ERASED = ("subject", "snippet", "body_text", "body_html", "attachments")


def stored(recs: Iterable[PostflightRecord]) -> dict[str, Any]:
    """The row persist keeps from ``recs`` in this order of arrival: the contract of
    libs.events.PostflightRecord (status and flags by version; a content field takes the value of
    the record with the highest content version that carries one, and only an erasure blanks it;
    erasure is for ever and blanks the erasable fields whatever the versions; patches change a
    stored row only)."""
    row: dict[str, Any] = {}
    for r in recs:
        doc = r.message.model_dump()
        empty = {k: None for k in doc if doc[k] in ([], None)}
        if r.patch is not None:
            if not row:
                continue
            flags = r.patch.flags.model_dump(exclude_none=True) if r.patch.flags else {}
            if r.version > row["version"]:
                row.update(flags)
            if r.patch.redacted or r.patch.deleted:
                row.update(dict.fromkeys(_ERASED), redacted=row["redacted"] or r.patch.redacted,
                           deleted=row["deleted"] or r.patch.deleted)  # fmt: skip
                row["content_version"] = max(row["content_version"], r.version)
            row["version"] = max(row["version"], r.version)
            continue
        if not row:
            row = dict.fromkeys((*_STATUS_COLUMNS, *_CONTENT_COLUMNS)) | {
                "version": 0, "content_version": 0, "redacted": False, "deleted": False}  # fmt: skip
        if r.version > row["version"]:
            row.update({k: doc[k] for k in _STATUS_COLUMNS})
        content_version = r.version if r.content_version is None else r.content_version
        erase = r.deleted or r.message.redacted
        for k in _CONTENT_COLUMNS:
            if content_version > row["content_version"]:  # newer: its values win, its nulls keep
                if (erase and k in _ERASED) or k not in empty:
                    row[k] = None if k in empty else doc[k]
            elif (
                row[k] is None
                and k not in empty
                and not (k in _ERASED and (row["redacted"] or row["deleted"]))
            ):
                row[k] = doc[k]  # older: it only fills what no newer record carried
        row["redacted"] = row["redacted"] or r.message.redacted
        row["deleted"] = row["deleted"] or r.deleted
        if row["redacted"] or row["deleted"]:  # whatever the versions
            row.update(dict.fromkeys(_ERASED))
        row["version"] = max(row["version"], r.version)
        row["content_version"] = max(row["content_version"], content_version)
    return {k: v for k, v in row.items() if k not in ("version", "content_version")}


@settings(max_examples=200, deadline=None)
@given(
    valid_outbound(),
    st.lists(
        st.sampled_from([EventType.UPDATED, EventType.REDACTED, EventType.DELETED, *_FINALS, *_PREFIX]),
        max_size=8,
    ),
    st.data(),
)
def test_versions_strictly_increase_and_rejections_carry_reasons(
    lifecycle: list[Event], extra: list[EventType], data: st.DataObject
) -> None:
    tail = []
    for i, type_ in enumerate(extra):
        flags = {"unread": data.draw(st.booleans())} if type_ is EventType.UPDATED else None
        tail.append(ev(type_, at=100 + i, flags=flags))
    state, outcomes = run([*lifecycle, *tail])
    versions = [r.version for r in records(outcomes)]
    assert versions == sorted(set(versions)) and versions[:1] == [1]
    assert state is not None and state.version == len(versions)
    # Its content stays only until the message is final and its record out.
    assert all(getattr(state, name) is None for name in DROPPED_WHEN_FINAL)
    for outcome in outcomes:
        if outcome.kind in (OutcomeKind.REJECTED, OutcomeKind.IGNORED):
            assert outcome.reason
            assert outcome.record is None
        if outcome.kind is OutcomeKind.REJECTED:
            assert not outcome.changed
