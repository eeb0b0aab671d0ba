"""Event to webhook delivered, through the running services: ``flightlog bench``'s webhook stage.

A receiver on 127.0.0.1 (a free port) in the bench process verifies every request's signature
with :func:`libs.webhooks.verify` and notes when each ``message.created`` arrived. The stage
subscribes it (POST /v1/webhooks on the gateway; the dispatcher runs in the gateway), posts
message lifecycles to ingest at a fixed rate, and measures each message from the start of the
POST that carried it to its webhook reaching the receiver. The payload names the message by its
row id (``data.id``), so ids are mapped back to the posted message keys from the shard tables at
the end. The gateway must allow loopback targets (``FLIGHTLOG_WEBHOOKS_ALLOW_PRIVATE_TARGETS``,
on for the services ``flightlog dev`` starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from cli.bench import BenchReport, Figure, Tenant, _offer, make_tenant
from cli.bench_stats import LatencySummary, summarize
from libs.config import DatabaseSettings
from libs.shards import ShardRouter
from libs.webhooks import WebhookVerificationError, verify

__all__ = [
    "WebhookBench",
    "WebhookReceiver",
    "bench_webhooks",
    "created_message_id",
    "gateway_request",
    "match_latencies",
    "webhook_stage",
]


def created_message_id(body: bytes) -> int | None:
    """The message row id of a ``message.created`` delivery; None for any other body."""
    try:
        payload = orjson.loads(body)
        data = payload["data"]
        if payload["type"] != "message.created" or data["object"] != "message":
            return None
        return int(data["id"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def match_latencies(
    sent_at: Mapping[str, float], key_of_id: Mapping[int, str], delivered_at: Mapping[int, float]
) -> list[float]:
    """Seconds from each message's POST to its delivery, for the deliveries of posted messages."""
    out = []
    for message_id, at in delivered_at.items():
        key = key_of_id.get(message_id)
        if key is not None and key in sent_at:
            out.append(at - sent_at[key])
    return out


@dataclass(slots=True)
class WebhookReceiver:
    """An aiohttp server on 127.0.0.1 that verifies and timestamps webhook deliveries."""

    secret: str | None = None  # set once the subscription has answered
    delivered_at: dict[int, float] = field(default_factory=dict)  # message id -> first arrival
    requests: int = 0
    signature_failures: int = 0
    repeats: int = 0  # a message delivered more than once (retries after a slow answer)
    port: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set on each new delivery
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        self.requests += 1
        if self.secret is None:
            return web.Response(status=503)
        try:
            verify(self.secret, request.headers, body)
        except WebhookVerificationError:
            self.signature_failures += 1
            return web.Response(status=400)
        message_id = created_message_id(body)
        if message_id is not None:
            if message_id in self.delivered_at:
                self.repeats += 1
            else:
                self.delivered_at[message_id] = now
                self.arrived.set()
        return web.Response(status=204)

    async def wait_for(self, count: int, timeout_s: float) -> None:
        """Until ``count`` messages have arrived or ``timeout_s`` has passed."""
        deadline = time.monotonic() + timeout_s
        while len(self.delivered_at) < count and (left := deadline - time.monotonic()) > 0:
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@dataclass(frozen=True, slots=True)
class WebhookBench:
    rate_events_s: int
    duration_s: float
    posted: int  # messages
    delivered: int
    signature_failures: int
    repeats: int
    latency: LatencySummary


