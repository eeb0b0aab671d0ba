"""Mail from Dovecot to a queryable row and a webhook, through the running services.

A message APPENDed into the Dovecot mailbox of an IMAP account registered through the gateway
travels through the pipeline's ingest (its IMAP sync), transform and persist processes: it is
read back through the gateway and announced as ``message.created`` to a webhook receiver. The
pipeline's gateway runs without the dispatcher (tests/e2e/conftest.py), so the webhook side is the
harness of test_webhooks: the subscription API and a dispatcher in this process, with private
targets allowed for a receiver on 127.0.0.1.

A message over :data:`libs.mime.MAX_RAW_BYTES` is fetched only that far (a partial fetch): its row
says ``truncated``, keeps the message's true size and the subject parsed from its head.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import pytest
import standardwebhooks

from cli.mailbox_gen import DOMAIN, fill_maildir, live_message
from cli.stack import IMAP_TEST_PASSWORD, Stack
from libs.mime import MAX_RAW_BYTES
from libs.shards import ShardRouter
from services.ingest.imap.client import Imap4
from services.ingest.imap.sync import message_key as imap_message_key
from tests.e2e.conftest import Pipeline
from tests.e2e.webhook_harness import Harness, fast_settings, stack
from tests.e2e.webhook_helpers import Receiver
from tests.polling import eventually
from tests.scratch import dovecot_user

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SYNCED_WITHIN_S: Final = 60.0  # a deadline for a condition polled for, not a speed under test
POLL_S: Final = 0.1


@dataclass
class Mailbox:
    """A Dovecot user synced by the pipeline as an IMAP account of ``api_key``'s application."""

    address: str
    account_id: int
    folder_id: int  # INBOX's: message keys are ``imap:<folder id>:<identity>``
    api_key: str


