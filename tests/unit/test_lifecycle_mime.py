"""The lifecycle on events that carry raw MIME: expanded into message fields, never kept raw."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import libs.lifecycle
from libs.events import (
    MAX_BODY_BYTES,
    Event,
    EventType,
    MessageContent,
    Participant,
    PostflightRecord,
    Status,
    decode_postflight,
    encode,
)
from libs.lifecycle import MessageState, OutcomeKind, apply, make_snippet
from libs.mime import MAX_RAW_BYTES

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ACCOUNT = 7 << 48 | 2

MULTIPART = (
    b"From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <j@example.de>\r\n"
    b'To: a@example.org, "=?koi8-r?b?8NLJ18XU?=" <b@example.org>\r\n'
    b"Subject: =?iso-8859-1?q?caf=E9?= =?utf-8?b?44GT44KT44Gr44Gh44Gv?=\r\n"
    b"Message-ID: <m2@example.org>\r\nIn-Reply-To: <m1@example.org>\r\n"
    b"References: <root@example.org> <m1@example.org>\r\n"
    b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
    b'--XX\r\nContent-Type: multipart/alternative; boundary="YY"\r\n\r\n'
    b"--YY\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello  w\xc3\xb6rld,\r\n  see attached.\r\n"
    b"--YY\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Hello <b>w\xc3\xb6rld</b></p>\r\n--YY--\r\n"
    b"--XX\r\nContent-Type: application/pdf\r\n"
    b'Content-Disposition: attachment; filename="=?utf-8?q?r=C3=A9sum=C3=A9.pdf?="\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\naGVsbG8gd29ybGQ=\r\n"
    b"--XX\r\nContent-Type: image/png\r\nContent-ID: <logo@x>\r\nContent-Disposition: inline\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--XX--\r\n"
)
ROOT = b"Message-ID: <root@example.org>\r\nSubject: first\r\n\r\nroot body\r\n"

_counter = iter(range(10**9))


def synced(raw: bytes, *, key: str = "m1", at: int = 0, **content: Any) -> Event:
    return Event.model_validate(
        {
            "event_id": f"s{next(_counter)}",
            "account_id": ACCOUNT,
            "message_key": key,
            "type": EventType.SYNCED,
            "occurred_at": T0 + timedelta(seconds=at),
            "source": "imap",
            "content": {"raw_mime": base64.b64encode(raw).decode(), **content},
            "flags": {"unread": True, "folder": "INBOX"},
        }
    )


def emitted(event: Event, state: MessageState | None = None) -> PostflightRecord:
    outcome = apply(state, event)
    assert outcome.kind is OutcomeKind.EMITTED, outcome.reason
    assert outcome.record is not None
    return outcome.record


def test_multipart_with_non_ascii_headers_and_attachments() -> None:
    outcome = apply(None, synced(MULTIPART, size_bytes=len(MULTIPART)))
    assert outcome.kind is OutcomeKind.EMITTED and outcome.record is not None and outcome.state is not None
    doc = outcome.record.message
    assert doc.status is Status.RECEIVED and doc.channel == "email" and doc.source == "imap"
    assert doc.subject == "caféこんにちは"
    assert doc.sender == Participant(name="Jürgen Müller", email="j@example.de")
    assert doc.to == [Participant(email="a@example.org"), Participant(name="Привет", email="b@example.org")]
    assert doc.message_id == "<m2@example.org>" and doc.in_reply_to == "<m1@example.org>"
    assert doc.body_text is not None and doc.body_text.startswith("Hello  wörld")
    assert doc.body_html is not None and "<b>wörld</b>" in doc.body_html
    assert doc.snippet == "Hello wörld, see attached."
    assert doc.size_bytes == len(MULTIPART) and doc.parse_warnings == []
    assert [(a.filename, a.content_type, a.size_bytes, a.content_id, a.inline) for a in doc.attachments] == [
        ("résumé.pdf", "application/pdf", 11, None, False),
        (None, "image/png", 8, "logo@x", True),
    ]
    # The reply threads with its root, whatever order they arrive in.
    root = emitted(synced(ROOT, key="m0")).message
    assert doc.thread_key is not None and doc.thread_key == root.thread_key
    # The raw bytes are gone from what is kept and what goes out.
    assert b"raw_mime" not in outcome.state.model_dump_json().encode()
    assert b"raw_mime" not in encode(outcome.record)
    assert b"aGVsbG8gd29ybGQ" not in outcome.state.model_dump_json().encode()


def test_state_and_record_round_trip_through_json() -> None:
    outcome = apply(None, synced(MULTIPART))
    assert outcome.state is not None and outcome.record is not None
    restored = MessageState.model_validate_json(outcome.state.model_dump_json())
    assert restored == outcome.state
    assert decode_postflight(encode(outcome.record)) == outcome.record


def test_states_and_records_from_before_mime_still_decode() -> None:
    old_state = (
        b'{"account_id": 1, "message_key": "k", "status": "received", "rank": 100, "final": true,'
        b' "version": 1, "occurred_at": "2026-01-01T00:00:00Z", "subject": "s"}'
    )
    state = MessageState.model_validate_json(old_state)
    assert state.attachments is None and state.thread_key is None
    old_record = (
        b'{"schema_version": 1, "account_id": "1", "message_key": "k", "version": 1,'
        b' "message": {"status": "received", "occurred_at": "2026-01-01T00:00:00Z"}}'
    )
    record = decode_postflight(old_record)
    assert record.message.attachments == [] and record.message.parse_warnings == []
    assert record.message.size_bytes is None


def test_fields_the_event_carries_win_over_parsed_ones() -> None:
    doc = emitted(synced(MULTIPART, subject="given", channel="imap-mail")).message
    assert doc.subject == "given" and doc.channel == "imap-mail"
    assert doc.sender is not None and doc.sender.email == "j@example.de"


def test_broken_mime_still_makes_a_message_with_warnings() -> None:
    broken = (
        b"Subject: =?utf-8?q?half=\r\nFrom: <@>\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain; charset=no-such-charset\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n!!not base64 at all\xff\r\n"
    )
    doc = emitted(synced(broken)).message
    assert doc.status is Status.RECEIVED
    assert doc.parse_warnings  # e.g. unknown_charset, bad_multipart
    assert doc.sender is None


def test_bytes_that_are_no_mime_at_all_still_make_a_message() -> None:
    raw = b"\x00\xff just some bytes"
    doc = emitted(synced(raw)).message
    assert doc.status is Status.RECEIVED and doc.size_bytes == len(raw) and doc.parse_warnings


def test_oversized_message_is_parsed_up_to_the_limit_and_warned() -> None:
    head = b"Subject: big\r\nContent-Type: text/plain\r\n\r\n"
    raw = head + b"x" * (MAX_RAW_BYTES - len(head))
    # Exactly the limit fits an event (base64 grows it to the per-field limit) ...
    assert len(base64.b64encode(raw)) == MAX_BODY_BYTES
    doc = emitted(synced(raw)).message
    assert doc.subject == "big" and doc.size_bytes == MAX_RAW_BYTES and doc.parse_warnings == []
    # ... one more byte does not: IMAP sync fetches the first MAX_RAW_BYTES and says the true size.
    with pytest.raises(ValidationError, match="larger than the limit"):
        synced(raw + b"x")
    cut = emitted(synced(raw, key="m2", size_bytes=5 * MAX_RAW_BYTES)).message
    assert cut.size_bytes == 5 * MAX_RAW_BYTES and cut.parse_warnings == ["truncated"]
    assert cut.subject == "big" and cut.body_text is not None


def test_bad_base64_is_refused_by_the_schema() -> None:
    with pytest.raises(ValidationError, match="base64"):
        MessageContent(raw_mime="not base64!")


def test_an_event_that_cannot_be_expanded_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(content: MessageContent, *, max_bytes: int) -> MessageContent:
        raise RuntimeError("boom")

    monkeypatch.setattr(libs.lifecycle, "expand_raw_mime", explode)
    outcome = apply(None, synced(MULTIPART))
    assert outcome.kind is OutcomeKind.REJECTED and outcome.state is None
    assert outcome.reason is not None and "raw_mime" in outcome.reason and "boom" in outcome.reason


def test_redaction_erases_attachments_and_a_resync_does_not_bring_them_back() -> None:
    first = apply(None, synced(MULTIPART))
    redacted = apply(first.state, Event(
        event_id="r1", account_id=ACCOUNT, message_key="m1", type=EventType.REDACTED, occurred_at=T0,
    ))  # fmt: skip
    assert redacted.record is not None
    doc = redacted.record.message
    assert doc.attachments == [] and doc.subject is None and doc.body_text is None and doc.snippet is None
    assert doc.thread_key is not None and doc.size_bytes == len(MULTIPART)
    resync = apply(redacted.state, synced(MULTIPART))
    assert resync.kind is OutcomeKind.IGNORED
    assert resync.state is not None and resync.state.attachments is None


def test_a_resync_with_the_same_message_changes_nothing() -> None:
    first = apply(None, synced(MULTIPART))
    again = apply(first.state, synced(MULTIPART))
    assert again.kind is OutcomeKind.IGNORED and again.record is None


def test_html_only_message_gets_a_snippet_from_its_html() -> None:
    raw = b"Subject: h\r\nContent-Type: text/html\r\n\r\n<style>p{}</style><p>Hi &amp;\r\n  <i>bye</i></p>"
    assert emitted(synced(raw)).message.snippet == "Hi & bye"
    assert make_snippet(None, "<p></p>") is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_any_bytes_give_a_message_that_encodes(raw: bytes) -> None:
    outcome = apply(None, synced(raw))
    assert outcome.kind is OutcomeKind.EMITTED and outcome.record is not None and outcome.state is not None
    orjson.loads(encode(outcome.record))
    MessageState.model_validate_json(outcome.state.model_dump_json())


_FRAGMENTS = [
    b"Subject: =?utf-8?b?", b"=?=", b"\r\n", b"Content-Type: multipart/mixed; boundary=b\r\n", b"--b\r\n",
    b"--b--", b"Content-Transfer-Encoding: quoted-printable\r\n", b"=C3=", b"\xff", b"From: <@>\r\n",
    b"Content-Disposition: attachment; filename=\"=?x-bogus?q?\xe9?=\"\r\n", b"Content-ID: <\xe9>\r\n",
    b"Subject: caf\xe9\r\n", b"Content-Type: application/x; name=\xff\r\n", b"x",
]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=60))
def test_mime_fragments_give_a_message_that_encodes(parts: list[bytes]) -> None:
    outcome = apply(None, synced(b"".join(parts)))
    assert outcome.kind is OutcomeKind.EMITTED and outcome.record is not None and outcome.state is not None
    orjson.loads(encode(outcome.record))
    MessageState.model_validate_json(outcome.state.model_dump_json())
