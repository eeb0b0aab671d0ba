"""The gateway's limits with real requests: failed authentications per client address, open
streams and waiting long-polls per application, each slot given back when its client goes.

The gateway's app is served in-process the way the runner serves it (:func:`libs.service.build_app`
and :func:`libs.service.make_runner`, against the real MariaDB and Kafka): aiohttp's production
server does not cancel a handler whose client disconnected, unlike its test server, and that is
what the release of a slot must survive. ingest's authentication goes through the same code
(:mod:`libs.authn`) and is checked once here too.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from libs.accounts import create_account, create_application
from libs.config import ServiceSettings
from libs.service import ServiceContext, ServiceDefinition, build_app, make_runner
from libs.shards import ShardMap, ShardRouter
from services.gateway.constants import BUSY_RETRY_AFTER_S, MAX_LONG_POLL_S
from services.gateway.resources import LONG_POLL_SLOTS, NOTIFIER, STREAM_SLOTS
from services.gateway.service import DEFINITION as GATEWAY
from services.ingest.service import DEFINITION as INGEST
from tests.polling import eventually
from tests.scratch import app_name

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"
FAILURES = 3
STREAMS = 2
LONG_POLLS = 1
# Well below what would end a stream or a poll by itself (the next heartbeat, the poll's timeout):
# a slot given back within this long was given back because its client went away.
RELEASED_WITHIN_S = 10


@dataclass(frozen=True, slots=True)
class Tenant:
    application_id: int
    api_key: str
    account_id: int


async def new_tenant(router: ShardRouter) -> Tenant:
    app, key = await create_application(router, app_name("limits"))
    account = await create_account(router, app.id, f"{uuid.uuid4().hex[:8]}@example.test", shard=1)
    return Tenant(app.id, key, account.id)


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "FLIGHTLOG_AUTH_FAILURE_BURST": FAILURES,
        "FLIGHTLOG_AUTH_FAILURE_RATE_PER_S": 0.001,  # no refill within a test
        "FLIGHTLOG_GATEWAY_MAX_STREAMS_PER_APPLICATION": STREAMS,
        "FLIGHTLOG_GATEWAY_MAX_LONG_POLLS_PER_APPLICATION": LONG_POLLS,
        # The notifier's safety check wakes every stream of a shard whose changes it did not see
        # on the topic; slower than any wait here, so only the disconnect can end a stream early.
        "FLIGHTLOG_GATEWAY_DELTA_RECHECK_S": 120,
    }.items():
        monkeypatch.setenv(name, str(value))


@asynccontextmanager
async def served(defn: ServiceDefinition) -> AsyncIterator[tuple[str, ServiceContext]]:
    settings = ServiceSettings()
    ctx = build_app(defn, settings)
    runner = make_runner(ctx.app, settings)
    await runner.setup()  # the app's cleanup contexts open its resources here
    try:
        for _ in ("public", "management"):
            await web.TCPSite(runner, "127.0.0.1", 0).start()
        ctx.management_port = runner.addresses[1][1]
        ctx.set_ready()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", ctx
    finally:
        await runner.cleanup()


@pytest.fixture
async def gateway(
    limits: None, shard_map: ShardMap, topics: None
) -> AsyncIterator[tuple[str, ServiceContext]]:
    async with served(GATEWAY) as it:
        # Once its feed is up the notifier wakes every stream once ("read again"); after that,
        # with the safety check slowed down, nothing but a change or a disconnect wakes one.
        notifier = it[1].app[NOTIFIER]
        await eventually(lambda: notifier.feed_up, 30, "the change notifier's feed")
        yield it


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def problem(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert resp.status == status and resp.content_type == PROBLEM, (resp.status, await resp.text())
    doc: dict[str, Any] = await resp.json(content_type=PROBLEM)
    assert doc["status"] == status
    return doc


async def test_failed_authentications_are_limited_per_address_and_known_keys_still_work(
    gateway: tuple[str, ServiceContext], router: ShardRouter
) -> None:
    base, ctx = gateway
    known, fresh = await new_tenant(router), await new_tenant(router)
    async with aiohttp.ClientSession(base) as http:
        async with http.get("/v1/accounts", headers=bearer(known.api_key)) as resp:
            assert resp.status == 200  # now known to this process
        for i in range(FAILURES):
            async with http.get("/v1/accounts", headers=bearer(f"flk_wrong-{i}")) as resp:
                await problem(resp, 401)
        # Out of failures: another unknown key is not even looked up.
        async with http.get("/v1/accounts", headers=bearer("flk_wrong-again")) as resp:
            doc = await problem(resp, 429)
            assert int(resp.headers["Retry-After"]) >= 1
            assert "failed authentications" in doc["detail"]
        # So is a wrong admin key, and a right key this process has not seen yet.
        admin = f"http://127.0.0.1:{ctx.management_port}/v1/admin/applications"
        async with http.post(admin, json={"name": "x"}, headers=bearer("nope")) as resp:
            await problem(resp, 429)
        async with http.get("/v1/accounts", headers=bearer(fresh.api_key)) as resp:
            await problem(resp, 429)
        # A key the process knows keeps working from the same address.
        async with http.get("/v1/accounts", headers=bearer(known.api_key)) as resp:
            assert resp.status == 200


async def test_ingest_limits_failed_authentications_the_same_way(
    limits: None, shard_map: ShardMap, topics: None, router: ShardRouter
) -> None:
    tenant = await new_tenant(router)
    async with served(INGEST) as (base, _), aiohttp.ClientSession(base) as http:
        batch: dict[str, list[Any]] = {"events": []}
        for i in range(FAILURES):
            async with http.post("/v1/events", json=batch, headers=bearer(f"flk_wrong-{i}")) as resp:
                await problem(resp, 401)
        async with http.post("/v1/events", json=batch, headers=bearer(tenant.api_key)) as resp:
            await problem(resp, 429)  # not known to this process yet: no look-up for this address
            assert int(resp.headers["Retry-After"]) >= 1


def stream_path(tenant: Tenant) -> str:
    return f"/v1/accounts/{tenant.account_id}/delta/stream?heartbeat=60"


async def open_stream(base: str, tenant: Tenant) -> tuple[aiohttp.ClientSession, aiohttp.ClientResponse]:
    """A stream whose first bytes arrived (its slot is held); the caller closes the session."""
    http = aiohttp.ClientSession(base)
    resp = await http.get(stream_path(tenant), headers=bearer(tenant.api_key))
    assert resp.status == 200, await resp.text()
    assert (await resp.content.readline()).startswith(b"retry:")
    return http, resp


async def test_streams_are_limited_per_application_and_a_disconnect_gives_the_slot_back(
    gateway: tuple[str, ServiceContext], router: ShardRouter
) -> None:
    base, ctx = gateway
    slots = ctx.app[STREAM_SLOTS]
    tenant, other = await new_tenant(router), await new_tenant(router)
    streams = [await open_stream(base, tenant) for _ in range(STREAMS)]
    try:
        assert slots.held(tenant.application_id) == STREAMS
        async with aiohttp.ClientSession(base) as http:
            async with http.get(stream_path(tenant), headers=bearer(tenant.api_key)) as resp:
                doc = await problem(resp, 429)
                assert resp.headers["Retry-After"] == str(BUSY_RETRY_AFTER_S)
                assert f"{STREAMS} streams" in doc["detail"]
        # Another application has slots of its own.
        streams.append(await open_stream(base, other))
        # A client that goes away gives its slot back at once, not at its next heartbeat (60 s).
        http, resp = streams.pop(0)
        resp.close()
        await http.close()
        await eventually(
            lambda: slots.held(tenant.application_id) == STREAMS - 1, RELEASED_WITHIN_S, "the slot given back"
        )
        streams.append(await open_stream(base, tenant))
    finally:
        for http, resp in streams:
            resp.close()
            await http.close()
    await eventually(lambda: len(slots) == 0, RELEASED_WITHIN_S, "every slot given back")


async def test_long_polls_are_limited_per_application_and_a_disconnect_gives_the_slot_back(
    gateway: tuple[str, ServiceContext], router: ShardRouter
) -> None:
    base, ctx = gateway
    slots = ctx.app[LONG_POLL_SLOTS]
    tenant = await new_tenant(router)
    path = f"/v1/accounts/{tenant.account_id}/delta"
    async with aiohttp.ClientSession(base) as http:
        async with http.get(f"{path}/latest_cursor", headers=bearer(tenant.api_key)) as resp:
            cursor = (await resp.json())["cursor"]
        waiting = f"{path}?cursor={cursor}&timeout={MAX_LONG_POLL_S}"  # nothing changes: it waits
        poller = aiohttp.ClientSession(base)

        async def long_poll() -> int:
            async with poller.get(waiting, headers=bearer(tenant.api_key)) as resp:
                return resp.status

        poll = asyncio.create_task(long_poll())
        try:
            await eventually(lambda: slots.held(tenant.application_id) == LONG_POLLS, 10, "the poll waiting")
            async with http.get(waiting, headers=bearer(tenant.api_key)) as resp:
                await problem(resp, 429)
                assert resp.headers["Retry-After"] == str(BUSY_RETRY_AFTER_S)
            # A read that does not wait needs no slot.
            async with http.get(f"{path}?cursor={cursor}", headers=bearer(tenant.api_key)) as resp:
                assert resp.status == 200
        finally:
            poll.cancel()  # the client goes away mid-poll
            await asyncio.gather(poll, return_exceptions=True)
            await poller.close()
        await eventually(lambda: len(slots) == 0, RELEASED_WITHIN_S, "the slot given back")
        async with http.get(f"{path}?cursor={cursor}&timeout=0.5", headers=bearer(tenant.api_key)) as resp:
            assert resp.status == 200