class Gateway:
    def __init__(self, http: aiohttp.ClientSession, pipeline: Pipeline, api_key: str) -> None:
        self.http, self.base = http, pipeline.url("gateway")
        self.headers = {"Authorization": f"Bearer {api_key}"}

    async def call(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        async with self.http.request(method, self.base + path, json=json, headers=self.headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def messages(self, account_id: int) -> dict[str, dict[str, Any]]:
        status, body = await self.call("GET", f"/v1/accounts/{account_id}/messages?limit=200")
        assert status == 200, body
        return {m["message_key"]: m for m in body["data"]}

    async def row(self, account_id: int, key: str) -> dict[str, Any]:
        """The message of ``key`` in full, once it is queryable."""
        found: dict[str, Any] = {}

        async def stored() -> bool:
            found.update((await self.messages(account_id)).get(key) or {})
            return bool(found)

        await eventually(stored, SYNCED_WITHIN_S, f"message {key} through the gateway")
        status, body = await self.call("GET", f"/v1/messages/{found['id']}")
        assert status == 200, body
        result: dict[str, Any] = body
        return result


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@asynccontextmanager
async def synced_mailbox(
    pipeline: Pipeline, stack: Stack, router: ShardRouter, tenant_factory: Any, http: aiohttp.ClientSession
) -> AsyncIterator[tuple[Mailbox, Gateway]]:
    """A new Dovecot user with one message, registered through the gateway and synced by the
    pipeline's ingest (that message queryable); its credentials are removed at the end, or the
    sync would hold an IDLE connection for as long as the pipeline runs."""
    server = stack.dovecot
    user = dovecot_user("tohook")
    address = f"{user}@{DOMAIN}"
    server.add_user(address)
    fill_maildir(server, user, 1)
    tenant = await tenant_factory([])
    gateway = Gateway(http, pipeline, tenant.api_key)
    status, created = await gateway.call(
        "POST", "/v1/accounts",
        {"email": address, "host": "127.0.0.1", "port": server.port, "tls_mode": "none",
         "username": address, "password": IMAP_TEST_PASSWORD, "shard": router.shard_map.shards[0]},
    )  # fmt: skip
    assert status == 201, created
    account_id = int(created["id"])
    try:
        first: dict[str, dict[str, Any]] = {}

        async def synced() -> bool:
            first.update(await gateway.messages(account_id))
            return bool(first)

        await eventually(synced, SYNCED_WITHIN_S, "the mailbox's first message")
        folder_id = int(next(iter(first)).split(":")[1])
        yield Mailbox(address, account_id, folder_id, tenant.api_key), gateway
    finally:
        status, gone = await gateway.call("DELETE", f"/v1/accounts/{account_id}/credentials")
        assert status == 200, gone


async def append(stack: Stack, address: str, raw: bytes) -> None:
    client = Imap4("127.0.0.1", stack.dovecot.port, timeout=60)
    await client.wait_hello_from_server()
    assert (await client.login(address, IMAP_TEST_PASSWORD)).result == "OK"
    try:
        assert (await client.append(raw, mailbox="INBOX")).result == "OK"
    finally:
        await client.logout()


@asynccontextmanager
async def stack_of_webhooks(router: ShardRouter, api_key: str) -> AsyncIterator[Harness]:
    """The subscription API, the change relay and a dispatcher, in this process."""
    async with stack(router, fast_settings(), api_key) as (harness, _):
        yield harness


async def test_appended_mail_becomes_a_row_and_a_message_created_webhook(
    pipeline: Pipeline, stack: Stack, router: ShardRouter, tenant_factory: Any, http: aiohttp.ClientSession
) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        async with (
            synced_mailbox(pipeline, stack, router, tenant_factory, http) as (mailbox, gateway),
            stack_of_webhooks(router, mailbox.api_key) as hooks,
        ):
            created = await hooks.subscribe(
                receiver.url, event_types=["message.created"], account_ids=[str(mailbox.account_id)]
            )
            tag = f"to-hook-{uuid.uuid4().hex[:12]}"
            raw = live_message(tag, mailbox.address.split("@")[0])
            await append(stack, mailbox.address, raw)

            row = await gateway.row(mailbox.account_id, imap_message_key(mailbox.folder_id, raw))
            assert row["subject"] == tag and row["source"] == "imap" and row["folder"] == "INBOX"
            assert row["direction"] == "inbound" and row["unread"] is True
            assert f"new mail {tag}" in row["body_text"]

            def announced() -> list[dict[str, Any]]:
                return [r.json for r in receiver.ok if r.json["data"]["id"] == row["id"]]

            async def delivered() -> bool:
                return bool(announced())

            await eventually(delivered, SYNCED_WITHIN_S, "the message.created webhook")
            hook = announced()[0]
            assert hook["type"] == "message.created", hook
            assert hook["data"]["account_id"] == str(mailbox.account_id), hook
            assert hook["data"]["object"] == "message" and hook["data"]["change_type"] == "created", hook
            verifier = standardwebhooks.Webhook(created["secret"])
            for got in receiver.ok:
                verifier.verify(got.body, got.headers)
    finally:
        await receiver.stop()


async def test_a_message_over_the_fetch_cut_is_stored_truncated_with_its_true_size_and_subject(
    pipeline: Pipeline, stack: Stack, router: ShardRouter, tenant_factory: Any, http: aiohttp.ClientSession
) -> None:
    """1 MiB in Dovecot, of which IMAP sync fetches MAX_RAW_BYTES (384 KiB)."""
    async with synced_mailbox(pipeline, stack, router, tenant_factory, http) as (mailbox, gateway):
        tag = f"big-{uuid.uuid4().hex[:12]}"
        head = live_message(tag, mailbox.address.split("@")[0]).split(b"\r\n\r\n", 1)[0]
        line = b"y" * 76 + b"\r\n"
        raw = head + b"\r\n\r\n" + line * (1024 * 1024 // len(line))
        assert len(raw) > 2 * MAX_RAW_BYTES
        await append(stack, mailbox.address, raw)

        row = await gateway.row(mailbox.account_id, imap_message_key(mailbox.folder_id, raw))
        assert "truncated" in row["parse_warnings"], row["parse_warnings"]
        assert row["size_bytes"] == len(raw), "the size of the cut, not the message's"
        assert row["subject"] == tag
        assert row["body_text"].startswith("yyyy")
        assert len(row["body_text"].encode()) < MAX_RAW_BYTES  # the body of the cut, not of the whole
