"""Sending's pure parts: the request model's limits, the MIME message, keys and DSN matching."""

from __future__ import annotations

import base64
import email
import email.policy
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from libs.dsn import parse_dsn, report_event
from libs.events import EventType
from libs.sending import (
    MAX_SEND_ATTACHMENT_BYTES,
    MAX_SEND_RECIPIENTS,
    Mailbox,
    Outgoing,
    SendRequest,
    build_mime,
    envelope_id,
    message_key_of,
    rfc_message_id,
    send_event,
    send_message_key,
)

ACCOUNT = (7 << 48) | 1


def _request(**message: object) -> SendRequest:
    out = Outgoing.model_validate({"to": [{"email": "b@example.com"}], "text": "hi", **message})
    key = send_message_key(ACCOUNT, "k1")
    return SendRequest(
        account_id=ACCOUNT,
        message_key=key,
        sender=Mailbox(name="Ann", email="a@example.com"),
        message=out,
        message_id=rfc_message_id(key, "a@example.com"),
        date=datetime(2026, 11, 30, 12, 0, tzinfo=UTC),
    )


def test_the_same_request_builds_the_same_bytes_without_bcc() -> None:
    request = _request(
        bcc=[{"email": "hidden@example.com"}],
        html="<p>hi</p>",
        attachments=[{"filename": "a.txt", "content_type": "text/plain", "content_base64": "aGk="}],
        in_reply_to="parent@example.com",
    )
    first, second = build_mime(request).as_bytes(), build_mime(request).as_bytes()
    assert first == second
    parsed = email.message_from_bytes(first, policy=email.policy.default)
    assert parsed["Message-ID"] == f"<{request.message_id}>"
    assert parsed["In-Reply-To"] == "<parent@example.com>"
    assert "Bcc" not in parsed and b"hidden@example.com" not in first
    assert [p.get_content_type() for p in parsed.walk()] == [
        "multipart/mixed", "multipart/alternative", "text/plain", "text/html", "text/plain",
    ]  # fmt: skip
    assert request.message.recipients() == ["b@example.com", "hidden@example.com"]


def test_limits_and_header_injection_are_refused() -> None:
    too_many = [{"email": f"r{i}@example.com"} for i in range(MAX_SEND_RECIPIENTS + 1)]
    big = base64.b64encode(b"x" * (MAX_SEND_ATTACHMENT_BYTES + 1)).decode()
    bads: list[dict[str, object]] = [
        {"to": too_many},
        {"to": []},
        {"text": None},
        {"subject": "hi\r\nBcc: victim@example.com"},
        {"to": [{"email": "b@example.com>\r\nRCPT TO:<x@y"}]},
        {"attachments": [{"filename": "a", "content_base64": big}]},
        {"attachments": [{"filename": "a", "content_base64": "not base64!"}]},
    ]
    for bad in bads:
        with pytest.raises(ValidationError):
            _request(**bad)


def test_keys_name_their_message_and_only_ours() -> None:
    key = send_message_key(ACCOUNT, "k1")
    assert key == send_message_key(ACCOUNT, "k1") != send_message_key(ACCOUNT + 1, "k1")
    assert send_message_key(ACCOUNT, None) != send_message_key(ACCOUNT, None)
    assert message_key_of(envelope_id(key)) == key
    assert message_key_of(f"<{rfc_message_id(key, 'a@example.com')}>") == key
    assert message_key_of("<0123456789abcdef0123456789abcdef@example.com>") is None
    assert message_key_of("flightlog.xyz@example.com") is None


def test_status_events_repeat_with_the_same_id() -> None:
    request = _request()
    now = datetime.now(UTC)
    one, two = (send_event(request, EventType.SENT, now) for _ in range(2))
    assert one.event_id == two.event_id != send_event(request, EventType.QUEUED, now).event_id
    accepted = send_event(request, EventType.ACCEPTED, request.date, with_content=True)
    assert accepted.content is not None and accepted.content.message_id == request.message_id


def _dsn(action: str, envid: str, status: str = "5.1.1") -> bytes:
    return (
        "From: MAILER-DAEMON@mta.example\r\nTo: a@example.com\r\nSubject: Undelivered\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nsorry\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mta.example\r\nOriginal-Envelope-Id: {envid}\r\n\r\n"
        f"Final-Recipient: rfc822; b@example.com\r\nAction: {action}\r\nStatus: {status}\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 <b@example.com> User doesn't exist\r\n\r\n"
        "--B--\r\n"
    ).encode()


def test_a_dsn_names_its_message_and_outcome() -> None:
    key = send_message_key(ACCOUNT, "k1")
    failed = parse_dsn(_dsn("failed", envelope_id(key)))
    assert failed is not None and failed.message_key == key and failed.outcome == "undelivered"
    assert failed.reason is not None and failed.reason.startswith("5.1.1 550 5.1.1")
    event = report_event(ACCOUNT, failed, "e1", datetime.now(UTC))
    assert event.type is EventType.UNDELIVERED and event.content is not None
    delivered = parse_dsn(_dsn("delivered", envelope_id(key), "2.0.0"))
    assert delivered is not None and delivered.outcome == "delivered" and delivered.reason is None
    assert parse_dsn(_dsn("delayed", envelope_id(key), "4.0.0")) is None
    assert parse_dsn(_dsn("failed", "someone-elses-envid")) is None
    assert parse_dsn(b"Subject: plain mail\r\n\r\nhello") is None


@given(st.binary(max_size=2000))
def test_any_bytes_parse_or_give_none(raw: bytes) -> None:
    parse_dsn(b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n' + raw)
