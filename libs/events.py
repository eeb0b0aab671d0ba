"""Event schemas: what ingest puts on ``flightlog.inflight`` and transform on ``flightlog.postflight``.

Both topics are keyed by :func:`message_key_bytes` (account id and message key), so every event
of one message lands on one partition, in order. Values are JSON (orjson); ids are decimal strings
in JSON because a 64-bit id does not fit a JavaScript number. ``schema_version`` lets a consumer
refuse a record it does not understand (it goes to the DLQ, never dropped).
"""

from __future__ import annotations

import binascii
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    field_validator,
)

__all__ = [
    "FINAL_STATUSES",
    "INBOUND_STATUSES",
    "MAX_ATTACHMENTS",
    "MAX_BODY_BYTES",
    "OUTBOUND_STATUSES",
    "AttachmentInfo",
    "Direction",
    "Event",
    "EventType",
    "MessageContent",
    "MessageDoc",
    "MessageFlags",
    "PostflightRecord",
    "Status",
    "decode_event",
    "decode_postflight",
    "encode",
    "message_key_bytes",
]

SCHEMA_VERSION: Final = 1
MAX_KEY_LENGTH: Final = 255
MAX_BODY_BYTES: Final = 512 * 1024  # per body part; a larger message is rejected at ingest
MAX_RECIPIENTS: Final = 100
MAX_LABELS: Final = 50


def _id_to_str(value: int) -> str:
    return str(value)


PublicId = Annotated[int, Field(gt=0, lt=2**64), PlainSerializer(_id_to_str, return_type=str)]
ShortText = Annotated[str, StringConstraints(max_length=998)]  # RFC 5322's line limit
Address = Annotated[str, StringConstraints(min_length=1, max_length=320)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=100)]
Folder = Annotated[str, StringConstraints(min_length=1, max_length=255)]


class Direction(StrEnum):
    OUTBOUND = "outbound"
    INBOUND = "inbound"


class Status(StrEnum):
    """Where a message is in its lifecycle (Twilio Postflight)."""

    ACCEPTED = "accepted"
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    FAILED = "failed"
    RECEIVING = "receiving"
    RECEIVED = "received"


OUTBOUND_STATUSES: Final = (
    Status.ACCEPTED, Status.QUEUED, Status.SENDING, Status.SENT,
    Status.DELIVERED, Status.UNDELIVERED, Status.FAILED,
)  # fmt: skip
INBOUND_STATUSES: Final = (Status.RECEIVING, Status.RECEIVED)
FINAL_STATUSES: Final = frozenset({Status.DELIVERED, Status.UNDELIVERED, Status.FAILED, Status.RECEIVED})


class EventType(StrEnum):
    """``message.<status>`` moves a message through its lifecycle; the rest change a message."""

    ACCEPTED = "message.accepted"
    QUEUED = "message.queued"
    SENDING = "message.sending"
    SENT = "message.sent"
    DELIVERED = "message.delivered"
    UNDELIVERED = "message.undelivered"
    FAILED = "message.failed"
    RECEIVING = "message.receiving"
    RECEIVED = "message.received"
    SYNCED = "message.synced"  # a mailbox message, final on arrival (IMAP sync)
    UPDATED = "message.updated"  # read, starred, moved, labelled
    REDACTED = "message.redacted"  # content erased, the message stays
    DELETED = "message.deleted"

    @property
    def status(self) -> Status | None:
        name = self.value.removeprefix("message.")
        return Status(name) if name in Status.__members__.values() else None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttachmentInfo(_Model):
    """Metadata of one attachment (the content itself is not carried)."""

    filename: Annotated[str, StringConstraints(max_length=255)] | None = None
    content_type: Annotated[str, StringConstraints(max_length=255)] = "application/octet-stream"
    size_bytes: Annotated[int, Field(ge=0)] = 0
    content_id: Annotated[str, StringConstraints(max_length=255)] | None = None
    inline: bool = False


MAX_ATTACHMENTS: Final = 100
MAX_PARSE_WARNINGS: Final = 20


