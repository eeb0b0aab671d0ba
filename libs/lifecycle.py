"""The message lifecycle state machine (Twilio Postflight): pure logic, no I/O.

:func:`apply` folds one inflight :class:`~libs.events.Event` into a message's
:class:`MessageState` and says what follows from it, as an :class:`Outcome`:

- ``emitted``: the state changed and a :class:`~libs.events.PostflightRecord` goes out (the first
  record of a message now stored, or an update of a stored one: its status, flags, redaction,
  deletion, late content);
- ``applied``: the state changed, nothing goes out yet (the message is not stored yet);
- ``ignored``: nothing to do, with why (a duplicate, a late status); the state may still have
  changed (the event id is remembered, a late event fills content gaps);
- ``rejected``: an impossible transition, with the reason; the state is unchanged and the
  event goes to the DLQ.

Stored: a message goes to postflight (and so to persist, the API, the delta feed and webhooks) once
it is final, or once an outbound message is ``sent``: most SMTP servers never send a delivery
report, so ``sent`` is where most mail stays, and a later ``delivered``, ``undelivered`` or
``failed`` goes out as an update of the stored message. Such a message's state is not final: it
waits for its report (transform's pending period) with its content dropped as a final one's.

Order independence: a status event's content fields are kept by rank (a field set by a later
lifecycle stage wins over one set by an earlier stage, whatever the arrival order), and a late
event only fills gaps. So any arrival order of one valid lifecycle ends in the same state.

Versions: a record's version is the inflight offset of the event that caused it, plus one (given
as ``position``; without it, as in unit tests, the state's version plus one). Offsets of one
message only grow (all its events are on one partition), so versions keep growing after transform
forgot a message, and replays give the same versions.

Bounded state: once a message is stored, its state keeps only what the lifecycle needs. The
content (participants, subject, bodies, attachments, parse warnings, threading ids) goes out in the
record and is dropped from the state (:data:`DROPPED_WHEN_FINAL`); ``content_ranks`` stays, so a
late event still only fills what was never set. A later record carries only the content its
event changed, with ``content_version`` (0 when none), and persist keeps the rest.

Patches: an update, redaction or deletion of a message that is not stored here (transform forgot
it after its grace period, or it is not stored yet) goes out as a *patch* record (flags and
erasure only) that persist applies to the stored row if there is one; the state keeps the change
too, for the first record when the message is stored. Content an update carries for such a
message reaches only that final record: a forgotten message's content changes only by redaction
or deletion.

Raw MIME: an event whose content carries ``raw_mime`` (IMAP sync, or posted) is expanded first by
:func:`libs.mime.expand_raw_mime` (pure and deterministic, so replays give the same state): the
headers, bodies, thread key, size, attachment metadata and parse warnings become content fields
and the raw bytes are dropped, so they never reach the state, its changelog or postflight.
Broken MIME still makes a message, with ``parse_warnings``; an event whose ``raw_mime`` cannot
be expanded at all is rejected (the DLQ) with the reason. Messages larger than
:data:`libs.mime.MAX_RAW_BYTES` are parsed up to that cut and warned ``truncated``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from libs.event_structs import StatusEvent
from libs.events import (
    SCHEMA_VERSION,
    AttachmentInfo,
    Direction,
    Event,
    EventType,
    MessageContent,
    MessageFlags,
    MessagePatch,
    ParticipantIn,
    PostflightRecord,
    Status,
    unvalidated,
)
from libs.messages import FLAG_FIELDS
from libs.mime import MAX_RAW_BYTES, collapse_whitespace, expand_raw_mime, html_to_text

__all__ = [
    "DROPPED_WHEN_FINAL",
    "MAX_SEEN_EVENT_IDS",
    "SNIPPET_CHARS",
    "AnyEvent",
    "MessageState",
    "Outcome",
    "OutcomeKind",
    "apply",
    "coalesced",
    "is_stored",
    "make_snippet",
    "postflight_value",
]

MAX_SEEN_EVENT_IDS: Final = 64
SNIPPET_CHARS: Final = 200

# What apply folds: an inflight event as pydantic decodes it, or as msgspec decodes a status
# event (no content, no flags), with the same fields (libs.event_structs).
AnyEvent = Event | StatusEvent

_FINAL_RANK: Final = 100
# An outbound message is stored from this rank on (sent), before it is final; see the docstring.
_STORED_RANK: Final = 4
# Content from message.updated is newer than anything a lifecycle stage carried.
_UPDATE_RANK: Final = 1000

_RANKS: Final[dict[Status, int]] = {
    Status.ACCEPTED: 1,
    Status.QUEUED: 2,
    Status.SENDING: 3,
    Status.SENT: _STORED_RANK,
    Status.DELIVERED: _FINAL_RANK,
    Status.UNDELIVERED: _FINAL_RANK,
    Status.FAILED: _FINAL_RANK,
    Status.RECEIVING: 1,
    Status.RECEIVED: _FINAL_RANK,
}
# A message to several recipients gets a report per recipient (or per group of them): it is
# undelivered when any recipient's report says so, whatever the order the reports come in, and
# the bounce's content (its reason in error_code) outranks what a delivery report carried.
_BOUNCE: Final = (Status.UNDELIVERED, Status.DELIVERED)  # (status, the final status it overrides)
_BOUNCE_CONTENT_RANK: Final = _FINAL_RANK + 1
_STATUS_OF: Final[dict[EventType, Status]] = {t: s for t in EventType if (s := t.status) is not None}
_INBOUND: Final = frozenset({Status.RECEIVING, Status.RECEIVED})

_CONTENT_FIELDS: Final = (
    "channel", "sender", "to", "cc", "bcc", "reply_to", "subject", "body_text", "body_html",
    "error_code", "thread_key", "size_bytes", "attachments", "parse_warnings", "date", "message_id",
    "in_reply_to", "references",
)  # fmt: skip
# What a redaction or a deletion erases, and what may not come back afterwards. Attachment
# filenames say as much as a subject; the thread key, size and parse warnings say nothing.
_ERASABLE: Final = frozenset({"subject", "body_text", "body_html", "attachments"})
# What a stored message's state drops once its record is out (persist has it): everything that can
# be large. The small fields stay: channel, error_code, thread_key, size_bytes, date.
DROPPED_WHEN_FINAL: Final = frozenset({
    "sender", "to", "cc", "bcc", "reply_to", "subject", "body_text", "body_html", "attachments",
    "parse_warnings", "message_id", "in_reply_to", "references",
})  # fmt: skip


class MessageState(BaseModel):
    """What transform knows about one message; stored as JSON in the changelog topic."""

    model_config = ConfigDict(extra="forbid")

    account_id: int
    message_key: str
    direction: Direction | None = None
    status: Status | None = None
    rank: int = 0
    source: str = "api"
    channel: str | None = None
    # Participants: bare-address strings in states written before they had names (read into
    # Participant, as libs.events reads them).
    sender: ParticipantIn | None = None
    to: list[ParticipantIn] | None = None
    cc: list[ParticipantIn] | None = None
    bcc: list[ParticipantIn] | None = None
    reply_to: list[ParticipantIn] | None = None
    subject: str | None = None
    body_text: str | None = None
    body_html: str | None = None
    error_code: str | None = None
    # From raw MIME (libs.mime); absent from states written before they existed.
    thread_key: str | None = None
    size_bytes: int | None = None
    attachments: list[AttachmentInfo] | None = None
    parse_warnings: list[str] | None = None
    date: AwareDatetime | None = None
    message_id: str | None = None
    in_reply_to: str | None = None
    references: list[str] | None = None
    # rank of the event that set each content field (see the module docstring)
    content_ranks: dict[str, int] = Field(default_factory=dict)
    unread: bool | None = None
    starred: bool | None = None
    folder: str | None = None
    labels: list[str] | None = None
    version: int = 0  # postflight records emitted so far
    final: bool = False
    deleted: bool = False
    redacted: bool = False
    occurred_at: AwareDatetime
    final_at: AwareDatetime | None = None
    seen_event_ids: list[str] = Field(default_factory=list)

    if not TYPE_CHECKING:
        # Assignment straight into the instance dict: pydantic's __setattr__ costs ~1 us, and apply
        # sets about eight fields an event. Nothing is lost: assignments are not validated anyway
        # (no validate_assignment), and nothing reads the fields-set record of a state.
        def __setattr__(self, name: str, value: object) -> None:
            self.__dict__[name] = value


class OutcomeKind(StrEnum):
    EMITTED = "emitted"
    APPLIED = "applied"
    IGNORED = "ignored"
    REJECTED = "rejected"


def _model_json(model: BaseModel) -> Any:
    """A model inside a record (a participant, an attachment, a patch) as pydantic writes it there."""
    return model.__pydantic_serializer__.to_python(model, mode="json", by_alias=True, exclude_none=True)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one event did. ``state`` is the state after the event (the old one when unchanged).

    ``postflight`` is the record that goes out, as its fields when it was emitted (None values
    left out, in the model's order): transform sends :attr:`value`, the bytes
    :func:`libs.events.encode` writes of :attr:`record`, without building the model, which cost
    three times as much (15.8 us a record, then 4.8 to encode it).
    """

    kind: OutcomeKind
    state: MessageState | None
    changed: bool = False
    postflight: dict[str, Any] | None = None
    reason: str | None = None

    @property
    def record(self) -> PostflightRecord | None:
        """The record, validated."""
        return None if self.postflight is None else PostflightRecord.model_validate(self.postflight)

    @property
    def value(self) -> bytes | None:
        """The record's postflight value."""
        return None if self.postflight is None else postflight_value(self.postflight)


