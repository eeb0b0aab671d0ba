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
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from cli.bench.drive import Tenant, WebhookReceiver, gateway_request, make_tenant, offer
from cli.bench.report import Figure, Stage, StageContext
from cli.bench.stats import LatencySummary, summarize
from libs.config import DatabaseSettings
from libs.shards import ShardRouter

__all__ = ["STAGE", "WebhookBench", "bench_webhooks", "match_latencies"]


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


@dataclass(frozen=True, slots=True)
class WebhookBench:
    rate_events_s: int
    duration_s: float
    posted: int  # messages
    delivered: int
    signature_failures: int
    repeats: int
    latency: LatencySummary


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
                posted, tasks = await offer(
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


async def webhook_stage(ctx: StageContext) -> None:
    """Run :func:`bench_webhooks` and add its figures (beside the target in docs/architecture.md)."""
    report, progress = ctx.report, ctx.progress
    rate = 200
    result = await bench_webhooks(
        ctx.db, ctx.ingest_url, ctx.gateway_url, rate_events_s=rate, duration_s=8.0 if ctx.quick else 20.0
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


STAGE = Stage(
    "webhooks",
    "webhooks",
    "event to webhook delivered, to a receiver in the bench that verifies every signature",
    "services",
    webhook_stage,
)