class MessageContent(_Model):
    """What a message says. Every field is optional: events carry what they know."""

    channel: Annotated[str, StringConstraints(min_length=1, max_length=32)] | None = None
    sender: Address | None = Field(default=None, alias="from")
    to: Annotated[list[Address], Field(max_length=MAX_RECIPIENTS)] | None = None
    cc: Annotated[list[Address], Field(max_length=MAX_RECIPIENTS)] | None = None
    subject: ShortText | None = None
    body_text: str | None = None
    body_html: str | None = None
    error_code: Annotated[str, StringConstraints(max_length=64)] | None = None
    # base64 of an RFC 5322 message (IMAP sync, or posted); transform parses it into the fields
    # below and drops it (libs.mime.expand_raw_mime), so it never reaches state or postflight.
    raw_mime: str | None = None
    # Filled from raw_mime by libs.mime.content_fields (all optional, added after schema v1).
    thread_key: Annotated[str, StringConstraints(max_length=64)] | None = None
    size_bytes: Annotated[int, Field(ge=0)] | None = None
    attachments: Annotated[list[AttachmentInfo], Field(max_length=MAX_ATTACHMENTS)] | None = None
    parse_warnings: Annotated[list[str], Field(max_length=MAX_PARSE_WARNINGS)] | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("body_text", "body_html", "raw_mime")
    @classmethod
    def _bounded(cls, value: str | None) -> str | None:
        if value is not None and len(value.encode()) > MAX_BODY_BYTES:
            raise ValueError(f"is larger than the limit of {MAX_BODY_BYTES} bytes")
        return value

    @field_validator("raw_mime")
    @classmethod
    def _base64(cls, value: str | None) -> str | None:
        # Refused at ingest with a clear error: bytes that are not base64 hold no message at all.
        if value is not None:
            try:
                binascii.a2b_base64(value, strict_mode=True)
            except (binascii.Error, ValueError):
                raise ValueError("must be standard base64 (RFC 4648, padded, no line breaks)") from None
        return value


class MessageFlags(_Model):
    """What the mailbox owner changes: fields left out stay as they are."""

    unread: bool | None = None
    starred: bool | None = None
    folder: Folder | None = None
    labels: Annotated[list[Label], Field(max_length=MAX_LABELS)] | None = None


class Event(_Model):
    """One lifecycle event of one message (an ``flightlog.inflight`` record)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    account_id: PublicId
    message_key: Annotated[str, StringConstraints(min_length=1, max_length=MAX_KEY_LENGTH)]
    type: EventType
    occurred_at: AwareDatetime
    source: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "api"
    direction: Direction | None = None
    content: MessageContent | None = None
    flags: MessageFlags | None = None
    received_at: AwareDatetime | None = None  # stamped by ingest

    @field_validator("account_id", mode="before")
    @classmethod
    def _id_from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.isascii() or not value.isdigit():
                raise ValueError("must be a decimal string")
            return int(value)
        return value


class MessageDoc(_Model):
    """A message as persist stores it and the gateway serves it."""

    status: Status | None = None
    direction: Direction | None = None
    channel: str | None = None
    sender: str | None = None
    to: list[str] = []
    cc: list[str] = []
    subject: str | None = None
    snippet: str | None = None
    body_text: str | None = None
    body_html: str | None = None
    error_code: str | None = None
    unread: bool = True
    starred: bool = False
    folder: str | None = None
    labels: list[str] = []
    occurred_at: AwareDatetime
    final_at: AwareDatetime | None = None
    redacted: bool = False
    source: str = "api"
    thread_key: str | None = None
    size_bytes: int | None = None
    attachments: list[AttachmentInfo] = []
    parse_warnings: list[str] = []


class PostflightRecord(_Model):
    """A final message, or a later change to one (a ``flightlog.postflight`` record).

    ``version`` grows by one with every record of the message; persist writes a record only over
    a lower version, so replays and reordering change nothing.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    account_id: PublicId
    message_key: str
    version: Annotated[int, Field(ge=1)]
    deleted: bool = False
    message: MessageDoc
    emitted_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("account_id", mode="before")
    @classmethod
    def _id_from_string(cls, value: Any) -> Any:
        return int(value) if isinstance(value, str) and value.isdigit() else value


def message_key_bytes(account_id: int, message_key: str) -> bytes:
    """The Kafka key of every record of one message: keeps its events on one partition."""
    return f"{account_id}:{message_key}".encode()


def encode(model: BaseModel) -> bytes:
    return orjson.dumps(model.model_dump(mode="json", by_alias=True, exclude_none=True))


def decode_event(raw: bytes) -> Event:
    return Event.model_validate_json(raw)


def decode_postflight(raw: bytes) -> PostflightRecord:
    return PostflightRecord.model_validate_json(raw)
