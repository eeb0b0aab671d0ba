"""The gateway's message document from a row: the fields of migration 0012, and rows written
before it (no participants, no digests) reading as messages with unnamed participants."""

from __future__ import annotations

from typing import Any

import orjson

from services.gateway.messages import message_json
from services.gateway.schemas import Message

BASE: dict[str, Any] = {
    "id": 3 << 48 | 1, "account_id": 3 << 48 | 2, "message_key": b"k", "version": 4, "status": "received",
    "direction": "inbound", "channel": "email", "subject": "s", "snippet": "x", "error_code": None,
    "unread": 1, "starred": 0, "folder": "INBOX", "labels": None, "source": "imap",
    "occurred_at": "2026-01-01T00:00:00.000000Z", "final_at": None, "redacted": 0,
    "created_at": "2026-01-01T00:00:00.000000Z", "updated_at": "2026-01-01T00:00:00.000000Z",
    "thread_key": None, "size_bytes": 10, "parse_warnings": None,
}  # fmt: skip


def test_a_row_from_before_migration_0012_reads_with_unnamed_participants() -> None:
    row = BASE | {
        "sender": "a@x.io", "to_addrs": '["b@y.io"]', "cc_addrs": None,
        "attachments": orjson.dumps([{"filename": "f", "content_type": "text/plain", "size_bytes": 1}]),
        "participants": None, "sent_at": None, "rfc_message_id": None, "in_reply_to": None,
        "reference_ids": None,
    }  # fmt: skip
    doc = message_json(row)
    assert doc["participants"] == {
        "from": [{"name": None, "email": "a@x.io"}], "to": [{"name": None, "email": "b@y.io"}],
        "cc": [], "bcc": [], "reply_to": [],
    }  # fmt: skip
    assert doc["from"] == "a@x.io" and doc["to"] == ["b@y.io"] and doc["bcc"] == doc["reply_to"] == []
    assert doc["date"] is None and doc["message_id"] is None and doc["references"] == []
    assert doc["attachments"][0]["sha256"] is None
    Message.model_validate(doc)  # what the OpenAPI document promises


def test_a_row_with_the_new_fields() -> None:
    named = {"from": [{"name": "Ann", "email": "a@x.io"}], "bcc": [{"name": None, "email": "h@y.io"}]}
    row = BASE | {
        "sender": "a@x.io", "to_addrs": '["b@y.io"]', "cc_addrs": '["c@y.io"]', "attachments": None,
        "participants": orjson.dumps(named), "sent_at": "2025-07-01T08:00:00.000000Z",
        "rfc_message_id": "<m@x>", "in_reply_to": "<p@x>", "reference_ids": '["<r@x>", "<p@x>"]',
    }  # fmt: skip
    doc = message_json(row)
    # Roles the object lacks come from the bare columns (a row whose names arrived in part).
    assert doc["participants"] == {
        "from": [{"name": "Ann", "email": "a@x.io"}], "to": [{"name": None, "email": "b@y.io"}],
        "cc": [{"name": None, "email": "c@y.io"}], "bcc": [{"name": None, "email": "h@y.io"}], "reply_to": [],
    }  # fmt: skip
    assert doc["bcc"] == ["h@y.io"] and doc["date"] == "2025-07-01T08:00:00.000000Z"
    assert (doc["message_id"], doc["in_reply_to"], doc["references"]) == (
        "<m@x>",
        "<p@x>",
        ["<r@x>", "<p@x>"],
    )
    Message.model_validate(doc)
