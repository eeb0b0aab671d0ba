"""msgspec structs that accept a subset of what :class:`libs.events.Event` accepts: the fast path
of ingest's validation and of transform's decoding, where pydantic's is the slow one.

An item they accept is valid for pydantic too, with the same values; an item they refuse is not
necessarily invalid: it goes through pydantic, whose answer it gets. They take strict JSON types,
bare-address participants, no raw MIME or attachments, text short enough to be under any byte
limit; the account id's form and range, the key's bytes and the times' years are checked after
decoding (:func:`accepted`). ``tests/unit/test_ingest_batch.py`` and
``tests/unit/test_event_structs.py`` hold the two paths to that on generated items. What
transform decodes with them is built from the checked values without validating them again
(:func:`decode_inflight`).

Costs (one core of the bench machine): a posted batch's items 0.3 us an event where pydantic's
TypeAdapter took 4.6; an inflight status event (no content, no flags) 1.3 us where
``Event.model_validate_json`` took 3.6; the bench's event with content (sender, one recipient,
subject, 500 characters of body) 7.2 us where msgspec's refusal and then pydantic took 10.6.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal, NamedTuple

import msgspec

from libs.events import (
    MAX_BODY_BYTES,
    MAX_KEY_BYTES,
    MAX_KEY_LENGTH,
    MAX_LABELS,
    MAX_MESSAGE_ID_CHARS,
    MAX_NAME_CHARS,
    MAX_PARSE_WARNINGS,
    MAX_RECIPIENTS,
    MAX_REFERENCES,
    SCHEMA_VERSION,
    Direction,
    Event,
    EventType,
    MessageContent,
    MessageFlags,
    Participant,
    unvalidated,
)

__all__ = ["Accepted", "EventItem", "StatusEvent", "accepted", "decode_inflight"]


def _text(min_length: int, max_length: int) -> Any:
    return Annotated[str, msgspec.Meta(min_length=min_length, max_length=max_length)]


def _listed(item: Any, max_length: int) -> Any:
    return Annotated[list[item], msgspec.Meta(max_length=max_length)]


_Time = Annotated[datetime, msgspec.Meta(tz=True)]  # RFC 3339 only; its year is checked after
# A bare address; "Name <address>" strings are parsed by pydantic's path (libs.events).
_Bare = Annotated[str, msgspec.Meta(min_length=1, max_length=320, pattern=r"\A(?:[^<]*|[\s\S]*[^>])\Z")]
# Under MAX_BODY_BYTES whatever the characters (at most 4 bytes each in UTF-8).
_Body = _text(0, MAX_BODY_BYTES // 4)


class _Participant(msgspec.Struct, forbid_unknown_fields=True):
    email: _text(1, 320)  # type: ignore[valid-type]
    name: _text(0, MAX_NAME_CHARS) | None = None  # type: ignore[valid-type]


_Someone = _Participant | _Bare
_People = _listed(_Someone, MAX_RECIPIENTS)


class _Content(msgspec.Struct, forbid_unknown_fields=True, rename={"sender": "from"}):
    """libs.events.MessageContent, narrower: ``raw_mime`` and ``attachments`` only as null."""

    channel: _text(1, 32) | None = None  # type: ignore[valid-type]
    sender: _Someone | None = None
    to: _People | None = None  # type: ignore[valid-type]
    cc: _People | None = None  # type: ignore[valid-type]
    bcc: _People | None = None  # type: ignore[valid-type]
    reply_to: _People | None = None  # type: ignore[valid-type]
    subject: _text(0, 998) | None = None  # type: ignore[valid-type]
    body_text: _Body | None = None  # type: ignore[valid-type]
    body_html: _Body | None = None  # type: ignore[valid-type]
    error_code: _text(0, 64) | None = None  # type: ignore[valid-type]
    raw_mime: None = None
    thread_key: _text(0, 64) | None = None  # type: ignore[valid-type]
    size_bytes: Annotated[int, msgspec.Meta(ge=0)] | None = None
    attachments: None = None
    parse_warnings: _listed(str, MAX_PARSE_WARNINGS) | None = None  # type: ignore[valid-type]
    date: _Time | None = None
    message_id: _text(1, MAX_MESSAGE_ID_CHARS) | None = None  # type: ignore[valid-type]
    in_reply_to: _text(1, MAX_MESSAGE_ID_CHARS) | None = None  # type: ignore[valid-type]
    references: _listed(_text(1, MAX_MESSAGE_ID_CHARS), MAX_REFERENCES) | None = None  # type: ignore[valid-type]


class _Flags(msgspec.Struct, forbid_unknown_fields=True):
    unread: bool | None = None
    starred: bool | None = None
    folder: _text(1, 255) | None = None  # type: ignore[valid-type]
    labels: _listed(_text(1, 100), MAX_LABELS) | None = None  # type: ignore[valid-type]


class EventItem(msgspec.Struct, forbid_unknown_fields=True):
    """:class:`~libs.events.Event`, narrower (see the module docstring); the account id's form and
    range, the key's bytes and the times' years are checked after (:func:`accepted`)."""

    event_id: _text(1, 64)  # type: ignore[valid-type]
    account_id: str | int
    message_key: _text(1, MAX_KEY_LENGTH)  # type: ignore[valid-type]
    type: EventType
    occurred_at: _Time
    received_at: _Time | None = None  # ingest stamps it; not every producer of inflight does
    schema_version: Literal[1] = SCHEMA_VERSION
    source: _text(1, 64) = "api"  # type: ignore[valid-type]
    direction: Direction | None = None
    content: _Content | None = None
    flags: _Flags | None = None


_ID_LIMIT: Final = 2**64


class Accepted(NamedTuple):
    """What ingest reads of a valid event: its Kafka key's parts and the id it answers with."""

    event_id: str
    account_id: int
    message_key: str