def postflight_value(fields: dict[str, Any]) -> bytes:
    """A record's postflight value from its fields (:attr:`Outcome.postflight`)."""
    return orjson.dumps(fields, default=_model_json, option=orjson.OPT_UTC_Z)


def coalesced(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any] | None:
    """The one record (as fields) that writes what ``first`` and then ``then``, two records of one
    message, write: ``then``'s status and flags over ``first``'s content. None when they must go
    out as two: ``then`` carries content, either is a patch or erases.

    Transform coalesces a message's records within one transaction (a message stored when sent
    and delivered in one batch goes out once): persist then decodes, folds and writes one record
    where it took two, as its own fold of the two (``services.persist.writer._folded``) would.
    """
    if then.get("content_version") != 0 or "patch" in first or "patch" in then:
        return None
    doc, flags = first["message"], then["message"]
    if first["deleted"] or then["deleted"] or doc["redacted"] or flags["redacted"]:
        return None
    message = dict(doc)
    for name in FLAG_FIELDS:
        value = flags.get(name)
        if value is None:
            message.pop(name, None)
        else:
            message[name] = value
    return {**then, "message": message, "content_version": first.get("content_version", first["version"])}


# An HTML-only message's snippet is read from this much of its HTML at most.
_SNIPPET_HTML_CHARS: Final = 64 * 1024


