"""A Dovecot mailbox synced by the running pipeline, for the e2e tests of IMAP mail: a new Dovecot
user registered through the gateway as an IMAP account of a new application, and APPEND into it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import aiohttp

from cli.mailbox_gen import DOMAIN, fill_maildir
from cli.stack import IMAP_TEST_PASSWORD, Stack
from libs.imap.client import Imap4
from libs.shards import ShardRouter
from tests.e2e.conftest import Pipeline
from tests.polling import eventually
from tests.scratch import dovecot_user

__all__ = ["POLL_S", "SYNCED_WITHIN_S", "Gateway", "Mailbox", "append", "synced_mailbox"]

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


@asynccontextmanager
async def synced_mailbox(
    pipeline: Pipeline,
    stack: Stack,
    router: ShardRouter,
    tenant_factory: Any,
    http: aiohttp.ClientSession,
    user_prefix: str = "tohook",
) -> AsyncIterator[tuple[Mailbox, Gateway]]:
    """A new Dovecot user with one message, registered through the gateway and synced by the
    pipeline's ingest (that message queryable); its credentials are removed at the end, or the
    sync would hold an IDLE connection for as long as the pipeline runs."""
    server = stack.dovecot
    user = dovecot_user(user_prefix)
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


async def append(stack: Stack, address: str, raw: bytes, internaldate: datetime | None = None) -> None:
    """APPEND ``raw`` to the INBOX, with ``internaldate`` (the message's occurred_at) if given."""
    client = Imap4("127.0.0.1", stack.dovecot.port, timeout=60)
    await client.wait_hello_from_server()
    assert (await client.login(address, IMAP_TEST_PASSWORD)).result == "OK"
    try:
        assert (await client.append(raw, mailbox="INBOX", date=internaldate)).result == "OK"
    finally:
        await client.logout()
