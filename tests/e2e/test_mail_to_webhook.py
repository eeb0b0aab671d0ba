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
from typing import Any

import aiohttp
import pytest
import standardwebhooks

from cli.mailbox_gen import live_message
from cli.stack import Stack
from libs.mime import MAX_RAW_BYTES
from libs.shards import ShardRouter
from services.ingest.imap.sync import message_key as imap_message_key
from tests.e2e.conftest import Pipeline
from tests.e2e.mailbox_helpers import SYNCED_WITHIN_S, append, synced_mailbox
from tests.e2e.webhook_harness import Harness, fast_settings, stack
from tests.e2e.webhook_helpers import Receiver
from tests.polling import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


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
