"""Turning posted items into :class:`Event` records, with an error per bad item. No I/O.

A batch is validated in one call (:func:`check_batch`), and what goes on ``flightlog.inflight``
is each item as posted, with ``event_id``, ``received_at`` and ``schema_version`` set, encoded
once by orjson: not the model dumped again. The transform decodes it with the same model
(:func:`libs.events.decode_event`), so it reads the event ingest validated
(``tests/unit/test_ingest_batch.py`` holds the two side by side). Only a batch with a bad item is
validated again, item by item, for the per-item errors of the 422.

The batch is first checked by msgspec (:class:`_Item`, 0.3 us an event where pydantic's
TypeAdapter took 4.6, a third of ingest's CPU), against structs that accept a subset of what
:class:`~libs.events.Event` accepts: strict JSON types, bare-address participants, no raw MIME
or attachments, text short enough to be under any byte limit. A batch they refuse is validated
by pydantic as before, which accepts it or says why not, so the answers are pydantic's
(``tests/unit/test_ingest_batch.py`` holds the two to that on generated items).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Literal, NamedTuple

import msgspec
import orjson
from pydantic import TypeAdapter, ValidationError

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
)
from libs.http import validation_errors

__all__ = ["Accepted", "CheckedBatch", "ItemError", "check_batch", "item_errors", "normalise_item"]

_EVENTS: Final = TypeAdapter(list[Event])


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


class _Item(msgspec.Struct, forbid_unknown_fields=True):
    """libs.events.Event, narrower (see the module docstring); the account id's form and range,
    the key's bytes and the times' years are checked after (:func:`_accepted`)."""

    event_id: _text(1, 64)  # type: ignore[valid-type]
    account_id: str | int
    message_key: _text(1, MAX_KEY_LENGTH)  # type: ignore[valid-type]
    type: EventType
    occurred_at: _Time
    received_at: _Time
    schema_version: Literal[1] = SCHEMA_VERSION
    source: _text(1, 64) = "api"  # type: ignore[valid-type]
    direction: Direction | None = None
    content: _Content | None = None
    flags: _Flags | None = None


_ITEMS: Final = list[_Item]
_ID_LIMIT: Final = 2**64


class Accepted(NamedTuple):
    """What ingest reads of a valid event: its Kafka key's parts and the id it answers with."""

    event_id: str
    account_id: int
    message_key: str


def _storable_year(value: datetime | None) -> bool:
    # As libs.events._storable takes them without a conversion; the other years go to pydantic.
    return value is None or 1000 < value.year < 9999


def _accepted(item: _Item) -> Accepted | None:
    """``item`` as ingest keeps it, or None when a check pydantic makes might refuse it."""
    posted = item.account_id
    if isinstance(posted, str):
        if not (posted.isascii() and posted.isdigit()):
            return None
        account = int(posted)
    else:
        account = posted
    key = item.message_key
    if not 0 < account < _ID_LIMIT or (not key.isascii() and len(key.encode()) > MAX_KEY_BYTES):
        return None
    if not _storable_year(item.occurred_at) or not _storable_year(item.received_at):
        return None
    if item.content is not None and not _storable_year(item.content.date):
        return None
    return Accepted(item.event_id, account, key)


@dataclass(frozen=True, slots=True)
class ItemError:
    index: int | None
    field: str
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "message": self.message}


@dataclass(frozen=True, slots=True)
class CheckedBatch:
    """The valid items of a batch by index, and the errors of the others."""

    events: dict[int, Accepted]
    errors: list[ItemError]
    # Each event's flightlog.inflight value, in batch order: set only when every item is valid.
    values: list[bytes]


def _stamped(item: Any, received_at: datetime | None) -> dict[str, Any]:
    """``item`` as an Event's input: ``event_id`` generated when absent, ``received_at`` stamped.
    Raises ValueError for an item that is not an object or carries ``received_at``."""
    if not isinstance(item, dict):
        raise ValueError("must be a JSON object")
    if "received_at" in item:
        raise ValueError("received_at is set by ingest and must not be sent")
    data = dict(item)
    if "event_id" not in data:
        data["event_id"] = uuid.uuid4().hex
    if received_at is not None:
        data["received_at"] = received_at
    return data


def normalise_item(item: Any, received_at: datetime | None = None) -> Event:
    """An Event from one posted item: ``event_id`` generated when absent, ``received_at`` stamped.

    Raises ValueError for an item that is not an object or carries ``received_at``, and
    pydantic's ValidationError for everything else.
    """
    return Event.model_validate(_stamped(item, received_at))


def check_batch(items: Sequence[Any], received_at: datetime) -> CheckedBatch:
    """Every item of a posted batch as an :class:`Event`, or the errors of those that are not."""
    try:
        data = [_stamped(item, received_at) for item in items]
    except ValueError:
        return _check_each(items, received_at)
    try:
        fast = [_accepted(item) for item in msgspec.convert(data, _ITEMS)]
    except msgspec.ValidationError:
        fast = [None]
    if None in fast:
        try:
            events = [_kept(e) for e in _EVENTS.validate_python(data)]
        except ValidationError:
            return _check_each(items, received_at)
    else:
        events = fast  # type: ignore[assignment]  # no None in it
    for d in data:
        d["schema_version"] = SCHEMA_VERSION  # valid, so it was 1 or absent
    return CheckedBatch(dict(enumerate(events)), [], [orjson.dumps(d) for d in data])


def _kept(event: Event) -> Accepted:
    return Accepted(event.event_id, event.account_id, event.message_key)


def _check_each(items: Sequence[Any], received_at: datetime) -> CheckedBatch:
    events: dict[int, Accepted] = {}
    errors: list[ItemError] = []
    for index, item in enumerate(items):
        try:
            events[index] = _kept(normalise_item(item, received_at))
        except (ValidationError, ValueError) as exc:
            errors.extend(item_errors(index, exc))
    return CheckedBatch(events, errors, [])


def item_errors(index: int, exc: ValidationError | ValueError) -> list[ItemError]:
    if isinstance(exc, ValidationError):
        return [ItemError(index, e["field"], e["message"]) for e in validation_errors(exc, whole="(item)")]
    field = "received_at" if "received_at" in str(exc) else "(item)"
    return [ItemError(index, field, str(exc))]
