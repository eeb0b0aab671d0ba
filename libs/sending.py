"""Sending mail: what a send request holds, the MIME message built from it, and its lifecycle events.

Pure logic, no I/O (the outbox SQL is :mod:`libs.outbox`, the SMTP conversation the sender's).
The gateway validates a :class:`SendRequest` and stores it; the sender builds the message with
:func:`build_mime` from the stored request, so a retry or a restart submits the same bytes: the
Message-ID (:func:`rfc_message_id`) and the Date come from the request, not from the moment of
the attempt.

Every status a send goes through is a lifecycle event (:func:`send_event`) whose event id is
derived from the message and the status, so posting one again (a retry, a restart) is dropped by
transform as a repeat.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr
from typing import Annotated, Final, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from libs.events import (
    MAX_NAME_CHARS,
    AttachmentInfo,
    Direction,
    Event,
    EventType,
    MessageContent,
    Participant,
)

__all__ = [
    "MAX_SEND_ATTACHMENTS",
    "MAX_SEND_ATTACHMENT_BYTES",
    "MAX_SEND_RECIPIENTS",
    "SEND_KEY_PREFIX",
    "Outgoing",
    "OutgoingAttachment",
    "SendRequest",
    "build_mime",
    "envelope_id",
    "message_key_of",
    "rfc_message_id",
    "send_event",
    "send_message_key",
]

MAX_SEND_RECIPIENTS: Final = 50  # to + cc + bcc of one message
MAX_SEND_ATTACHMENTS: Final = 10
# Decoded bytes of all attachments together. The request's JSON is also under the gateway's body
# limit (64 KiB), which holds about 45 KiB of attachments once base64 has grown them.
MAX_SEND_ATTACHMENT_BYTES: Final = 48 * 1024
MAX_SEND_BODY_CHARS: Final = 60_000  # text and HTML body each
SEND_KEY_PREFIX: Final = "send:"
# Before the token in Message-IDs and ENVIDs, so one of ours is told from other mail's.
TOKEN_PREFIX: Final = "flightlog."
# No C0 control character or DEL in what becomes a header or an SMTP command argument: a CR or LF
# would end it and start another.
_NO_CONTROLS: Final = r"^[^\x00-\x1f\x7f]*$"
_Email = Annotated[
    str, StringConstraints(min_length=3, max_length=320, pattern=r"^[^@\s<>,;:\"\\]+@[^@\s<>,;:\"\\]+$")
]
_Name = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS, pattern=_NO_CONTROLS)]
_HeaderText = Annotated[str, StringConstraints(max_length=998, pattern=_NO_CONTROLS)]
_Token = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00-\x20\x7f<>]+$")]


class Mailbox(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: _Name | None = None
    email: _Email

    def formatted(self) -> str:
        return formataddr((self.name, self.email)) if self.name else self.email


class OutgoingAttachment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    filename: Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=_NO_CONTROLS)]
    content_type: Annotated[
        str, StringConstraints(max_length=127, pattern=r"^[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*$")
    ] = "application/octet-stream"
    content_base64: str = Field(description="the content, base64 (standard alphabet, padded)")
    content_id: _Token | None = Field(None, description="for an inline part the HTML body refers to")

    def content(self) -> bytes:
        try:
            return base64.b64decode(self.content_base64, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"attachment {self.filename!r} is not valid base64") from exc


class Outgoing(BaseModel):
    """The message of ``POST /v1/accounts/{id}/messages/send``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    sender: Mailbox | None = Field(None, alias="from", description="left out: the account's address")
    to: Annotated[list[Mailbox], Field(max_length=MAX_SEND_RECIPIENTS)] = Field(default_factory=list)
    cc: Annotated[list[Mailbox], Field(max_length=MAX_SEND_RECIPIENTS)] = Field(default_factory=list)
    bcc: Annotated[list[Mailbox], Field(max_length=MAX_SEND_RECIPIENTS)] = Field(default_factory=list)
    reply_to: Annotated[list[Mailbox], Field(max_length=10)] = Field(default_factory=list)
    subject: _HeaderText = ""
    text: Annotated[str, StringConstraints(max_length=MAX_SEND_BODY_CHARS)] | None = None
    html: Annotated[str, StringConstraints(max_length=MAX_SEND_BODY_CHARS)] | None = None
    in_reply_to: _Token | None = Field(None, description="the Message-ID replied to, without <>")
    references: Annotated[list[_Token], Field(max_length=100)] = Field(default_factory=list)
    attachments: Annotated[list[OutgoingAttachment], Field(max_length=MAX_SEND_ATTACHMENTS)] = Field(
        default_factory=list
    )
    idempotency_key: _Token | None = Field(
        None,
        description="the same key sends the message once: a repeat answers with the first request's"
        " message (also as the Idempotency-Key header)",
    )

    @model_validator(mode="after")
    def _bounded(self) -> Self:
        if not (self.to or self.cc or self.bcc):
            raise ValueError("a message needs at least one recipient (to, cc or bcc)")
        if len(self.to) + len(self.cc) + len(self.bcc) > MAX_SEND_RECIPIENTS:
            raise ValueError(f"at most {MAX_SEND_RECIPIENTS} recipients (to, cc and bcc together)")
        if self.text is None and self.html is None:
            raise ValueError("a message needs a text or an HTML body")
        total = sum(len(a.content()) for a in self.attachments)
        if total > MAX_SEND_ATTACHMENT_BYTES:
            raise ValueError(f"attachments hold {total} bytes; the limit is {MAX_SEND_ATTACHMENT_BYTES}")
        return self

    def recipients(self) -> list[str]:
        """The envelope's recipients, each once, in order."""
        return list(dict.fromkeys(m.email for m in (*self.to, *self.cc, *self.bcc)))