def make_snippet(body_text: str | None, body_html: str | None = None) -> str | None:
    """The text's first characters, whitespace collapsed; from the HTML when there is no text."""
    if body_text is None:
        if body_html is None:
            return None
        return collapse_whitespace(html_to_text(body_html[:_SNIPPET_HTML_CHARS]), SNIPPET_CHARS) or None
    return collapse_whitespace(body_text, SNIPPET_CHARS)


def _doc_fields(state: MessageState) -> dict[str, Any]:
    """The fields of the state's :class:`~libs.events.MessageDoc`, in its order, None left out.
    The values are the state's own: a state's lists are replaced, never changed in place."""
    unread = state.unread if state.unread is not None else state.direction != Direction.OUTBOUND
    fields = dict(
        status=state.status,
        direction=state.direction,
        channel=state.channel,
        sender=state.sender,
        to=state.to or [],
        cc=state.cc or [],
        bcc=state.bcc or [],
        reply_to=state.reply_to or [],
        subject=state.subject,
        snippet=make_snippet(state.body_text, state.body_html),
        body_text=state.body_text,
        body_html=state.body_html,
        error_code=state.error_code,
        unread=unread,
        starred=bool(state.starred),
        folder=state.folder,
        labels=state.labels or [],
        occurred_at=state.occurred_at,
        final_at=state.final_at,
        redacted=state.redacted,
        source=state.source,
        thread_key=state.thread_key,
        size_bytes=state.size_bytes,
        attachments=state.attachments or [],
        parse_warnings=state.parse_warnings or [],
        date=state.date,
        message_id=state.message_id,
        in_reply_to=state.in_reply_to,
        references=state.references or [],
    )
    return {name: value for name, value in fields.items() if value is not None}


# Everything _doc_fields reads: comparing these is comparing the documents, without building them.
_DOC_FIELDS: Final = (
    "status", "direction", "channel", "sender", "to", "cc", "bcc", "reply_to", "subject", "body_text",
    "body_html", "error_code", "unread", "starred", "folder", "labels", "occurred_at", "final_at",
    "redacted", "source", "deleted", "thread_key", "size_bytes", "attachments", "parse_warnings",
    "date", "message_id", "in_reply_to", "references",
)  # fmt: skip


