"""Participants in events: objects, "Name <address>" strings and bare addresses all read into
``{name, email}``; records and states written before participants had names still decode."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from libs.events import (
    MAX_RECIPIENTS,
    AttachmentInfo,
    MessageContent,
    Participant,
    decode_event,
    decode_postflight,
    encode,
)
from libs.lifecycle import MessageState
from libs.mime import expand_raw_mime
from services.ingest.validation import item_errors, normalise_item

ACCOUNT = 3 << 48 | 5


def _event(**content: Any) -> dict[str, Any]:
    return {
        "account_id": str(ACCOUNT), "message_key": "k", "type": "message.queued",
        "occurred_at": "2025-01-02T03:04:05Z", "content": content,
    }  # fmt: skip


def _fields(item: dict[str, Any]) -> list[str]:
    try:
        normalise_item(item)
    except ValidationError as exc:
        return [e.field for e in item_errors(0, exc)]
    return []


@pytest.mark.parametrize(
    ("given_as", "expected"),
    [
        ("a@x.io", Participant(email="a@x.io")),
        ("Ann Lee <a@x.io>", Participant(name="Ann Lee", email="a@x.io")),
        ('"Lee, Ann" <a@x.io>', Participant(name="Lee, Ann", email="a@x.io")),
        ("=?utf-8?q?J=C3=BCrgen?= <j@x.de>", Participant(name="Jürgen", email="j@x.de")),
        ("<a@x.io>", Participant(email="a@x.io")),
        ({"name": "Ann", "email": "a@x.io"}, Participant(name="Ann", email="a@x.io")),
        ({"email": "a@x.io"}, Participant(email="a@x.io")),
        ({"name": None, "email": "+15551234567"}, Participant(email="+15551234567")),
        ("+15551234567", Participant(email="+15551234567")),  # SMS: not an email address, as in v1
        # Not one mailbox: kept whole as v1 kept every string, so old records still read.
        ("Bob <bob>", Participant(email="Bob <bob>")),
    ],
)
def test_a_participant_in_any_form(given_as: object, expected: Participant) -> None:
    content = MessageContent.model_validate(
        {"from": given_as, "to": [given_as], "cc": [given_as], "bcc": [given_as], "reply_to": [given_as]}
    )
    assert content.sender == expected
    assert content.to == content.cc == content.bcc == content.reply_to == [expected]


def test_posted_participants_go_on_the_topic_as_objects_and_read_back() -> None:
    event = normalise_item(
        _event(**{"from": "Ann <a@x.io>", "to": ["b@y.io", {"name": "C", "email": "c@z.io"}]})
    )
    record = orjson.loads(encode(event))
    assert record["content"]["from"] == {"name": "Ann", "email": "a@x.io"}
    assert record["content"]["to"] == [{"email": "b@y.io"}, {"name": "C", "email": "c@z.io"}]
    assert decode_event(encode(event)) == event


def test_records_and_states_with_bare_addresses_still_decode() -> None:
    # What ingest, transform and persist wrote before participants had names.
    old_event = orjson.dumps({**_event(**{"from": "a@x.io", "to": ["b@y.io"], "cc": ["c@z.io"]}),
                              "event_id": "e1", "schema_version": 1})  # fmt: skip
    content = decode_event(old_event).content
    assert content is not None and content.sender == Participant(email="a@x.io")
    assert content.to == [Participant(email="b@y.io")] and content.cc == [Participant(email="c@z.io")]
    old_record = orjson.dumps({
        "account_id": str(ACCOUNT), "message_key": "k", "version": 3,
        "message": {"status": "delivered", "occurred_at": "2025-01-02T03:04:05Z", "sender": "a@x.io",
                    "to": ["b@y.io"], "attachments": [{"filename": "f.pdf", "size_bytes": 3}]},
    })  # fmt: skip
    doc = decode_postflight(old_record).message
    assert doc.sender == Participant(email="a@x.io") and doc.to == [Participant(email="b@y.io")]
    assert doc.bcc == [] and doc.date is None and doc.references == []
    assert doc.attachments == [AttachmentInfo(filename="f.pdf", size_bytes=3)]
    state = MessageState.model_validate_json(
        orjson.dumps(
            {
                "account_id": ACCOUNT,
                "message_key": "k",
                "occurred_at": "2025-01-02T03:04:05Z",
                "sender": "a@x.io",
                "to": ["b@y.io"],
            }
        )
    )
    assert state.sender == Participant(email="a@x.io") and state.to == [Participant(email="b@y.io")]


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ({"from": {"email": "x" * 321}}, "content.from.object.email"),
        ({"from": {"name": "n" * 257, "email": "a@x.io"}}, "content.from.object.name"),
        ({"from": {"email": ""}}, "content.from.object.email"),
        ({"from": {"name": "n"}}, "content.from.object.email"),
        ({"from": {"email": "a@x.io", "address": "a@x.io"}}, "content.from.object.address"),
        ({"to": [{"email": "a@x.io"}] * (MAX_RECIPIENTS + 1)}, "content.to"),
        ({"bcc": ["a@x.io"] * (MAX_RECIPIENTS + 1)}, "content.bcc"),
        ({"reply_to": [3]}, "content.reply_to.0"),
        ({"to": ["x" * 321]}, "content.to.0.text.email"),
        ({"cc": ["Ann <" + "x" * 400 + ">"]}, "content.cc.0.text.email"),  # not one mailbox: kept whole
        ({"message_id": "<" + "x" * 997 + ">"}, "content.message_id"),
        ({"in_reply_to": ""}, "content.in_reply_to"),
        ({"references": ["<a@b>"] * 101}, "content.references"),
        ({"date": "9999-12-31T23:00:00-05:00"}, "content.date"),
        ({"date": "2025-01-02T03:04:05"}, "content.date"),  # no zone
        ({"attachments": [{"sha256": "ab" * 31}]}, "content.attachments.0.sha256"),
        ({"attachments": [{"sha256": "AB" * 32}]}, "content.attachments.0.sha256"),
    ],
)
def test_the_new_fields_are_bounded(content: dict[str, Any], field: str) -> None:
    errors = _fields(_event(**content))
    # A participant is tried as an object, then as a string: its errors name both forms.
    where = field.split(".object")[0].split(".text")[0]
    assert any(e.startswith(field) for e in errors) and all(e.startswith(where) for e in errors), errors


def test_the_new_fields_at_their_limits() -> None:
    content = {
        "from": {"name": "n" * 256, "email": "x" * 320},
        "to": [{"email": "a@x.io"}] * MAX_RECIPIENTS,
        "message_id": "<" + "x" * 996 + ">",
        "references": ["<a@b>"] * 100,
        "date": "2025-01-02T03:04:05+09:00",
        "attachments": [{"sha256": "ab" * 32}],
    }
    assert _fields(_event(**content)) == []


@given(
    # Letters, digits, punctuation and spaces; "=" left out: "=?...?=" in a name is an encoded
    # word, decoded as mail clients do.
    st.text(
        st.characters(categories=("L", "N", "P"), include_characters=" ", exclude_characters="="),
        min_size=1,
        max_size=80,
    ),
    st.emails(),
)
def test_a_name_and_address_string_reads_back_as_given(name: str, email: str) -> None:
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    p = MessageContent.model_validate({"from": f"{quoted} <{email}>"}).sender
    assert p is not None and p.email == email
    assert p.name == (" ".join(name.split()) or None)


def test_parsed_mime_fills_the_new_fields() -> None:
    raw = (
        b'From: "Ann Lee" <a@x.io>\r\nTo: b@y.io\r\nBcc: Hidden <h@y.io>\r\nReply-To: Desk <d@x.io>\r\n'
        b"Date: Tue, 1 Jul 2025 10:00:00 +0200\r\nMessage-ID: <m2@x.io>\r\nIn-Reply-To: <m1@x.io>\r\n"
        b"References: <m0@x.io> <m1@x.io>\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: application/pdf\r\n"
        b'Content-Disposition: attachment; filename="a.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        b"aGVsbG8=\r\n--b--\r\n"
    )
    content = expand_raw_mime(MessageContent(raw_mime=base64.b64encode(raw).decode()))
    assert content.sender == Participant(name="Ann Lee", email="a@x.io")
    assert content.bcc == [Participant(name="Hidden", email="h@y.io")]
    assert content.reply_to == [Participant(name="Desk", email="d@x.io")]
    assert content.date == datetime(2025, 7, 1, 8, tzinfo=UTC)
    assert (content.message_id, content.in_reply_to) == ("<m2@x.io>", "<m1@x.io>")
    assert content.references == ["<m0@x.io>", "<m1@x.io>"]
    assert content.attachments is not None
    # sha256 of "hello", the decoded content
    assert content.attachments[0].sha256 == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
