"""Content on demand against the stack's Dovecot: ``GET /v1/messages/{id}/raw`` reads a synced
message from the account's IMAP server, byte for byte, without marking it seen, and
``/attachments/{index}`` serves one attachment decoded, with its SHA-256; a message that is gone
from the server, one that never came from IMAP, one over the size limit and an account without
credentials each get their problem document."""

from __future__ import annotations

import base64
import hashlib
import uuid
from typing import Any

import aiohttp
import pytest

from cli.mailbox_gen import live_message
from cli.stack import IMAP_TEST_PASSWORD, Stack
from libs.crypto import SecretBox
from libs.imap.client import ImapConnection, parse_search
from libs.imap_accounts import ImapAccountsSettings, SyncStore
from libs.imap_login import AccountLogin
from libs.oauth import OAuthSettings
from libs.shards import ShardRouter
from services.gateway.content import ContentSettings, fetch_raw, imap_source
from services.gateway.errors import ApiError
from services.ingest.imap.sync import message_key as imap_message_key
from tests.e2e.conftest import Pipeline
from tests.e2e.gateway_helpers import record, seed
from tests.e2e.mailbox_helpers import Gateway, Mailbox, append, synced_mailbox

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

LOOPBACK = ImapAccountsSettings(imap_allow_private_hosts=True)  # the stack's Dovecot


async def raw(gateway: Gateway, message_id: str) -> tuple[int, bytes, str]:
    async with gateway.http.get(
        f"{gateway.base}/v1/messages/{message_id}/raw", headers=gateway.headers
    ) as resp:
        return resp.status, await resp.read(), resp.content_type


async def imap_flags(stack: Stack, mailbox: Mailbox, subject: str) -> list[str]:
    conn = ImapConnection("127.0.0.1", stack.dovecot.port, "none", 30, allow_private=True)
    await conn.connect(mailbox.address, IMAP_TEST_PASSWORD, use_condstore=False)
    try:
        await conn.examine("INBOX")
        found = await conn.imap.uid_search(f'SUBJECT "{subject}"', charset=None)
        uids = parse_search(found.lines, 10)
        assert len(uids) == 1, found.lines
        items = await conn.uid_fetch(str(uids.pop()), "(FLAGS)")
        return items[0].flags
    finally:
        await conn.close()


