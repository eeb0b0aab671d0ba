"""``flightlog bench``: every stage measured beside the raw limit of the same machine, in one run.

Raw limits: MariaDB batched upserts into a real shard table, Kafka produce and consume with
aiokafka at the pipeline's message size. Pipeline: the highest sustained events/s from ingest to
queryable, and the ingest-to-queryable latency at a fixed rate. Each stage reports its figure and,
where one applies, its ratio to the raw limit.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import TopicPartition

from cli.bench_profile import ServiceProfile, profile_services
from cli.services import LocalServices
from libs.accounts import create_account, create_application
from libs.config import DatabaseSettings, KafkaSettings
from libs.db import connect, shard_schema
from libs.db.migrate import migrate_shard
from libs.events import Direction, MessageDoc, PostflightRecord, Status
from libs.kafka import TopicSpec, create_topics, make_consumer, make_producer
from libs.shards import ShardRouter
from services.ingest.constants import MAX_EVENTS_PER_REQUEST
from services.persist import writer as writer_sql
from services.persist.writer import write_shard

__all__ = ["BenchReport", "run_bench"]

SCRATCH_SHARD = 9999  # a schema outside the shard map, dropped afterwards


@dataclass
class Figure:
    stage: str
    value: float
    unit: str
    limit: str | None = None
    ratio: float | None = None
    note: str = ""


@dataclass
class BenchReport:
    started_at: str
    machine: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)

    def add(self, figure: Figure, progress: Callable[[str], None]) -> None:
        self.figures.append(figure)
        progress(f"  {figure.stage}: {_fmt(figure.value)} {figure.unit}")

    def by_stage(self, stage: str) -> Figure | None:
        return next((f for f in self.figures if f.stage == stage), None)

    def table(self) -> str:
        rows = ["| stage | figure | raw limit (same run) | ratio | note |", "| --- | --- | --- | --- | --- |"]
        for f in self.figures:
            ratio = f"{f.ratio:.0%}" if f.ratio is not None else ""
            rows.append(f"| {f.stage} | {_fmt(f.value)} {f.unit} | {f.limit or ''} | {ratio} | {f.note} |")
        return "\n".join(rows)

    def to_json(self) -> str:
        return json.dumps(
            {
                "started_at": self.started_at,
                "machine": self.machine,
                "figures": [asdict(f) for f in self.figures],
                "profiles": self.profiles,
            },
            indent=2,
        )


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"


def machine_facts() -> dict[str, Any]:
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    import aiokafka
    import aiomysql

    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024**2, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "aiokafka": aiokafka.__version__,
        "aiomysql": aiomysql.__version__,
    }


def _sample_record(account_id: int, n: int) -> PostflightRecord:
    now = datetime.now(UTC)
    return PostflightRecord(
        account_id=account_id,
        message_key=f"bench-{n}",
        version=1,
        message=MessageDoc(
            status=Status.DELIVERED,
            direction=Direction.OUTBOUND,
            channel="email",
            sender="sender@example.test",
            to=["rcpt@example.test"],
            subject=f"subject {n}",
            snippet="a short body",
            body_text="a short body " * 20,
            occurred_at=now,
            final_at=now,
        ),
    )


async def raw_mariadb_upserts(db: DatabaseSettings, seconds: float, batch: int = 500) -> tuple[float, float]:
    """Rows/s into a scratch shard's messages table: (plain batched upsert, persist's writer).

    The plain figure is the raw limit: one multi-row ``INSERT ... ON DUPLICATE KEY UPDATE`` per
    transaction with the rows already encoded. The writer figure adds what persist does on top
    (version reads, the change rows, encoding), so the gap between the two is persist's own cost.
    """
    async with ShardRouter(db) as router:
        cluster = next(iter(router.shard_map.clusters.values()))
        async with connect(db, *cluster.primary) as conn:
            await migrate_shard(conn, SCRATCH_SHARD)
        # Route the scratch shard (outside the map) to the first cluster for this run only.
        router.shard_map.shard_cluster[SCRATCH_SHARD] = cluster.cluster_id
        account = 1 + (SCRATCH_SHARD << 48)
        try:
            sql = writer_sql.upsert_statement(router.table(SCRATCH_SHARD, "messages"), batch)
            rows = [writer_sql.row(_sample_record(account, n))[0] for n in range(batch * 40)]
            pool = await router.pool(SCRATCH_SHARD)
            done, i = 0, 0
            start = time.monotonic()
            async with pool.acquire() as conn, conn.cursor() as cur:
                while time.monotonic() - start < seconds:
                    chunk = rows[i : i + batch]
                    i = (i + batch) % len(rows)
                    await cur.execute(sql, [v for r in chunk for v in r])
                    await conn.commit()
                    done += batch
            plain = done / (time.monotonic() - start)

            n, done = 10**6, 0
            start = time.monotonic()
            while time.monotonic() - start < seconds:
                records = [_sample_record(account, n + k) for k in range(batch)]
                n += batch
                await write_shard(router, SCRATCH_SHARD, records)
                done += batch
            return plain, done / (time.monotonic() - start)
        finally:
            del router.shard_map.shard_cluster[SCRATCH_SHARD]
            async with connect(db, *cluster.primary) as conn, conn.cursor() as cur:
                await cur.execute(f"DROP DATABASE IF EXISTS `{shard_schema(SCRATCH_SHARD)}`")


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


async def make_tenant(db: DatabaseSettings) -> Tenant:
    async with ShardRouter(db) as router:
        app, key = await create_application(router, f"bench-{uuid.uuid4().hex[:6]}")
        accounts = [
            (await create_account(router, app.id, f"bench{s}@example.test", shard=s)).id
            for s in router.shard_map.shards
        ]
    return Tenant(key, accounts)


def lifecycle(account_id: int, key: str, t: datetime) -> list[dict[str, Any]]:
    content = {
        "from": "sender@example.test",
        "to": ["rcpt@example.test"],
        "subject": f"subject {key}",
        "body_text": f"body of {key} " * 20,
        "channel": "email",
    }
    out = []
    for i, status in enumerate(("accepted", "queued", "sending", "sent", "delivered")):
        e: dict[str, Any] = {
            "event_id": uuid.uuid4().hex,
            "account_id": str(account_id),
            "message_key": key,
            "type": f"message.{status}",
            "occurred_at": t.isoformat(),
            "direction": "outbound",
        }
        if i == 0:
            e["content"] = content
        out.append(e)
    return out


async def _post(http: aiohttp.ClientSession, url: str, key: str, events: list[dict[str, Any]]) -> None:
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
                await _post(http, url, tenant.api_key, queue.get_nowait())

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


async def _offer(
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
            tasks.append(asyncio.create_task(_post(http, url, tenant.api_key, chunk)))
    return n, tasks


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
            n, tasks = await _offer(http, url, tenant, prefix, rate, step_s)
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
        n, tasks = await _offer(http, url, tenant, prefix, rate_events_s, seconds, sent_at)
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


async def run_bench(
    progress: Callable[[str], None],
    *,
    quick: bool = False,
    extra: list[Callable[[BenchReport], Awaitable[None]]] | None = None,
    ingest_url: str = "http://127.0.0.1:8081",
    gateway_url: str = "http://127.0.0.1:8080",
    profile_dir: Path | None = None,
) -> BenchReport:
    db, kafka = DatabaseSettings(), KafkaSettings()
    report = BenchReport(started_at=datetime.now(UTC).isoformat(timespec="seconds"), machine=machine_facts())
    seconds = 5.0 if quick else 15.0
    progress("raw limits")
    upsert, writer = await raw_mariadb_upserts(db, seconds)
    report.add(Figure("raw MariaDB batched upsert (500 rows/txn)", upsert, "rows/s"), progress)
    report.add(
        Figure(
            "persist writer alone (version guard + change rows)",
            writer,
            "rows/s",
            limit=f"{upsert:,.0f} rows/s upsert",
            ratio=writer / upsert,
        ),
        progress,
    )
    size = len(orjson.dumps(lifecycle(1 << 48 | 1, "bench-0000001", datetime.now(UTC))[0]))
    produce, consume = await raw_kafka(kafka, 50_000 if quick else 200_000, size)
    report.add(Figure(f"raw Kafka produce (aiokafka, acks=all, {size} B)", produce, "msgs/s"), progress)
    report.add(Figure(f"raw Kafka consume (aiokafka, {size} B)", consume, "msgs/s"), progress)

    progress("pipeline")
    tenant = await make_tenant(db)
    overload = asyncio.create_task(pipeline_throughput(db, ingest_url, tenant, 4_000 if quick else 20_000))
    profiles: list[ServiceProfile] = []
    if profile_dir is not None:
        await asyncio.sleep(1.0)  # past the first requests, into the steady overload
        services = LocalServices().services
        pids = {n: pid for n in ("ingest", "transform", "persist") if (pid := services[n].proc.pid())}
        profiles = await profile_services(pids, 3.0 if quick else 8.0, profile_dir)
    accepted, drained = await overload
    report.add(
        Figure("ingest accepted (POST /v1/events, 500 events/request)", accepted, "events/s"), progress
    )
    # Each message is 5 events and one row: the row rate is what MariaDB sees.
    report.add(
        Figure(
            "end-to-end drain rate under overload (everything posted at once)",
            drained,
            "events/s",
            limit=f"{upsert:,.0f} rows/s upsert",
            ratio=(drained / 5) / upsert,
            note=f"{drained / 5:,.0f} rows/s; ratio is rows/s over raw upsert rows/s",
        ),
        progress,
    )
    for prof in profiles:
        report.profiles.append(prof.line())
        progress(f"  profile {prof.line()}")
    steps = await pipeline_ramp(
        db, ingest_url, tenant, progress, step=2_000, top=10_000 if quick else 30_000,
        step_s=4.0 if quick else 10.0,
    )  # fmt: skip
    held = [s for s in steps if s.sustained]
    best = max((s.offered for s in held), default=0)
    report.add(
        Figure(
            "end-to-end ingest to queryable, highest sustained rate (ramp)",
            best,
            "events/s",
            limit=f"{upsert:,.0f} rows/s upsert",
            ratio=(best / 5) / upsert,
            note=f"{best / 5:,.0f} rows/s; steps of 2,000 events/s; "
            + ", ".join(f"{s.offered // 1000}k: {s.backlog_s:.1f} s backlog" for s in steps),
        ),
        progress,
    )
    latencies = await pipeline_latency(db, ingest_url, tenant, 2_000, 10.0 if quick else 30.0)
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
    progress("gateway")
    from cli.bench_gateway import bench_gateway

    gw = await bench_gateway(gateway_url, db, duration_s=5.0 if quick else 10.0)
    for what, through, direct in (
        ("range query (16 concurrent, 50 rows)", gw.range_gateway, gw.range_direct),
        ("get by id (16 concurrent)", gw.get_gateway, gw.get_direct),
    ):
        report.add(
            Figure(
                f"raw {what}, same SQL straight to MariaDB",
                direct.per_s,
                "req/s",
                note=f"p50 {direct.p50_ms:.1f} ms, p99 {direct.p99_ms:.1f} ms",
            ),
            progress,
        )
        report.add(
            Figure(
                f"{what} through the gateway",
                through.per_s,
                "req/s",
                limit=f"{direct.per_s:,.0f} req/s direct",
                ratio=through.per_s / direct.per_s,
                note=f"p50 {through.p50_ms:.1f} ms, p99 {through.p99_ms:.1f} ms",
            ),
            progress,
        )
    progress("webhooks")
    from cli.bench_webhooks import webhook_stage

    await webhook_stage(report, progress, db, ingest_url, gateway_url, quick=quick)
    progress("imap")
    from cli.bench_imap import imap_stage

    await imap_stage(report, progress, db, gateway_url, quick=quick)
    progress("idle imap accounts")
    from cli.bench_idle import idle_stage

    await idle_stage(report, progress, db, gateway_url, quick=quick)
    progress("transform memory")
    from cli.bench_transform_memory import transform_memory_stage

    await transform_memory_stage(report, progress, kafka, quick=quick)
    for stage in extra or []:
        await stage(report)
    return report


def write_benchmarks_md(report: BenchReport, command: str, path: Path) -> None:
    m = report.machine
    profile = ""
    if report.profiles:
        profile = (
            "\n\n## Where the time goes\n\n"
            "py-spy on each pipeline service during the overload stage (share of one core running "
            "Python code, then the functions with the most self time):\n\n"
            + "\n".join(f"- {line}" for line in report.profiles)
        )
    path.write_text(
        "# Benchmarks\n\n"
        f"Produced by `{command}` on {report.started_at}: {m['cores']} cores, {m['memory_gib']} GiB, "
        f"Python {m['python']}, aiokafka {m['aiokafka']}, aiomysql {m['aiomysql']}, kernel {m['kernel']}. "
        "Kafka, both MariaDB servers, every service and the load generator share the machine.\n\n"
        + report.table()
        + "\n\nRatios compare rows/s with rows/s: one message is five lifecycle events and one row. "
        "Webhook latency runs from each POST /v1/events's start to the bench's own receiver on "
        "127.0.0.1 (signatures verified); the IMAP stages sync a generated Dovecot mailbox through "
        "the running ingest service, timed to the rows in the account's shard table and to the "
        "new mail's webhooks; idle accounts are measured on the ingest process (CPU time and RSS). "
        "Figures move by tens of percent between runs on this shared 2-core machine." + profile + "\n"
    )