class SendRequest(BaseModel):
    """What the outbox stores for one message: the request as validated, with what the gateway
    fixed when it took it (the sender's address, the Message-ID, the Date)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    account_id: int
    message_key: str
    sender: Mailbox
    message: Outgoing
    message_id: str  # without <>
    date: datetime


def send_message_key(account_id: int, idempotency_key: str | None) -> str:
    """The message key of a send: ``send:<32 hex digits>``, the same for one idempotency key of
    one account, a new one without a key. The hex digits (the token) are also in the Message-ID
    and the ENVID, so a DSN names its message without a lookup (:func:`message_key_of`)."""
    if idempotency_key is None:
        return f"{SEND_KEY_PREFIX}{uuid.uuid4().hex}"
    return (
        f"{SEND_KEY_PREFIX}{uuid.uuid5(uuid.NAMESPACE_URL, f'flightlog:{account_id}:{idempotency_key}').hex}"
    )


def _token(message_key: str) -> str:
    return message_key.removeprefix(SEND_KEY_PREFIX)


def rfc_message_id(message_key: str, sender_email: str) -> str:
    """The Message-ID (without <>) every attempt of a message carries."""
    return f"{TOKEN_PREFIX}{_token(message_key)}@{sender_email.rsplit('@', 1)[1]}"


def envelope_id(message_key: str) -> str:
    """The SMTP ENVID (RFC 3461) of a message (xtext-safe as it is), which a DSN quotes."""
    return f"{TOKEN_PREFIX}{_token(message_key)}"


def message_key_of(envid_or_message_id: str) -> str | None:
    """The message key that an ENVID or a Message-ID (with or without <>) of ours names; None
    for anything else."""
    text = envid_or_message_id.strip().removeprefix("<").removesuffix(">")
    if not text.startswith(TOKEN_PREFIX):
        return None
    token = text[len(TOKEN_PREFIX) :].split("@", 1)[0]
    if len(token) != 32 or not all(c in "0123456789abcdef" for c in token):
        return None
    return f"{SEND_KEY_PREFIX}{token}"


def build_mime(request: SendRequest) -> EmailMessage:
    """The message as submitted: the same bytes for every attempt of one request. Bcc is left out
    of the headers (the envelope carries it)."""
    out = request.message
    mime = EmailMessage(policy=SMTP)
    mime["From"] = request.sender.formatted()
    if out.to:
        mime["To"] = ", ".join(m.formatted() for m in out.to)
    if out.cc:
        mime["Cc"] = ", ".join(m.formatted() for m in out.cc)
    if out.reply_to:
        mime["Reply-To"] = ", ".join(m.formatted() for m in out.reply_to)
    mime["Subject"] = out.subject
    mime["Date"] = format_datetime(request.date)
    mime["Message-ID"] = f"<{request.message_id}>"
    if out.in_reply_to:
        mime["In-Reply-To"] = f"<{out.in_reply_to}>"
    if out.references:
        mime["References"] = " ".join(f"<{r}>" for r in out.references)
    mime.set_content(out.text if out.text is not None else "")
    if out.html is not None:
        if out.text is None:
            mime.set_content(out.html, subtype="html")
        else:
            mime.add_alternative(out.html, subtype="html")
    for att in out.attachments:
        maintype, subtype = att.content_type.split("/", 1)
        mime.add_attachment(
            att.content(),
            maintype=maintype,
            subtype=subtype,
            filename=att.filename,
            cid=f"<{att.content_id}>" if att.content_id else None,
        )
    # Boundaries from the message, not random ones: every attempt submits the same bytes.
    token = _token(request.message_key)
    for n, part in enumerate(p for p in mime.walk() if p.is_multipart()):
        part.set_boundary(f"=_{token}_{n}")
    return mime


def _participant(m: Mailbox) -> Participant:
    return Participant(name=m.name, email=m.email)


def send_event(
    request: SendRequest,
    kind: EventType,
    occurred_at: datetime,
    *,
    error_code: str | None = None,
    with_content: bool = False,
) -> Event:
    """One lifecycle event of a sent message; its id is the message's and the status's, so the
    same status posted twice is one event to transform."""
    out = request.message
    content = None
    if with_content:
        content = MessageContent.model_validate(
            {
                "from": _participant(request.sender),
                "to": [_participant(m) for m in out.to],
                "cc": [_participant(m) for m in out.cc],
                "bcc": [_participant(m) for m in out.bcc],
                "reply_to": [_participant(m) for m in out.reply_to],
                "subject": out.subject,
                "body_text": out.text,
                "body_html": out.html,
                "channel": "email",
                "date": request.date,
                "message_id": request.message_id,
                "in_reply_to": out.in_reply_to,
                "references": out.references or None,
                "attachments": [
                    AttachmentInfo(
                        filename=a.filename,
                        content_type=a.content_type,
                        size_bytes=len(a.content()),
                        content_id=a.content_id,
                    )
                    for a in out.attachments
                ]
                or None,
            }
        )
    elif error_code is not None:
        content = MessageContent(error_code=error_code[:64])
    digest = hashlib.sha256(f"{request.account_id}:{request.message_key}:{kind.value}".encode()).hexdigest()
    return Event(
        event_id=f"send-{digest[:40]}",
        account_id=request.account_id,
        message_key=request.message_key,
        type=kind,
        occurred_at=occurred_at,
        source="send",
        direction=Direction.OUTBOUND,
        content=content,
    )