def _doc_view(state: MessageState) -> tuple[object, ...]:
    return tuple(getattr(state, name) for name in _DOC_FIELDS)


def _record(
    state: MessageState,
    now: datetime | None,
    *,
    content_version: int | None = None,
    patch: MessagePatch | None = None,
) -> dict[str, Any]:
    """A :class:`~libs.events.PostflightRecord`'s fields (see :class:`Outcome`)."""
    fields: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "account_id": str(state.account_id),
        "message_key": state.message_key, "version": state.version, "deleted": state.deleted,
        "message": _doc_fields(state), "emitted_at": datetime.now(UTC) if now is None else now,
    }  # fmt: skip
    if content_version is not None:
        fields["content_version"] = content_version
    if patch is not None:
        fields["patch"] = patch
    return fields


def _next_version(state: MessageState, position: int | None) -> int:
    return state.version + 1 if position is None else max(state.version + 1, position + 1)


def _drop_content(state: MessageState) -> None:
    # Only what is set: a model's setattr costs 0.8 us, and most messages carry few of these fields.
    for name in DROPPED_WHEN_FINAL:
        if getattr(state, name) is not None:
            setattr(state, name, None)


def _content_changed(old: MessageState, new: MessageState) -> bool:
    # An erasure is no content: persist erases by the sticky redacted and deleted flags, so a
    # redaction does not outrank content still on its way (a parked first record).
    return any(getattr(new, name) != getattr(old, name) for name in _CONTENT_FIELDS)


def is_stored(state: MessageState) -> bool:
    """Whether the message's first record is out (see the module docstring)."""
    return state.final or state.rank >= _STORED_RANK


def _emit_first(new: MessageState, now: datetime | None, position: int | None, reason: str) -> Outcome:
    """The first record of a message that is stored from now on: its whole content."""
    new.version = _next_version(new, position)
    record = _record(new, now)
    _drop_content(new)
    return Outcome(OutcomeKind.EMITTED, new, True, record, reason)


def _emit_update(
    old: MessageState | None, new: MessageState, now: datetime | None, position: int | None, reason: str
) -> Outcome:
    """A later record of a stored message: the content only when this event changed it (against
    ``old``, the state before the event; None for a message not seen before: all of it is new)."""
    new.version = _next_version(new, position)
    content_version = new.version if old is None or _content_changed(old, new) else 0
    record = _record(new, now, content_version=content_version)
    _drop_content(new)
    return Outcome(OutcomeKind.EMITTED, new, True, record, reason)


def _emit_patch(
    new: MessageState, now: datetime | None, position: int | None, patch: MessagePatch, reason: str
) -> Outcome:
    new.version = _next_version(new, position)
    return Outcome(OutcomeKind.EMITTED, new, True, _record(new, now, content_version=0, patch=patch), reason)


def _merge_content(state: MessageState, content: MessageContent | None, rank: int) -> None:
    if content is None:
        return
    for name in _CONTENT_FIELDS:
        value = getattr(content, name)
        if value is None or value == []:
            # An empty list says nothing, as persist stores it (a NULL that keeps what is stored):
            # taking it would let the order of arrival decide between it and a late fill.
            continue
        if name in _ERASABLE and (state.redacted or state.deleted):
            continue
        held = state.content_ranks.get(name)
        if held is None or rank > held:
            setattr(state, name, list(value) if isinstance(value, list) else value)
            state.content_ranks[name] = rank


def _merge_flags(state: MessageState, flags: MessageFlags | None, *, override: bool) -> None:
    """Updates override; flags carried by a lifecycle event only fill what no update has set."""
    if flags is None:
        return
    for name in ("unread", "starred", "folder", "labels"):
        value = getattr(flags, name)
        if value is not None and (override or getattr(state, name) is None):
            setattr(state, name, list(value) if isinstance(value, list) else value)


def _erase(state: MessageState) -> None:
    for name in _ERASABLE:
        setattr(state, name, None)
        state.content_ranks.pop(name, None)


# Every field's default, in the model's order; the required ones and the containers are set by
# each new state (the placeholders keep their places).
_DEFAULTS: Final = {
    name: None if info.default_factory is not None else info.default
    for name, info in MessageState.model_fields.items()
}
_NEW_FIELDS_SET: Final = frozenset({"account_id", "message_key", "occurred_at", "source"})