def _account(item: EventItem) -> int:
    """``item``'s account id, or 0 when a check pydantic makes on the item might refuse it: the
    account id's form and range, the key's bytes, the times' years (those libs.events._storable
    takes without a conversion; the other years go to pydantic)."""
    posted = item.account_id
    if type(posted) is str:
        if not (posted.isascii() and posted.isdigit()):
            return 0
        account = int(posted)
    else:
        account = posted  # type: ignore[assignment]  # an int: msgspec takes no other type
    key = item.message_key
    if not 0 < account < _ID_LIMIT or (not key.isascii() and len(key.encode()) > MAX_KEY_BYTES):
        return 0
    received, content = item.received_at, item.content
    if not 1000 < item.occurred_at.year < 9999 or (received is not None and not 1000 < received.year < 9999):
        return 0
    if content is not None and content.date is not None and not 1000 < content.date.year < 9999:
        return 0
    return account


def accepted(item: EventItem) -> Accepted | None:
    """``item``'s key parts and id, or None when a check pydantic makes might refuse it."""
    account = _account(item)
    return Accepted(item.event_id, account, item.message_key) if account else None


class StatusEvent(NamedTuple):
    """An inflight event without content or flags (most lifecycle events), as
    :func:`libs.lifecycle.apply` reads an :class:`~libs.events.Event`: the same fields and values."""

    event_id: str
    account_id: int
    message_key: str
    type: EventType
    occurred_at: datetime
    source: str
    direction: Direction | None
    content: None = None
    flags: None = None


_DECODER: Final = msgspec.json.Decoder(EventItem)


def _participant(someone: _Participant | str) -> Participant:
    # A string here is a bare address (_Bare): pydantic stores it as given (libs.events._participant_of).
    if isinstance(someone, str):
        return unvalidated(Participant, {"name": None, "email": someone})
    return unvalidated(Participant, {"name": someone.name, "email": someone.email})


def _people(people: list[_Participant | str] | None) -> list[Participant] | None:
    return None if people is None else [_participant(p) for p in people]


def _content(c: _Content) -> MessageContent:
    return unvalidated(MessageContent, {
        "channel": c.channel, "sender": None if c.sender is None else _participant(c.sender),
        "to": _people(c.to), "cc": _people(c.cc), "bcc": _people(c.bcc), "reply_to": _people(c.reply_to),
        "subject": c.subject, "body_text": c.body_text, "body_html": c.body_html,
        "error_code": c.error_code, "raw_mime": None, "thread_key": c.thread_key,
        "size_bytes": c.size_bytes, "attachments": None, "parse_warnings": c.parse_warnings,
        "date": c.date, "message_id": c.message_id, "in_reply_to": c.in_reply_to,
        "references": c.references,
    })  # fmt: skip


def _flags(f: _Flags) -> MessageFlags:
    return unvalidated(
        MessageFlags, {"unread": f.unread, "starred": f.starred, "folder": f.folder, "labels": f.labels}
    )


def decode_inflight(raw: bytes) -> StatusEvent | Event | None:
    """``raw`` as transform reads it: a :class:`StatusEvent` when it has neither content nor flags,
    else an :class:`~libs.events.Event` of the same values as pydantic's; None when pydantic must
    decide, then :func:`libs.events.decode_event` decodes it (or says why it cannot)."""
    try:
        item = _DECODER.decode(raw)
    except msgspec.DecodeError:  # ValidationError is one
        return None
    account = _account(item)
    if not account:
        return None
    content, flags = item.content, item.flags
    if content is None and flags is None:
        return StatusEvent(
            item.event_id, account, item.message_key, item.type, item.occurred_at, item.source, item.direction
        )
    return unvalidated(Event, {
        "schema_version": item.schema_version, "event_id": item.event_id, "account_id": account,
        "message_key": item.message_key, "type": item.type, "occurred_at": item.occurred_at,
        "source": item.source, "direction": item.direction,
        "content": None if content is None else _content(content),
        "flags": None if flags is None else _flags(flags), "received_at": item.received_at,
    })  # fmt: skip
