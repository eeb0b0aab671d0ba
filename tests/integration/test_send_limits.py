"""The per-account sending limit through an in-process gateway: a problem document with
Retry-After past the burst, while a repeat of a message already taken is still answered."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest

from cli.services import local_smtp_env
from cli.stack import HOST, Stack
from libs.accounts import create_account, create_application
from libs.service import ServiceContext
from libs.shards import ShardMap, ShardRouter
from services.gateway.service import DEFINITION as GATEWAY
from tests.integration.test_gateway_limits import bearer, problem, served
from tests.scratch import app_name

pytestmark = pytest.mark.integration

BURST = 2


@pytest.fixture
async def gateway(
    monkeypatch: pytest.MonkeyPatch, shard_map: ShardMap, topics: None, stack: Stack
) -> AsyncIterator[tuple[str, ServiceContext]]:
    for name, value in {
        **local_smtp_env(stack.settings),
        "FLIGHTLOG_SEND_BURST_PER_ACCOUNT": str(BURST),
        "FLIGHTLOG_SEND_RATE_PER_ACCOUNT_S": "0.001",  # no refill within the test
    }.items():
        monkeypatch.setenv(name, value)
    async with served(GATEWAY) as it:
        yield it


async def test_sends_past_the_burst_are_refused_with_a_problem(
    gateway: tuple[str, ServiceContext], router: ShardRouter, stack: Stack
) -> None:
    base, _ = gateway
    app, key = await create_application(router, app_name("send-limits"))
    account = await create_account(router, app.id, f"{uuid.uuid4().hex[:8]}@flightlog.test")
    send = f"/v1/accounts/{account.id}/messages/send"
    message = {"to": [{"email": f"nobody-{uuid.uuid4().hex[:8]}@flightlog.test"}], "text": "hi"}
    async with aiohttp.ClientSession(base, headers=bearer(key)) as http:
        smtp = {"host": HOST, "port": stack.settings.submission_port, "username": "u", "password": "p"}
        async with http.put(f"/v1/accounts/{account.id}/smtp", json=smtp) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["reuses_imap_login"] is False
        taken = []
        for n in range(BURST):
            async with http.post(send, json=message, headers={"Idempotency-Key": f"k{n}"}) as resp:
                assert resp.status == 202, await resp.text()
                taken.append(await resp.json())
        async with http.post(send, json=message) as resp:
            doc = await problem(resp, 429)
            assert int(resp.headers["Retry-After"]) >= 1
            assert "may send 2 messages at once" in doc["detail"]
        # A repeat sends nothing, so the limit does not refuse it.
        async with http.post(send, json=message, headers={"Idempotency-Key": "k0"}) as resp:
            assert resp.status == 202 and await resp.json() == taken[0]
