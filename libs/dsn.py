"""Delivery status notifications (RFC 3464) of the mail flightlog sent: pure parsing, no I/O.

A DSN is ``multipart/report; report-type=delivery-status`` with a ``message/delivery-status``
part: one block of per-message fields (``Original-Envelope-Id``, the ENVID the sender gave) and a
block per recipient (``Action``, ``Status``, ``Diagnostic-Code``), often followed by the original
message or its headers (``RET=HDRS``). :func:`parse_dsn` reads one and says which message it is
about: the ENVID first, else the original's Message-ID (both carry the send's token, see
:func:`libs.sending.message_key_of`). Anything else (mail that is not a DSN, a DSN about a message
that flightlog did not send) gives None. A message to several recipients may get several DSNs:
the lifecycle makes it undelivered when any of them reports a failure (:mod:`libs.lifecycle`).

Only the headers are parsed for every message; a body is parsed when the headers say DSN. The
input is bounded by the IMAP sync's fetch (``libs.mime.MAX_RAW_BYTES``) and Python's email
parser reads it in one pass.
"""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass
from datetime import datetime
from email.message import Message
from email.parser import BytesHeaderParser
from typing import Final, Literal

from libs.events import Direction, Event, EventType, MessageContent
from libs.sending import message_key_of

__all__ = ["DeliveryReport", "parse_dsn", "report_event"]

_PARSE_POLICY: Final = email.policy.compat32
MAX_REASON_CHARS: Final = 64  # what the lifecycle's error_code holds
# delivered: at the mailbox; relayed / expanded: handed on where no DSN comes from (RFC 3464 2.3.3)
_DELIVERED: Final = frozenset({"delivered", "relayed", "expanded"})


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What a DSN says about one sent message: delivered, or undelivered with the reason (the
    status code and the server's diagnostic, as the first failed recipient has them)."""

    message_key: str
    outcome: Literal["delivered", "undelivered"]
    reason: str | None


def _blocks(report: Message) -> list[Message]:
    payload = report.get_payload()
    return [b for b in payload if isinstance(b, Message)] if isinstance(payload, list) else []


def _original_message_id(message: Message) -> str | None:
    for part in message.walk():
        if part.get_content_type() in ("message/rfc822", "text/rfc822-headers"):
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                found = inner[0].get("Message-ID")
            else:
                headers = part.get_payload(decode=True)
                found = (
                    BytesHeaderParser(policy=_PARSE_POLICY).parsebytes(headers).get("Message-ID")
                    if isinstance(headers, bytes)
                    else None
                )
            if found:
                return str(found)
    return None


def parse_dsn(raw: bytes) -> DeliveryReport | None:
    try:
        return _parse(raw)
    except (ValueError, LookupError, TypeError, AttributeError, UnicodeError):
        return None  # hostile or broken MIME: it is mail like any other, not a report


def report_event(account_id: int, report: DeliveryReport, event_id: str, occurred_at: datetime) -> Event:
    """The lifecycle event a DSN makes of its message: delivered, or undelivered with the reason."""
    undelivered = report.outcome == "undelivered"
    return Event(
        event_id=event_id,
        account_id=account_id,
        message_key=report.message_key,
        type=EventType.UNDELIVERED if undelivered else EventType.DELIVERED,
        occurred_at=occurred_at,
        source="dsn",
        direction=Direction.OUTBOUND,
        content=MessageContent(error_code=report.reason) if undelivered and report.reason else None,
    )


def _parse(raw: bytes) -> DeliveryReport | None:
    head = BytesHeaderParser(policy=_PARSE_POLICY).parsebytes(raw)
    if head.get_content_type() != "multipart/report" or head.get_param("report-type") != "delivery-status":
        return None
    message = email.message_from_bytes(raw, policy=_PARSE_POLICY)
    status = next((p for p in message.walk() if p.get_content_type() == "message/delivery-status"), None)
    if status is None:
        return None
    blocks = _blocks(status)
    if len(blocks) < 2:
        return None
    per_message, recipients = blocks[0], blocks[1:]
    envid = per_message.get("Original-Envelope-Id")
    key = message_key_of(str(envid)) if envid else None
    if key is None:
        original = _original_message_id(message)
        key = message_key_of(original) if original else None
    if key is None:
        return None
    actions = [(str(r.get("Action", "")).strip().lower(), r) for r in recipients]
    failed = [r for action, r in actions if action == "failed"]
    if failed:
        first = failed[0]
        reason = " ".join(
            str(first.get(name, "")).split(";", 1)[-1].strip() for name in ("Status", "Diagnostic-Code")
        )
        return DeliveryReport(key, "undelivered", " ".join(reason.split())[:MAX_REASON_CHARS] or None)
    if any(action in _DELIVERED for action, _ in actions):
        return DeliveryReport(key, "delivered", None)
    return None  # "delayed": the message is still on its way