async def gateway_request(
    http: aiohttp.ClientSession, method: str, url: str, key: str, body: dict[str, Any] | None = None
) -> Any:
    """One authenticated gateway call; its JSON answer (None for 204), or RuntimeError."""
    async with http.request(method, url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        if resp.status >= 300:
            raise RuntimeError(f"{method} {url}: gateway answered {resp.status}: {await resp.text()}")
        return None if resp.status == 204 else await resp.json()


async def _key_of_id(router: ShardRouter, accounts: list[int], prefix: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for acc in accounts:
        shard = acc >> 48
        pool = await router.pool(shard, write=False)
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT id, message_key FROM {router.table(shard, 'messages')}"
                " WHERE account_id = %s AND message_key LIKE %s",
                (acc, prefix + "%"),
            )
            for id_, key in await cur.fetchall():
                out[int(id_)] = bytes(key).decode()
            await conn.commit()
    return out


async def bench_webhooks(
    db: DatabaseSettings,
    ingest_url: str,
    gateway_url: str,
    *,
    rate_events_s: int = 200,
    duration_s: float = 20.0,
    tenant: Tenant | None = None,
    drain_timeout_s: float = 60.0,
) -> WebhookBench:
    """Post lifecycles at ``rate_events_s`` for ``duration_s`` and time each message's webhook."""
    tenant = tenant or await make_tenant(db)
    receiver = WebhookReceiver()
    await receiver.start()
    prefix = f"wh{uuid.uuid4().hex[:6]}-"
    sent_at: dict[str, float] = {}
    try:
        async with aiohttp.ClientSession() as http:
            try:
                endpoint = await gateway_request(
                    http, "POST", f"{gateway_url}/v1/webhooks", tenant.api_key,
                    {
                        "url": receiver.url,
                        "description": "flightlog bench",
                        "event_types": ["message.created"],
                        "account_ids": [str(a) for a in tenant.accounts],
                    },
                )  # fmt: skip
            except RuntimeError as exc:
                if "private or loopback" in str(exc):
                    raise RuntimeError(
                        f"{exc}\nthe gateway refuses loopback targets: start it with"
                        " FLIGHTLOG_WEBHOOKS_ALLOW_PRIVATE_TARGETS=true (as `flightlog dev` does)"
                    ) from None
                raise
            receiver.secret = endpoint["secret"]
            try:
                posted, tasks = await _offer(
                    http, ingest_url, tenant, prefix, rate_events_s, duration_s, sent_at
                )
                await asyncio.gather(*tasks)
                await receiver.wait_for(posted, drain_timeout_s)
            finally:
                await gateway_request(
                    http, "DELETE", f"{gateway_url}/v1/webhooks/{endpoint['id']}", tenant.api_key
                )
    finally:
        await receiver.stop()
    async with ShardRouter(db) as router:
        key_of_id = await _key_of_id(router, tenant.accounts, prefix)
    latencies = match_latencies(sent_at, key_of_id, receiver.delivered_at)
    if not latencies:
        raise RuntimeError(
            f"no webhook arrived for the {posted} messages posted ({receiver.requests} requests)"
        )
    return WebhookBench(
        rate_events_s,
        duration_s,
        posted,
        len(latencies),
        receiver.signature_failures,
        receiver.repeats,
        summarize(latencies),
    )


async def webhook_stage(
    report: BenchReport,
    progress: Callable[[str], None],
    db: DatabaseSettings,
    ingest_url: str,
    gateway_url: str,
    *,
    quick: bool,
) -> WebhookBench:
    """Run :func:`bench_webhooks`; add its figures to ``report`` beside the docs/architecture.md target."""
    rate = 200
    result = await bench_webhooks(
        db, ingest_url, gateway_url, rate_events_s=rate, duration_s=8.0 if quick else 20.0
    )
    lat = result.latency
    note = (
        f"{result.delivered:,} of {result.posted:,} messages delivered, "
        f"{result.signature_failures} signature failures, {result.repeats} repeats; "
        f"POST start to receiver; max {lat.max_ms:,.0f} ms"
    )
    report.add(
        Figure(f"event to webhook delivered p50 at {rate} events/s", lat.p50_ms, "ms", note=note), progress
    )
    report.add(
        Figure(
            f"event to webhook delivered p99 at {rate} events/s",
            lat.p99_ms,
            "ms",
            note="target p99 <= 200 ms (docs/architecture.md, at 1,000 events/s)",
        ),
        progress,
    )
    return result
