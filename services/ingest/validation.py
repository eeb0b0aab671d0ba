"""Turning posted items into :class:`Event` records, with an error per bad item. No I/O."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from libs.events import Event
from libs.http import validation_errors

__all__ = ["ItemError", "item_errors", "normalise_item"]


@dataclass(frozen=True, slots=True)
class ItemError:
    index: int | None
    field: str
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "message": self.message}


def normalise_item(item: Any, received_at: datetime | None = None) -> Event:
    """An Event from one posted item: ``event_id`` generated when absent, ``received_at`` stamped.

    Raises ValueError for an item that is not an object or carries ``received_at``, and
    pydantic's ValidationError for everything else.
    """
    if not isinstance(item, dict):
        raise ValueError("must be a JSON object")
    if "received_at" in item:
        raise ValueError("received_at is set by ingest and must not be sent")
    data = dict(item)
    data.setdefault("event_id", uuid.uuid4().hex)
    if received_at is not None:
        data["received_at"] = received_at
    return Event.model_validate(data)


def item_errors(index: int, exc: ValidationError | ValueError) -> list[ItemError]:
    if isinstance(exc, ValidationError):
        return [ItemError(index, e["field"], e["message"]) for e in validation_errors(exc, whole="(item)")]
    field = "received_at" if "received_at" in str(exc) else "(item)"
    return [ItemError(index, field, str(exc))]
