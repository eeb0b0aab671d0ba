"""Range queries through the gateway beside the same SQL straight against MariaDB.

``python -m cli.bench_gateway`` seeds an account with ``messages`` rows (persist's own writer),
starts a gateway process (or uses ``--gateway``), then runs ``concurrency`` workers for
``duration_s`` each way: GET /v1/accounts/{id}/messages?limit=50&before=<random time>, and the
statement the gateway runs for it (:func:`services.gateway.messages.list_statement`) over aiomysql.
Reusable from the project's bench command through :func:`bench_range_queries`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp

from cli.services import LocalService
from libs.accounts import create_account, create_application
from libs.config import DatabaseSettings, StackSettings
from libs.db import create_pool
from libs.events import Direction, MessageDoc, PostflightRecord, Status
from libs.ids import shard_of
from libs.shards import ShardRouter
from services.gateway.messages import MessageQuery, list_statement
from services.persist.writer import write_shard

__all__ = ["RangeResult", "bench_range_queries"]

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class RangeResult:
    label: str
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float

    @property
    def per_s(self) -> float:
        return self.requests / self.duration_s

    def line(self) -> str:
        return (
            f"{self.label:<10} {self.per_s:9.0f} req/s  p50 {self.p50_ms:6.2f} ms  p99 {self.p99_ms:6.2f} ms"
            f"   ({self.requests} requests)"
        )


async def _seed(router: ShardRouter, messages: int) -> tuple[int, str]:
    app, key = await create_application(router, f"bench-{uuid.uuid4().hex[:8]}")
    account = await create_account(router, app.id, "bench@example.test")
    shard = shard_of(account.id)
    batch: list[PostflightRecord] = []
    for i in range(messages):
        doc = MessageDoc(
            status=Status.DELIVERED,
            direction=Direction.OUTBOUND,
            channel="email",
            sender="sender@example.test",
            to=[f"r{i % 10}@example.test"],
            subject=f"subject {i}",
            snippet=f"snippet {i}",
            body_text="body " * 40,
            occurred_at=T0 + timedelta(seconds=i * 60),
        )
        batch.append(PostflightRecord(account_id=account.id, message_key=f"b{i:06d}", version=1, message=doc))
        if len(batch) == 500:
            await write_shard(router, shard, batch)
            batch = []
    if batch:
        await write_shard(router, shard, batch)
    return account.id, key


def _random_before(messages: int) -> datetime:
    return T0 + timedelta(seconds=random.randrange(60, messages * 60))


async def _drive(
    label: str, one: Callable[[], Awaitable[None]], concurrency: int, duration_s: float
) -> RangeResult:
    latencies: list[float] = []
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return RangeResult(label, len(ms), elapsed, statistics.median(ms), p99)


async def bench_range_queries(
    gateway_url: str,
    settings: DatabaseSettings,
    *,
    messages: int = 10_000,
    concurrency: int = 16,
    duration_s: float = 10.0,
    page: int = 50,
) -> tuple[RangeResult, RangeResult]:
    """(through the gateway, direct SQL) at the same concurrency against one seeded account."""
    async with ShardRouter(settings) as router:
        account_id, key = await _seed(router, messages)
        url = f"{gateway_url}/v1/accounts/{account_id}/messages"
        headers = {"Authorization": f"Bearer {key}"}
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def via_gateway() -> None:
                before = _random_before(messages).isoformat()
                params = {"limit": str(page), "before": before}
                async with http.get(url, params=params, headers=headers) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"gateway answered {resp.status}: {await resp.text()}")
                    await resp.read()

            await _drive("warm-up", via_gateway, concurrency, 1.0)
            through = await _drive("gateway", via_gateway, concurrency, duration_s)

        cluster = router.shard_map.cluster_of(shard_of(account_id))
        pool = await create_pool(
            settings.model_copy(update={"db_pool_max_size": concurrency}), *cluster.primary
        )
        try:

            async def direct() -> None:
                before = _random_before(messages).astimezone(UTC).replace(tzinfo=None)
                sql, args = list_statement(router, MessageQuery(account_id, limit=page, before=before))
                async with pool.acquire() as conn, conn.cursor() as cur:
                    await cur.execute(sql, args)
                    await cur.fetchall()
                    await conn.commit()

            await _drive("warm-up", direct, concurrency, 1.0)
            raw = await _drive("mariadb", direct, concurrency, duration_s)
        finally:
            pool.close()
            await pool.wait_closed()
    return through, raw


async def _main(args: argparse.Namespace) -> None:
    settings = DatabaseSettings()
    svc = None
    url = args.gateway
    if url is None:
        # range queries only: no webhook dispatcher competing for the core (or for the lock)
        svc = LocalService(
            "gateway",
            8291,
            StackSettings().state_dir,
            env={"FLIGHTLOG_WEBHOOKS_DISPATCHER_IN_GATEWAY": "false"},
            instance="-bench",
        )
        svc.start(wait_s=60)
        url = svc.address
    try:
        through, raw = await bench_range_queries(
            url, settings, messages=args.messages, concurrency=args.concurrency, duration_s=args.duration_s
        )
    finally:
        if svc is not None:
            svc.proc.stop(timeout_s=20)
    print(f"range queries, limit 50, {args.messages} messages, concurrency {args.concurrency}")
    print(through.line())
    print(raw.line())
    print(f"gateway / raw: {through.per_s / raw.per_s:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", help="a running gateway's base URL (default: start one on 8291)")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=10.0)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
