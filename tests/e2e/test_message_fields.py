"""Message fields of IMAP-synced mail (issue 18, item 1), read back through the API: participants
with their display names, the Date, the threading headers, attachments' SHA-256, the headers on
request (fetched from Dovecot), and the same message in a page and in the delta feed."""

from __future__ import annotations

import base64
import hashlib
import uuid
from typing import Any

import aiohttp
import pytest

from cli.stack import Stack
from libs.shards import ShardRouter
from services.ingest.imap.sync import message_key as imap_message_key
from tests.e2e.client import event, post_events
from tests.e2e.conftest import Pipeline
from tests.e2e.mailbox_helpers import Gateway, append, synced_mailbox

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def message(tag: str, address: str) -> tuple[bytes, bytes]:
    pdf = bytes(range(256)) * 8
    raw = (
        b'From: "Lee, Ann" <ann@example.org>\r\n'
        b"To: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <" + address.encode() + b">, bob@example.org\r\n"
        b"Cc: Carol <carol@example.org>\r\nBcc: Dave <dave@example.org>\r\n"
        b"Reply-To: Support Desk <desk@example.org>\r\n"
        b"Subject: fields " + tag.encode() + b"\r\n"
        b"Date: Tue, 01 Jul 2025 10:11:12 +0200\r\n"
        b"Message-ID: <" + tag.encode() + b"@example.org>\r\n"
        b"In-Reply-To: <parent@example.org>\r\n"
        b"References: <root@example.org>\r\n <parent@example.org>\r\n"
        b"X-Custom: one\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nsee attached\r\n"
        b"--b1\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"a.pdf\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(pdf).replace(b"\n", b"\r\n") +
        b"--b1--\r\n"
    )  # fmt: skip
    return raw, pdf


async def test_a_synced_message_shows_its_fields(
    pipeline: Pipeline, stack: Stack, router: ShardRouter, tenant_factory: Any, http: aiohttp.ClientSession
) -> None:
    async with synced_mailbox(pipeline, stack, router, tenant_factory, http, "fields") as (mailbox, gateway):
        tag = f"f-{uuid.uuid4().hex[:12]}"
        raw, pdf = message(tag, mailbox.address)
        await append(stack, mailbox.address, raw)
        msg = await gateway.row(mailbox.account_id, imap_message_key(mailbox.folder_id, raw))

        assert msg["from"] == "ann@example.org"  # the bare-address fields stay as they were
        assert msg["to"] == [mailbox.address, "bob@example.org"] and msg["cc"] == ["carol@example.org"]
        assert msg["bcc"] == ["dave@example.org"] and msg["reply_to"] == ["desk@example.org"]
        assert msg["participants"] == {
            "from": [{"name": "Lee, Ann", "email": "ann@example.org"}],
            "to": [
                {"name": "Jürgen Müller", "email": mailbox.address},
                {"name": None, "email": "bob@example.org"},
            ],
            "cc": [{"name": "Carol", "email": "carol@example.org"}],
            "bcc": [{"name": "Dave", "email": "dave@example.org"}],
            "reply_to": [{"name": "Support Desk", "email": "desk@example.org"}],
        }
        assert msg["date"] == "2025-07-01T08:11:12.000000Z"
        assert msg["message_id"] == f"<{tag}@example.org>" and msg["in_reply_to"] == "<parent@example.org>"
        assert msg["references"] == ["<root@example.org>", "<parent@example.org>"]
        digest = hashlib.sha256(pdf).hexdigest()
        assert msg["attachments"] == [
            {"filename": "a.pdf", "content_type": "application/pdf", "size_bytes": len(pdf),
             "content_id": None, "inline": False, "sha256": digest},
        ]  # fmt: skip

        # The page and the delta feed show the same message document (without the body).
        listed = (await gateway.messages(mailbox.account_id))[msg["message_key"]]
        assert {k: listed[k] for k in ("participants", "date", "references", "attachments")} == {
            k: msg[k] for k in ("participants", "date", "references", "attachments")
        }
        status, feed = await gateway.call("GET", f"/v1/accounts/{mailbox.account_id}/delta?limit=200")
        assert status == 200, feed
        objects = [d["object"] for d in feed["deltas"] if d["object_id"] == msg["id"] and d["object"]]
        assert objects and objects[-1]["participants"] == msg["participants"]
        assert objects[-1]["message_id"] == msg["message_id"]

        # The headers on request: read from Dovecot, in order, as sent.
        status, headers = await gateway.call("GET", f"/v1/messages/{msg['id']}/headers")
        assert status == 200, headers
        fields = [(h["name"], h["value"]) for h in headers["headers"]]
        assert fields[0] == ("From", '"Lee, Ann" <ann@example.org>')
        assert ("X-Custom", "one") in fields
        assert ("References", "<root@example.org> <parent@example.org>") in fields
        assert headers["id"] == msg["id"]


async def test_a_posted_message_has_named_participants_and_no_headers_to_fetch(
    pipeline: Pipeline, router: ShardRouter, tenant_factory: Any, http: aiohttp.ClientSession
) -> None:
    tenant = await tenant_factory([router.shard_map.shards[0]])
    account = tenant.accounts[0].id
    content = {
        "from": "Ann Lee <ann@example.org>",
        "to": ["bob@example.org", {"name": "Carol", "email": "carol@example.org"}],
        "reply_to": ['"Desk" <desk@example.org>'],
        "subject": "posted",
    }
    status, body = await post_events(
        http, pipeline.url("ingest"), tenant.api_key,
        [event(account, "posted-fields", "received", source="provider", content=content)],
    )  # fmt: skip
    assert status == 202, body
    gateway = Gateway(http, pipeline, tenant.api_key)
    msg = await gateway.row(account, "posted-fields")
    assert msg["from"] == "ann@example.org" and msg["to"] == ["bob@example.org", "carol@example.org"]
    assert msg["participants"]["from"] == [{"name": "Ann Lee", "email": "ann@example.org"}]
    assert msg["participants"]["to"] == [
        {"name": None, "email": "bob@example.org"}, {"name": "Carol", "email": "carol@example.org"}
    ]  # fmt: skip
    assert msg["participants"]["reply_to"] == [{"name": "Desk", "email": "desk@example.org"}]
    assert msg["reply_to"] == ["desk@example.org"] and msg["bcc"] == []
    assert msg["date"] is None and msg["message_id"] is None and msg["references"] == []
    # Only IMAP-synced mail has a header block to fetch.
    status, problem = await gateway.call("GET", f"/v1/messages/{msg['id']}/headers")
    assert status == 404, problem