async def test_raw_is_the_servers_bytes_and_leaves_the_message_unseen(
    pipeline: Pipeline, stack: Stack, router: ShardRouter, tenant_factory: Any, http: aiohttp.ClientSession
) -> None:
    async with synced_mailbox(pipeline, stack, router, tenant_factory, http, "content") as (mailbox, gateway):
        tag = f"raw-{uuid.uuid4().hex[:12]}"
        head = live_message(tag, mailbox.address.split("@")[0]).split(b"\r\n\r\n", 1)[0]
        line = b"0123456789abcdef" * 4 + b"\r\n"
        message = head + b"\r\n\r\n" + line * (2 * 1024 * 1024 // len(line))  # past the sync's cut
        await append(stack, mailbox.address, message)
        row = await gateway.row(mailbox.account_id, imap_message_key(mailbox.folder_id, message))

        status, body, content_type = await raw(gateway, row["id"])
        assert status == 200, body[:500]
        assert content_type == "message/rfc822"
        assert body == message
        assert "\\Seen" not in await imap_flags(stack, mailbox, tag)


async def test_a_message_posted_by_an_application_has_no_raw_content(
    pipeline: Pipeline, stack: Stack, router: ShardRouter, tenant_factory: Any, http: aiohttp.ClientSession
) -> None:
    async with synced_mailbox(pipeline, stack, router, tenant_factory, http, "content") as (mailbox, gateway):
        first = next(iter((await gateway.messages(mailbox.account_id)).values()))
        # Another application's message: the same 404 as one that does not exist.
        other = await tenant_factory([router.shard_map.shards[0]])
        async with http.get(
            f"{gateway.base}/v1/messages/{first['id']}/raw",
            headers={"Authorization": f"Bearer {other.api_key}"},
        ) as resp:
            assert resp.status == 404
            assert resp.content_type == "application/problem+json"
        # A message an application posted (written as persist writes it): no IMAP source.
        await seed(router, [record(mailbox.account_id, "app-1")])
        posted = await gateway.row(mailbox.account_id, "app-1")
        status, body, content_type = await raw(gateway, posted["id"])
        assert status == 404 and content_type == "application/problem+json"
        assert b"synced over IMAP" in body


async def test_gone_too_large_and_no_credentials_are_problems(
    pipeline: Pipeline, stack: Stack, router: ShardRouter, tenant_factory: Any, http: aiohttp.ClientSession
) -> None:
    async with synced_mailbox(pipeline, stack, router, tenant_factory, http, "content") as (mailbox, gateway):
        first = next(iter((await gateway.messages(mailbox.account_id)).values()))
        store = SyncStore(router, SecretBox.from_settings())
        source = await imap_source(store, mailbox.account_id, first["message_key"])
        assert source is not None and source.folder == "INBOX"

        login = AccountLogin(store, None, OAuthSettings())
        small = ContentSettings(content_max_bytes=64)
        with pytest.raises(ApiError) as too_large:
            await fetch_raw(source, small, LOOPBACK, int(first["id"]), login)
        assert too_large.value.status == 422 and "FLIGHTLOG_CONTENT_MAX_BYTES" in too_large.value.detail

        # No credentials: the sync stops, the row and the UID map stay.
        status, _ = await gateway.call("DELETE", f"/v1/accounts/{mailbox.account_id}/credentials")
        assert status == 200
        status, body, _ = await raw(gateway, first["id"])
        assert status == 409 and b"no IMAP credentials" in body, body

        # Expunged behind the sync's back: the UID the map still holds answers nothing.
        conn = ImapConnection("127.0.0.1", stack.dovecot.port, "none", 30, allow_private=True)
        await conn.connect(mailbox.address, IMAP_TEST_PASSWORD, use_condstore=False)
        try:
            await conn.select("INBOX")
            conn.check(await conn.imap.uid("store", str(source.uid), "+FLAGS.SILENT (\\Deleted)"), "STORE")
            conn.check(await conn.imap.expunge(), "EXPUNGE")
        finally:
            await conn.close()
        with pytest.raises(ApiError) as gone:
            await fetch_raw(source, ContentSettings(), LOOPBACK, int(first["id"]), login)
        assert gone.value.status == 404 and "no longer on the IMAP server" in gone.value.detail


def with_attachments(tag: str, user: str) -> tuple[bytes, bytes, bytes]:
    """A message with a PDF-like binary and a text file named in UTF-8 (RFC 2231)."""
    binary = bytes(range(256)) * 40
    notes = "Grüße aus Köln\r\n".encode() * 10
    head = live_message(tag, user).split(b"\r\n\r\n", 1)[0]
    head = b"\r\n".join(
        line
        for line in head.split(b"\r\n")
        if not line.lower().startswith((b"content-type", b"mime-version"))
    )
    encoded = base64.encodebytes(binary).replace(b"\n", b"\r\n")
    message = head + (
        b"\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nsee attached\r\n"
        b"--b1\r\nContent-Type: application/pdf; name=\"report.pdf\"\r\n"
        b"Content-Disposition: attachment; filename=\"report.pdf\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded +
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Disposition: attachment; filename*=UTF-8''gr%C3%BC%C3%9Fe.txt\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + notes + b"\r\n--b1--\r\n"
    )  # fmt: skip
    return message, binary, notes


async def test_attachments_are_served_from_the_server_with_their_digest(
    pipeline: Pipeline, stack: Stack, router: ShardRouter, tenant_factory: Any, http: aiohttp.ClientSession
) -> None:
    async with synced_mailbox(pipeline, stack, router, tenant_factory, http, "content") as (mailbox, gateway):
        tag = f"att-{uuid.uuid4().hex[:12]}"
        message, binary, notes = with_attachments(tag, mailbox.address.split("@")[0])
        await append(stack, mailbox.address, message)
        row = await gateway.row(mailbox.account_id, imap_message_key(mailbox.folder_id, message))
        assert [a["filename"] for a in row["attachments"]] == ["report.pdf", "grüße.txt"], row["attachments"]

        for index, (content, content_type) in enumerate([(binary, "application/pdf"), (notes, "text/plain")]):
            url = f"{gateway.base}/v1/messages/{row['id']}/attachments/{index}"
            async with http.get(url, headers=gateway.headers) as resp:
                assert resp.status == 200, await resp.text()
                assert await resp.read() == content
                assert resp.content_type == content_type
                assert resp.headers["ETag"] == f'"{hashlib.sha256(content).hexdigest()}"'
                assert resp.headers["Content-Disposition"].startswith("attachment")
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
        async with http.get(
            f"{gateway.base}/v1/messages/{row['id']}/attachments/2", headers=gateway.headers
        ) as resp:
            assert resp.status == 404 and resp.content_type == "application/problem+json"