def _new(event: AnyEvent) -> MessageState:
    """A message's first state: 1.2 against 3.9 us through the validating constructor."""
    fields = _DEFAULTS.copy()
    fields.update(
        account_id=event.account_id, message_key=event.message_key, occurred_at=event.occurred_at,
        source=event.source, content_ranks={}, seen_event_ids=[],
    )  # fmt: skip
    return unvalidated(MessageState, fields, set(_NEW_FIELDS_SET))


def _copy(state: MessageState) -> MessageState:
    # Shallow, much cheaper than deep: lists held in fields are replaced, never changed in place,
    # except these two. 1.1 against 2.0 us through model_copy.
    fields = state.__dict__.copy()
    fields["content_ranks"] = state.content_ranks.copy()
    fields["seen_event_ids"] = state.seen_event_ids.copy()
    return unvalidated(MessageState, fields, state.__pydantic_fields_set__.copy())


def _remember(state: MessageState, event: AnyEvent) -> None:
    state.seen_event_ids.append(event.event_id)
    del state.seen_event_ids[:-MAX_SEEN_EVENT_IDS]
    if event.occurred_at < state.occurred_at:
        state.occurred_at = event.occurred_at


def _status_of(event: AnyEvent, direction: Direction) -> Status:
    if event.type is EventType.SYNCED:
        return Status.RECEIVED if direction is Direction.INBOUND else Status.SENT
    return _STATUS_OF[event.type]


def _implied_direction(event: AnyEvent) -> Direction | str:
    """The direction a status event belongs to, or a rejection reason."""
    if event.type is EventType.SYNCED:
        return event.direction or Direction.INBOUND
    status = _STATUS_OF[event.type]
    implied = Direction.INBOUND if status in _INBOUND else Direction.OUTBOUND
    if event.direction is not None and event.direction is not implied:
        return (
            f"{event.type.value} is an {implied.value} status but the event says "
            f"direction {event.direction.value}"
        )
    return implied


def _after_change(
    old: MessageState | None,
    new: MessageState,
    now: datetime | None,
    position: int | None,
    why_unchanged: str,
    *,
    emit_reason: str,
    patch: MessagePatch | None = None,
) -> Outcome:
    """A stored message emits an update when its document really changed; a message that is not
    stored here emits ``patch`` (if any) for persist to apply to a stored row."""
    stored = is_stored(new)
    if stored and (old is None or _doc_view(new) != _doc_view(old)):
        return _emit_update(old, new, now, position, emit_reason)
    if stored:
        return Outcome(OutcomeKind.IGNORED, new, True, reason=why_unchanged)
    if patch is not None:
        return _emit_patch(new, now, position, patch, f"{emit_reason} (patch: not stored here)")
    return Outcome(OutcomeKind.APPLIED, new, True, reason=emit_reason)


def apply(
    state: MessageState | None, event: AnyEvent, *, now: datetime | None = None, position: int | None = None
) -> Outcome:
    """Fold ``event`` into ``state`` (None for a message not seen yet). Never mutates ``state``.

    :param position: the event's inflight offset; a record it causes has version ``position + 1``.
    """
    if state is not None:
        if (state.account_id, state.message_key) != (event.account_id, event.message_key):
            raise ValueError("event belongs to another message than the state")
        if event.event_id in state.seen_event_ids:
            return Outcome(OutcomeKind.IGNORED, state, reason=f"duplicate event_id {event.event_id}")
        new = _copy(state)
    else:
        new = _new(event)
    if event.content is not None and event.content.raw_mime is not None:
        try:
            content = expand_raw_mime(event.content, max_bytes=MAX_RAW_BYTES)
        except Exception as exc:  # libs.mime never raises on bad MIME; this is the last line of defence
            return _reject(state, f"raw_mime cannot be turned into a message: {exc!r}"[:500])
        event = event.model_copy(update={"content": content})

    if event.type in _STATUS_OF or event.type is EventType.SYNCED:
        return _apply_status(state, new, event, now, position)
    if event.direction is not None and new.direction is not None and event.direction is not new.direction:
        return _reject(state, f"{event.type.value} says {event.direction.value} but the message is "
                              f"{new.direction.value}")  # fmt: skip
    if new.deleted:
        if event.type is EventType.DELETED:
            _remember(new, event)
            return Outcome(OutcomeKind.IGNORED, new, True, reason="message is already deleted")
        return _reject(state, f"{event.type.value}: message was deleted")
    if new.direction is None and event.direction is not None:
        new.direction = event.direction
    _remember(new, event)

    if event.type is EventType.UPDATED:
        _merge_flags(new, event.flags, override=True)
        _merge_content(new, event.content, _UPDATE_RANK)
        patch = MessagePatch(flags=event.flags) if event.flags is not None else None
        return _after_change(
            state, new, now, position, "update changed nothing", emit_reason="updated", patch=patch
        )
    if event.type is EventType.REDACTED:
        if new.redacted:
            return Outcome(OutcomeKind.IGNORED, new, True, reason="message is already redacted")
        _erase(new)
        new.redacted = True
        return _after_change(
            state, new, now, position, "redaction changed nothing", emit_reason="redacted",
            patch=MessagePatch(redacted=True),
        )  # fmt: skip
    # message.deleted
    _erase(new)
    new.deleted = True
    if not is_stored(new):
        return _emit_patch(new, now, position, MessagePatch(deleted=True), "deleted (patch: not stored here)")
    return _emit_update(state, new, now, position, "deleted")


