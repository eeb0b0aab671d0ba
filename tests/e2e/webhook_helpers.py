"""Helpers for the relay and webhook tests: change writers, a real HTTP receiver, a topic reader,
a service's metrics."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from aiokafka import TopicPartition

from cli.services import management_address
from libs.config import KafkaSettings
from libs.events import MessageDoc, PostflightRecord
from libs.ids import shard_of
from libs.kafka import CHANGES, TOPICS, make_consumer
from libs.shards import ShardRouter
from services.persist.writer import write_shard

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


async def write_change(
    router: ShardRouter, account_id: int, key: str, version: int, status: str = "delivered"
) -> None:
    """One message version through persist's writer: one ``changes`` row (created or updated)."""
    record = PostflightRecord(
        account_id=account_id,
        message_key=key,
        version=version,
        message=MessageDoc.model_validate(
            {
                "status": status,
                "direction": "outbound",
                "subject": f"s {key} v{version}",
                "occurred_at": T0,
            }
        ),
    )
    await write_shard(router, shard_of(account_id), [record])


async def change_ids(router: ShardRouter, account_id: int) -> list[int]:
    shard = shard_of(account_id)
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT id FROM {router.table(shard, 'changes')} WHERE account_id = %s ORDER BY id",
            (account_id,),
        )
        rows = await cur.fetchall()
        await conn.commit()
    return [int(r[0]) for r in rows]


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # time.time()

    @property
    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = orjson.loads(self.body)
        return parsed


Behaviour = Callable[["Receiver", web.Request], Awaitable[int]]


async def accept(_: Receiver, __: web.Request) -> int:
    return 200


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: records every request, answers what ``behaviour`` says."""

    behaviour: Behaviour = accept
    port: int = 0
    received: list[Received] = field(default_factory=list)
    ok: list[Received] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _handlers: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        got = Received(dict(request.headers), await request.read(), time.time())
        self.received.append(got)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            status = await self.behaviour(self, request)
        finally:
            self._handlers.discard(task)
        if 200 <= status < 300:
            self.ok.append(got)
        return web.Response(status=status, text="thanks" if status < 300 else "not now")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if not self.port:
            self.port = bound_port(site)

    async def stop(self) -> None:
        for task in list(self._handlers):  # a slow handler would outlive the test
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def bound_port(site: web.TCPSite) -> int:
    server = site._server
    assert isinstance(server, asyncio.Server)
    port: int = server.sockets[0].getsockname()[1]
    return port


async def read_changes(
    settings: KafkaSettings, start: dict[TopicPartition, int], accounts: set[int], want: int, timeout_s: float
) -> list[dict[str, Any]]:
    """flightlog.changes messages of ``accounts`` from ``start`` offsets until ``want`` distinct
    change ids were seen (duplicates are kept in the result)."""
    consumer = make_consumer(settings, group_id=None)
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    async with consumer:
        consumer.assign(list(start))
        for tp, offset in start.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        while len(seen) < want and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batch.values():
                for r in records:
                    msg = orjson.loads(r.value or b"")
                    if int(msg["account_id"]) in accounts:
                        assert r.key == msg["account_id"].encode()
                        found.append(msg)
                        seen.add(msg["change_id"])
    return found


async def end_offsets(settings: KafkaSettings) -> dict[TopicPartition, int]:
    consumer = make_consumer(settings, group_id=None)
    async with consumer:
        partitions = next(spec.partitions for spec in TOPICS if spec.name == CHANGES)
        tps = [TopicPartition(CHANGES, p) for p in range(partitions)]
        offsets: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        # aiokafka's stop() right after start() awaits a task cancelled before it ever ran
        await asyncio.sleep(0.01)
        return offsets


def first_seen(ids: list[int]) -> list[int]:
    out, seen = [], set()
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def metric_line(port: int, line: bytes) -> bool:
    """Whether the service on ``port`` exposes ``line`` on /metrics (False while it does not answer)."""
    try:
        with urllib.request.urlopen(
            f"{management_address(f'http://127.0.0.1:{port}')}/metrics", timeout=2
        ) as resp:
            return line in resp.read()
    except OSError:
        return False
