"""Turning posted items into :class:`Event` records, with an error per bad item. No I/O.

A batch is validated in one call (:func:`check_batch`), and what goes on ``flightlog.inflight``
is each item as posted, with ``event_id``, ``received_at`` and ``schema_version`` set, encoded
once by orjson: not the model dumped again. The transform decodes it with the same structs and
model (:func:`libs.event_structs.decode_inflight`, then :func:`libs.events.decode_event`), so
it reads the event ingest validated (``tests/unit/test_ingest_batch.py`` holds the two side by
side). Only a batch with a bad item is validated again, item by item, for the per-item errors of
the 422.

The batch is first checked by msgspec (:class:`libs.event_structs.EventItem`, 0.3 us an event
where pydantic's TypeAdapter took 4.6, a third of ingest's CPU), whose structs accept a subset of
what :class:`~libs.events.Event` accepts. A batch they refuse is validated by pydantic as before,
which accepts it or says why not, so the answers are pydantic's
(``tests/unit/test_ingest_batch.py`` holds the two to that on generated items).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import msgspec
import orjson
from pydantic import TypeAdapter, ValidationError

from libs.event_structs import Accepted, EventItem, accepted
from libs.events import SCHEMA_VERSION, Event
from libs.http import validation_errors

__all__ = ["Accepted", "CheckedBatch", "ItemError", "check_batch", "item_errors", "normalise_item"]

_EVENTS: Final = TypeAdapter(list[Event])
_ITEMS: Final = list[EventItem]


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
        fast = [accepted(item) for item in msgspec.convert(data, _ITEMS)]
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
