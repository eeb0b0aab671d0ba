"""In-process webhook stack for the tests: the subscription API on an ephemeral port, the change
relay and the dispatcher, with retries shortened to fractions of a second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiokafka import AIOKafkaConsumer

from libs.accounts import AccountDirectory
from libs.authn import AUTH_FAILURES, auth_failure_limiter
from libs.config import ServiceSettings
from libs.http import problem_middleware
from libs.kafka import CHANGES, make_consumer, make_producer
from libs.resources import DIRECTORY, ROUTER
from libs.shards import ShardRouter
from services.gateway.webhooks import WebhookDispatcher, WebhookSettings, add_webhook_routes
from services.persist.relay import ChangeRelay, RelaySettings
from tests.e2e.webhook_helpers import bound_port

FAST = {
    "webhooks_allow_private_targets": True,
    "webhooks_retry_base_s": 0.2,
    "webhooks_retry_max_delay_s": 1.0,
    "webhooks_rescan_interval_s": 0.5,
    "webhooks_refused_retry_base_s": 0.2,
}


def fast_settings(**overrides: Any) -> WebhookSettings:
    return WebhookSettings(**{**FAST, **overrides})


def consumer_factory(settings: WebhookSettings) -> AIOKafkaConsumer:
    # a short session, so a group member killed by a test is replaced quickly
    return make_consumer(
        settings,
        CHANGES,
        group_id=settings.webhooks_consumer_group,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )


@dataclass
class Harness:
    base: str
    http: aiohttp.ClientSession
    api_key: str

    async def call(self, method: str, path: str, json: Any = None, key: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key or self.api_key}"}
        async with self.http.request(method, self.base + path, json=json, headers=headers) as resp:
            body = await resp.json(content_type=None) if resp.status != 204 else None
            return resp.status, body

    async def subscribe(self, url: str, **fields: Any) -> dict[str, Any]:
        status, body = await self.call("POST", "/v1/webhooks", {"url": url, **fields})
        assert status == 201, body
        result: dict[str, Any] = body
        return result


@asynccontextmanager
async def api_server(router: ShardRouter, settings: WebhookSettings, api_key: str) -> AsyncIterator[Harness]:
    # The API as the gateway mounts it, on the test's open router instead of one of its own.
    app = web.Application(middlewares=[problem_middleware])
    app[ROUTER] = router
    app[DIRECTORY] = AccountDirectory(router)
    app[AUTH_FAILURES] = auth_failure_limiter(ServiceSettings())
    add_webhook_routes(app, settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = bound_port(site)
    try:
        async with aiohttp.ClientSession() as http:
            yield Harness(f"http://127.0.0.1:{port}", http, api_key)
    finally:
        await runner.cleanup()


@asynccontextmanager
async def relay(router: ShardRouter, settings: WebhookSettings) -> AsyncIterator[ChangeRelay]:
    """In-process relay; a standby if another (a running persist) holds the lock, which is fine."""
    async with make_producer(settings) as producer, ChangeRelay(router, producer, RelaySettings()) as r:
        yield r


@asynccontextmanager
async def dispatcher(router: ShardRouter, settings: WebhookSettings) -> AsyncIterator[WebhookDispatcher]:
    async with WebhookDispatcher(router, settings, lambda: consumer_factory(settings)) as d:
        deadline = time.monotonic() + 30
        while not d.leading:
            assert time.monotonic() < deadline, "another dispatcher holds the delivery lock"
            await asyncio.sleep(0.05)
        yield d


@asynccontextmanager
async def stack(
    router: ShardRouter, settings: WebhookSettings, api_key: str
) -> AsyncIterator[tuple[Harness, WebhookDispatcher]]:
    async with (
        api_server(router, settings, api_key) as harness,
        relay(router, settings),
        dispatcher(router, settings) as d,
    ):
        yield harness, d