def _reject(state: MessageState | None, reason: str) -> Outcome:
    return Outcome(OutcomeKind.REJECTED, state, reason=reason)


def _apply_status(
    state: MessageState | None,
    new: MessageState,
    event: AnyEvent,
    now: datetime | None,
    position: int | None,
) -> Outcome:
    implied = _implied_direction(event)
    if not isinstance(implied, Direction):
        return _reject(state, implied)
    if new.direction is not None and new.direction is not implied:
        return _reject(
            state,
            f"{implied.value} event {event.type.value} on an {new.direction.value} message",
        )
    status = _status_of(event, implied)
    rank = _FINAL_RANK if event.type is EventType.SYNCED else _RANKS[status]
    synced = event.type is EventType.SYNCED

    if new.deleted:
        if rank < new.rank or status == new.status:
            _remember(new, event)
            return Outcome(OutcomeKind.IGNORED, new, True, reason=f"late {status.value}: message was deleted")
        return _reject(state, f"{event.type.value}: message was deleted")

    content_rank = _BOUNCE_CONTENT_RANK if status is _BOUNCE[0] else rank
    if new.final:
        bounce = (status, new.status) == _BOUNCE  # another recipient's report: undelivered now
        late_delivery = (new.status, status) == _BOUNCE
        if rank == _FINAL_RANK and status != new.status and not (bounce or late_delivery):
            return _reject(state, f"{status.value} after {new.status.value if new.status else 'final'}")
        _remember(new, event)
        if synced:  # a re-sync: the mailbox's flags are current
            _merge_flags(new, event.flags, override=True)
        else:
            _merge_flags(new, event.flags, override=False)
        _merge_content(new, event.content, content_rank)
        if bounce or late_delivery:  # final since the first report, whichever came first
            new.final_at = min(new.final_at or event.occurred_at, event.occurred_at)
        if bounce:  # the status changed: an update goes out
            new.status = status
            return _emit_update(state, new, now, position, f"now {status.value}: a recipient bounced")
        why = f"duplicate final status {status.value}" if rank == _FINAL_RANK and not late_delivery else (
            f"late {status.value}: message is already {new.status.value if new.status else 'final'}"
        )  # fmt: skip
        return _after_change(state, new, now, position, why, emit_reason=f"{why}, filled content")

    _remember(new, event)
    new.direction = implied
    _merge_flags(new, event.flags, override=False)
    _merge_content(new, event.content, content_rank)
    if rank <= new.rank:
        what = "duplicate" if rank == new.rank else "late"
        current = new.status.value if new.status else "?"
        why = f"{what} {status.value}: message is {current}"
        if is_stored(new):  # what it filled goes out
            return _after_change(state, new, now, position, why, emit_reason=f"{why}, filled content")
        return Outcome(OutcomeKind.IGNORED, new, True, reason=why)
    if new.status is None:
        new.source = ("imap" if event.source == "api" else event.source) if synced else event.source
    was_stored = is_stored(new)
    new.status = status
    new.rank = rank
    if rank >= _FINAL_RANK:
        new.final = True
        new.final_at = event.occurred_at
    if not is_stored(new):
        return Outcome(OutcomeKind.APPLIED, new, True, reason=f"now {status.value}")
    if was_stored:
        return _emit_update(state, new, now, position, f"now {status.value}")
    return _emit_first(new, now, position, f"{'final' if new.final else 'stored'}: {status.value}")
