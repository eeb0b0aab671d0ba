"""The raw limits of this machine, measured in the same run as the stages they are compared with.

MariaDB: one multi-row ``INSERT ... ON DUPLICATE KEY UPDATE`` per transaction of new rows into a
scratch shard's messages table with each driver of :data:`cli.bench.rawsql.DRIVERS` (rows/s and
the client's CPU per row), beside persist's own writer over rows of the same kind (the fastest
driver's rate is the limit it is a ratio of). Kafka: aiokafka produce (acks=all) and consume at
the size of one of the pipeline's lifecycle events. The pipeline stage reports its rates as a ratio
of the upsert figure (:data:`cli.bench.report.RAW_UPSERT`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from cli.bench.drive import lifecycle, raw_kafka
from cli.bench.rawsql import DRIVERS, cpu_s, raw_pool
from cli.bench.report import RAW_UPSERT, Figure, Stage, StageContext
from libs.config import DatabaseSettings
from libs.db import connect, shard_schema
from libs.db.migrate import migrate_shard
from libs.events import Direction, MessageDoc, Participant, PostflightRecord, Status
from libs.shards import ShardRouter
from services.persist import writer as writer_sql
from services.persist.writer import write_shard

__all__ = ["STAGE", "UpsertRate", "raw_mariadb_upserts"]

SCRATCH_SHARD = 9999  # a schema outside the shard map, dropped afterwards


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
            sender=Participant(email="sender@example.test"),
            to=[Participant(email="rcpt@example.test")],
            subject=f"subject {n}",
            snippet="a short body",
            body_text="a short body " * 20,
            occurred_at=now,
            final_at=now,
            # Mail comes in conversations: four messages a thread, so the writer's figure includes
            # keeping the threads (libs.threads).
            thread_key=f"bench-thread-{n // 4}",
        ),
    )


@dataclass(frozen=True, slots=True)
class UpsertRate:
    """Rows/s and the bench process's CPU time per row (user + sys) over one timed loop."""

    rows_per_s: float
    cpu_us_per_row: float


async def _timed(seconds: float, batch: int, one: Callable[[], Awaitable[float]]) -> UpsertRate:
    """Runs ``one`` (a batch) for ``seconds``; ``one`` returns the CPU seconds it spent preparing
    its input, which are not the cost being measured."""
    done, excluded = 0, 0.0
    cpu0, start = cpu_s(), time.monotonic()
    while time.monotonic() - start < seconds:
        excluded += await one()
        done += batch
    elapsed, cpu = time.monotonic() - start, cpu_s() - cpu0 - excluded
    return UpsertRate(done / elapsed, cpu / done * 1e6)


async def raw_mariadb_upserts(
    db: DatabaseSettings, seconds: float, batch: int = 500
) -> tuple[dict[str, UpsertRate], UpsertRate]:
    """Rows/s into a scratch shard's messages table: the plain batched upsert with each driver of
    :data:`cli.bench.rawsql.DRIVERS`, and persist's writer.

    The plain figure is the raw limit: one multi-row ``INSERT ... ON DUPLICATE KEY UPDATE`` per
    transaction of rows not stored yet (as the writer's are), already encoded. The writer figure
    adds what persist does on top (version reads, threads, the change rows, encoding), so the gap
    between the two is persist's own cost. (Upserting stored rows again, as this did until
    December 2026, measured 11,174 against 12,958 rows/s of new rows in one run.)
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
            fresh = 0

            async def upsert_rate(driver: str) -> UpsertRate:
                async with raw_pool(driver, db, *cluster.primary, size=1) as query:
                    i = 0

                    async def upsert() -> float:
                        nonlocal i, fresh
                        cpu0 = cpu_s()
                        # the template rows under keys not used yet
                        chunk = [
                            (r[0], b"raw-%d" % (fresh + k), *r[2:]) for k, r in enumerate(rows[i : i + batch])
                        ]
                        i, fresh = (i + batch) % len(rows), fresh + batch
                        building = cpu_s() - cpu0
                        await query(sql, [v for r in chunk for v in r])
                        return building

                    return await _timed(seconds, batch, upsert)

            plain = {driver: await upsert_rate(driver) for driver in DRIVERS}
            n = 10**6

            async def write() -> float:
                nonlocal n
                cpu0 = cpu_s()
                records = [_sample_record(account, n + k) for k in range(batch)]
                n += batch
                building = cpu_s() - cpu0
                await write_shard(router, SCRATCH_SHARD, records)
                return building

            return plain, await _timed(seconds, batch, write)
        finally:
            del router.shard_map.shard_cluster[SCRATCH_SHARD]
            async with connect(db, *cluster.primary) as conn, conn.cursor() as cur:
                await cur.execute(f"DROP DATABASE IF EXISTS `{shard_schema(SCRATCH_SHARD)}`")


async def raw_stage(ctx: StageContext) -> None:
    report, progress = ctx.report, ctx.progress
    plain, writer = await raw_mariadb_upserts(ctx.db, 5.0 if ctx.quick else 15.0)
    for driver, rate in plain.items():
        report.add(
            Figure(
                f"{RAW_UPSERT}, {driver}",
                rate.rows_per_s,
                "rows/s",
                note=f"{rate.cpu_us_per_row:.1f} us of client CPU per row; rows not stored yet",
            ),
            progress,
        )
    fastest = max(plain, key=lambda d: plain[d].rows_per_s)
    upsert = plain[fastest].rows_per_s
    report.add(Figure(RAW_UPSERT, upsert, "rows/s", note=f"the fastest driver: {fastest}"), progress)
    report.add(
        Figure(
            "persist writer alone (version guard + change rows)",
            writer.rows_per_s,
            "rows/s",
            limit=f"{upsert:,.0f} rows/s upsert",
            ratio=writer.rows_per_s / upsert,
            note=f"{writer.cpu_us_per_row:.1f} us of CPU per row in the writer's process",
        ),
        progress,
    )
    size = len(orjson.dumps(lifecycle(1 << 48 | 1, "bench-0000001", datetime.now(UTC))[0]))
    produce, consume = await raw_kafka(ctx.kafka, 50_000 if ctx.quick else 200_000, size)
    report.add(Figure(f"raw Kafka produce (aiokafka, acks=all, {size} B)", produce, "msgs/s"), progress)
    report.add(Figure(f"raw Kafka consume (aiokafka, {size} B)", consume, "msgs/s"), progress)


STAGE = Stage(
    "raw",
    "raw limits",
    "MariaDB batched upserts and persist's writer; Kafka produce and consume",
    "stack",
    raw_stage,
)
