"""What more than one stage drives the platform with: Kafka at full speed, a tenant posting
message lifecycles to ingest, authenticated gateway calls, IMAP accounts of the local Dovecot
connected through the gateway, and a receiver that verifies and times webhook deliveries.

Above :mod:`cli.bench.report`, below the stages: it imports no stage, so a stage that needs one of
these takes it from here rather than from another stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web
from aiokafka import TopicPartition

from cli.mailbox_gen import DOMAIN
from cli.stack import IMAP_TEST_PASSWORD, Dovecot
from libs.accounts import create_account, create_application
from libs.config import DatabaseSettings, KafkaSettings
from libs.kafka import TopicSpec, create_topics, make_consumer, make_producer
from libs.shards import ShardRouter
from libs.webhooks import WebhookVerificationError, verify
from services.ingest.constants import MAX_EVENTS_PER_REQUEST

__all__ = [
    "Tenant",
    "WebhookReceiver",
    "count_messages",
    "create_imap_account_via_gateway",
    "created_message_id",
    "disconnect_via_gateway",
    "gateway_request",
    "landed_at",
    "lifecycle",
    "make_tenant",
    "offer",
    "post_events",
    "raw_kafka",
]


async def raw_kafka(kafka: KafkaSettings, count: int, size: int) -> tuple[float, float]:
    """(produce msgs/s, consume msgs/s) with aiokafka, acks=all, at ``size`` bytes a message."""
    topic = f"bench.raw.{uuid.uuid4().hex[:8]}"
    await create_topics(kafka, (TopicSpec(topic, 6),))
    payload = os.urandom(size // 2).hex().encode()[:size]
    async with make_producer(kafka, linger_ms=5) as producer:
        start = time.monotonic()
        futures = []
        for i in range(count):
            futures.append(await producer.send(topic, payload, key=str(i % 997).encode()))
        await asyncio.gather(*futures)
        produce = count / (time.monotonic() - start)
    consumer = make_consumer(kafka, group_id=None, isolation_level="read_uncommitted")
    async with consumer:
        parts = [TopicPartition(topic, p) for p in range(6)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        got = 0
        start = time.monotonic()
        while got < count:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            got += sum(len(v) for v in batch.values())
        consume = count / (time.monotonic() - start)
    return produce, consume


@dataclass
class Tenant:
    api_key: str
    accounts: list[int]


async def make_tenant(db: DatabaseSettings, *, accounts_per_shard: int = 1) -> Tenant:
    """A bench application with ``accounts_per_shard`` accounts on every shard. ingest limits
    each account's rate (1,000 events/s by default), so a stage that posts as fast as ingest
    takes needs enough accounts for the limit not to be what it measures."""
    async with ShardRouter(db) as router:
        app, key = await create_application(router, f"bench-{uuid.uuid4().hex[:6]}")
        accounts = [
            (await create_account(router, app.id, f"bench{s}-{i}@example.test", shard=s)).id
            for i in range(accounts_per_shard)
            for s in router.shard_map.shards
        ]
    return Tenant(key, accounts)


_LIFECYCLE: Final = tuple(f"message.{s}" for s in ("accepted", "queued", "sending", "sent", "delivered"))


def lifecycle(account_id: int, key: str, t: datetime) -> list[dict[str, Any]]:
    """A message's five outbound events, the first with its content, as an application posts them.

    The load generator shares the machine with what it measures: one random read for the five
    event ids and one time string (4.2 against 18.6 us a message with a uuid4 and an isoformat
    each)."""
    content = {
        "from": "sender@example.test",
        "to": ["rcpt@example.test"],
        "subject": f"subject {key}",
        "body_text": f"body of {key} " * 20,
        "channel": "email",
    }
    ids, at, account = os.urandom(16 * len(_LIFECYCLE)).hex(), t.isoformat(), str(account_id)
    out: list[dict[str, Any]] = []
    for i, type_ in enumerate(_LIFECYCLE):
        e: dict[str, Any] = {
            "event_id": ids[32 * i : 32 * i + 32],
            "account_id": account,
            "message_key": key,
            "type": type_,
            "occurred_at": at,
            "direction": "outbound",
        }
        if i == 0:
            e["content"] = content
        out.append(e)
    return out


async def post_events(http: aiohttp.ClientSession, url: str, key: str, events: list[dict[str, Any]]) -> None:
    while True:
        async with http.post(
            f"{url}/v1/events",
            data=orjson.dumps({"events": events}),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        ) as resp:
            if resp.status == 202:
                return
            if resp.status in (429, 503):
                await asyncio.sleep(float(resp.headers.get("Retry-After", "0.5")))
                continue
            raise RuntimeError(f"ingest answered {resp.status}: {await resp.text()}")


async def offer(
    http: aiohttp.ClientSession,
    url: str,
    tenant: Tenant,
    prefix: str,
    rate_events_s: int,
    seconds: float,
    sent_at: dict[str, float] | None = None,
) -> tuple[int, list[asyncio.Task[None]]]:
    """Post lifecycles on a 100 ms clock at ``rate_events_s`` (5 events a message) for ``seconds``
    without waiting for the answers; returns (messages posted, the POST tasks)."""
    tick_s = 0.1
    per_tick = max(1, round(rate_events_s * tick_s / 5))
    tasks: list[asyncio.Task[None]] = []
    n = 0
    start = time.monotonic()
    for tick in range(round(seconds / tick_s)):
        await asyncio.sleep(max(0.0, start + tick * tick_s - time.monotonic()))
        t = datetime.now(UTC)
        events = []
        for _ in range(per_tick):
            key = f"{prefix}{n}"
            events += lifecycle(tenant.accounts[n % len(tenant.accounts)], key, t)
            if sent_at is not None:
                sent_at[key] = time.time()
            n += 1
        for first in range(0, len(events), MAX_EVENTS_PER_REQUEST):
            chunk = events[first : first + MAX_EVENTS_PER_REQUEST]
            tasks.append(asyncio.create_task(post_events(http, url, tenant.api_key, chunk)))
    return n, tasks


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


GATEWAY_RETRIES: Final = 5


async def gateway_request(
    http: aiohttp.ClientSession, method: str, url: str, key: str, body: dict[str, Any] | None = None
) -> Any:
    """One authenticated gateway call; its JSON answer (None for 204), or RuntimeError. A 429 or
    503 (a deadlock the database chose this request for, a busy limit) is asked again after its
    Retry-After, as the API asks clients to, at most ``GATEWAY_RETRIES`` times."""
    for attempt in range(GATEWAY_RETRIES + 1):
        async with http.request(method, url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
            if resp.status in (429, 503) and attempt < GATEWAY_RETRIES:
                await asyncio.sleep(float(resp.headers.get("Retry-After", "0.5")))
                continue
            if resp.status >= 300:
                raise RuntimeError(f"{method} {url}: gateway answered {resp.status}: {await resp.text()}")
            return None if resp.status == 204 else await resp.json()
    raise AssertionError("unreachable")


async def create_imap_account_via_gateway(
    http: aiohttp.ClientSession, gateway_url: str, api_key: str, user: str, server: Dovecot
) -> int:
    """POST /v1/accounts for a Dovecot user of the local stack (plaintext on loopback)."""
    body = {
        "provider": "imap",
        "email": f"{user}@{DOMAIN}",
        "host": "127.0.0.1",
        "port": server.port,
        "tls_mode": "none",
        "username": f"{user}@{DOMAIN}",
        "password": IMAP_TEST_PASSWORD,
    }
    created = await gateway_request(http, "POST", f"{gateway_url}/v1/accounts", api_key, body)
    return int(created["id"])


async def disconnect_via_gateway(
    http: aiohttp.ClientSession, gateway_url: str, api_key: str, account_id: int
) -> None:
    """DELETE /v1/accounts/{id}/credentials: the bench's accounts stop syncing when it is done."""
    await gateway_request(http, "DELETE", f"{gateway_url}/v1/accounts/{account_id}/credentials", api_key)


async def count_messages(router: ShardRouter, account_id: int) -> int:
    shard = account_id >> 48
    pool = await router.pool(shard, write=False)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT COUNT(*) FROM {router.table(shard, 'messages')} WHERE account_id = %s", (account_id,)
        )
        (n,) = await cur.fetchone()
        await conn.commit()
    return int(n)


async def landed_at(router: ShardRouter, account_id: int, prefix: str) -> dict[str, tuple[int, float]]:
    """Subject -> (row id, insert time) of the account's messages whose subject has ``prefix``."""
    shard = account_id >> 48
    pool = await router.pool(shard, write=False)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT subject, id, UNIX_TIMESTAMP(created_at) FROM {router.table(shard, 'messages')}"
            " WHERE account_id = %s AND subject LIKE %s",
            (account_id, prefix + "%"),
        )
        rows = {str(subject): (int(id_), float(at)) for subject, id_, at in await cur.fetchall()}
        await conn.commit()
    return rows
