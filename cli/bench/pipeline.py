"""The pipeline from ingest to queryable, through the four running services.

An overload (everything posted at once; the rate at which the last message becomes queryable is
the most the pipeline drains, with py-spy sampling the services meanwhile), a ramp of offered
rates until the pipeline falls behind, and the ingest-to-queryable latency at a fixed rate. Rates
are set beside the raw upsert limit when the raw stage ran before it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from cli.bench.drive import Tenant, lifecycle, make_tenant, offer, post_events
from cli.bench.profile import ServiceProfile, profile_services
from cli.bench.report import RAW_UPSERT, BenchReport, Figure, Stage, StageContext
from cli.services import LocalServices
from libs.config import DatabaseSettings
from libs.shards import ShardRouter

__all__ = ["STAGE", "RampStep", "percentile", "pipeline_latency", "pipeline_ramp", "pipeline_throughput"]


async def _landed(router: ShardRouter, accounts: list[int], prefix: str) -> int:
    async def one(acc: int) -> int:
        shard = acc >> 48
        pool = await router.pool(shard, write=False)
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT COUNT(*) FROM {router.table(shard, 'messages')}"
                " WHERE account_id = %s AND message_key LIKE %s AND status = 'delivered'",
                (acc, prefix + "%"),
            )
            (n,) = await cur.fetchone()
            await conn.commit()
            return int(n)

    return sum(await asyncio.gather(*(one(a) for a in accounts)))


async def _wait_landed(
    router: ShardRouter, accounts: list[int], prefix: str, count: int, timeout_s: float = 300.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while (landed := await _landed(router, accounts, prefix)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {landed} of {count} messages {prefix}* queryable after {timeout_s:.0f} s: "
                "see .state/logs/transform.log and persist.log"
            )
        await asyncio.sleep(0.25)


async def pipeline_throughput(
    db: DatabaseSettings, url: str, tenant: Tenant, messages: int, posters: int = 8, batch_messages: int = 100
) -> tuple[float, float]:
    """Offer events as fast as ingest takes them; returns (events/s accepted, events/s queryable).

    With the offered load above capacity, the rate at which the last message becomes queryable
    is the highest rate the pipeline sustains.
    """
    prefix = f"tp{uuid.uuid4().hex[:6]}-"
    t = datetime.now(UTC)
    batches = []
    for first in range(0, messages, batch_messages):
        events = []
        for n in range(first, min(first + batch_messages, messages)):
            events += lifecycle(tenant.accounts[n % len(tenant.accounts)], f"{prefix}{n}", t)
        batches.append(events)
    queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)
    async with ShardRouter(db) as router, aiohttp.ClientSession() as http:

        async def poster() -> None:
            while not queue.empty():
                await post_events(http, url, tenant.api_key, queue.get_nowait())

        start = time.monotonic()
        await asyncio.gather(*(poster() for _ in range(posters)))
        posted = time.monotonic() - start
        await _wait_landed(router, tenant.accounts, prefix, messages)
        done = time.monotonic() - start
    return messages * 5 / posted, messages * 5 / done


@dataclass(frozen=True, slots=True)
class RampStep:
    offered: int  # events/s
    accepted: float  # events/s ingest answered 202 for, over the step
    backlog_s: float  # posted but not yet queryable at the step's end, in seconds of this rate
    sustained: bool


async def pipeline_ramp(
    db: DatabaseSettings,
    url: str,
    tenant: Tenant,
    progress: Callable[[str], None],
    *,
    start: int = 2_000,
    step: int = 2_000,
    top: int = 30_000,
    step_s: float = 10.0,
    max_backlog_s: float = 2.0,
) -> list[RampStep]:
    """Raise the offered rate step by step until the pipeline falls behind.

    A step is sustained when ingest accepted >= 95% of the offered events within the step and
    what was posted but is not yet queryable at its end is under ``max_backlog_s`` of that rate:
    above the pipeline's capacity that backlog grows with every second, below it it stays at
    about one latency's worth. The ramp stops at the first step that is not sustained and waits
    for the backlog to drain, so the next stage starts on a quiet pipeline.
    """
    steps: list[RampStep] = []
    async with ShardRouter(db) as router, aiohttp.ClientSession() as http:
        for rate in range(start, top + 1, step):
            prefix = f"ramp{uuid.uuid4().hex[:6]}-"
            began = time.monotonic()
            n, tasks = await offer(http, url, tenant, prefix, rate, step_s)
            # answers that come after the step's end count against its accepted rate
            await asyncio.wait(tasks, timeout=max(0.0, began + step_s - time.monotonic()) + 0.5)
            accepted = sum(t.done() and t.exception() is None for t in tasks) / len(tasks) * n * 5 / step_s
            landed = await _landed(router, tenant.accounts, prefix)
            backlog_s = (n - landed) / (rate / 5)
            ok = accepted >= 0.95 * rate and backlog_s <= max_backlog_s
            steps.append(RampStep(rate, accepted, backlog_s, ok))
            progress(
                f"  ramp {rate:,} events/s: accepted {accepted:,.0f}/s, backlog {backlog_s:.2f} s"
                f" -> {'sustained' if ok else 'falling behind'}"
            )
            await asyncio.gather(*tasks)
            if not ok:
                await _wait_landed(router, tenant.accounts, prefix, n)
                break
    return steps


async def pipeline_latency(
    db: DatabaseSettings, url: str, tenant: Tenant, rate_events_s: int, seconds: float
) -> list[float]:
    """Post at a fixed rate; latency of each message = its row's last write - its POST's start."""
    prefix = f"lat{uuid.uuid4().hex[:6]}-"
    sent_at: dict[str, float] = {}
    async with ShardRouter(db) as router, aiohttp.ClientSession() as http:
        n, tasks = await offer(http, url, tenant, prefix, rate_events_s, seconds, sent_at)
        await asyncio.gather(*tasks)
        await _wait_landed(router, tenant.accounts, prefix, n)
        latencies = []
        for acc in tenant.accounts:
            shard = acc >> 48
            pool = await router.pool(shard, write=False)
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(
                    f"SELECT message_key, UNIX_TIMESTAMP(updated_at) FROM "
                    f"{router.table(shard, 'messages')} WHERE account_id = %s AND message_key LIKE %s",
                    (acc, prefix + "%"),
                )
                for key, at in await cur.fetchall():
                    latencies.append(float(at) - sent_at[bytes(key).decode()])
                await conn.commit()
    return latencies


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _beside_upsert(report: BenchReport, rows_s: float) -> tuple[str | None, float | None]:
    """The raw upsert limit and the ratio of ``rows_s`` to it, when the raw stage ran first."""
    raw = report.by_stage(RAW_UPSERT)
    if raw is None:
        return None, None
    return f"{raw.value:,.0f} rows/s upsert", rows_s / raw.value


async def pipeline_stage(ctx: StageContext) -> None:
    report, progress, db, url, quick = ctx.report, ctx.progress, ctx.db, ctx.ingest_url, ctx.quick
    tenant = await make_tenant(db)
    overload = asyncio.create_task(pipeline_throughput(db, url, tenant, 4_000 if quick else 20_000))
    profiles: list[ServiceProfile] = []
    if ctx.profile_dir is not None:
        await asyncio.sleep(1.0)  # past the first requests, into the steady overload
        services = LocalServices().services
        pids = {n: pid for n in ("ingest", "transform", "persist") if (pid := services[n].proc.pid())}
        profiles = await profile_services(pids, 3.0 if quick else 8.0, ctx.profile_dir)
    accepted, drained = await overload
    report.add(
        Figure("ingest accepted (POST /v1/events, 500 events/request)", accepted, "events/s"), progress
    )
    # Each message is 5 events and one row: the row rate is what MariaDB sees.
    limit, ratio = _beside_upsert(report, drained / 5)
    report.add(
        Figure(
            "end-to-end drain rate under overload (everything posted at once)",
            drained,
            "events/s",
            limit=limit,
            ratio=ratio,
            note=f"{drained / 5:,.0f} rows/s; ratio is rows/s over raw upsert rows/s",
        ),
        progress,
    )
    for prof in profiles:
        report.profiles.append(prof.line())
        progress(f"  profile {prof.line()}")
    steps = await pipeline_ramp(
        db, url, tenant, progress, step=2_000, top=10_000 if quick else 30_000,
        step_s=4.0 if quick else 10.0,
    )  # fmt: skip
    held = [s for s in steps if s.sustained]
    best = max((s.offered for s in held), default=0)
    limit, ratio = _beside_upsert(report, best / 5)
    report.add(
        Figure(
            "end-to-end ingest to queryable, highest sustained rate (ramp)",
            best,
            "events/s",
            limit=limit,
            ratio=ratio,
            note=f"{best / 5:,.0f} rows/s; steps of 2,000 events/s; "
            + ", ".join(f"{s.offered // 1000}k: {s.backlog_s:.1f} s backlog" for s in steps),
        ),
        progress,
    )
    latencies = await pipeline_latency(db, url, tenant, 2_000, 10.0 if quick else 30.0)
    report.add(
        Figure(
            "ingest-to-queryable latency p50 at 2,000 events/s", statistics.median(latencies) * 1000, "ms"
        ),
        progress,
    )
    report.add(
        Figure("ingest-to-queryable latency p99 at 2,000 events/s", percentile(latencies, 99) * 1000, "ms"),
        progress,
    )


STAGE = Stage(
    "pipeline",
    "pipeline",
    "ingest to queryable: overload drain rate (py-spy profile), sustained-rate ramp, latency",
    "services",
    pipeline_stage,
)
