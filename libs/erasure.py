"""Erasing an account and everything it has (``DELETE /v1/accounts/{id}``).

An erasure is a job with a state, not one request: its row in the global ``account_erasures``
table is written first and marked ``done`` last, and every step between is idempotent, so a
crash halfway is finished by the next call (:func:`erase_account` again). The steps, in order:

1. the job's row (``running``), with the application, so the account is still found for its owner
   once its own row is gone, and later calls resume the job or answer with its report;
2. announcements: the account id on ``flightlog.erasures`` (transform tombstones the account's
   message states in its changelog and drops its records still in flight) and a tombstone on
   ``flightlog.imap-accounts`` (ingest stops syncing the mailbox);
3. the account's id in its shard's ``erased_accounts``, then the account's row, first of the
   shard's rows: persist share-locks the rows of the accounts it writes and drops the records of
   an account in ``erased_accounts``, so the delete waits for a write in progress (whose rows step
   4 then erases) and a record in flight later cannot bring the account back;
4. every other row of the shard's tables with an ``account_id`` column, and every row of the
   global schema's (``webhook_attempts`` through their deliveries first), in batches of
   :data:`ERASE_BATCH_ROWS`. The tables are read from ``information_schema``, so a table added
   later is erased without a change here;
5. the counts and ``done``.

What erasure cannot reach, records in the append-only topics until their retention passes, is
listed in every report with the time by which those records are gone (docs/privacy.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter

from libs.db import leader_lock_name, shard_schema
from libs.ids import shard_of
from libs.imap_accounts import ImapAccountsSettings, publish_account
from libs.kafka import ERASURES, RETENTION_MS
from libs.leader import take_lock
from libs.shards import ShardRouter

__all__ = [
    "ERASE_BATCH_ROWS",
    "Erasure",
    "account_tables",
    "announce_erasure",
    "erase_account",
    "erasure_lock_name",
    "erasure_of",
    "global_account_tables",
]

logger = logging.getLogger(__name__)

# Rows deleted per statement (and per transaction): short locks beside the foreground writes.
ERASE_BATCH_ROWS: Final = 1000
# The job's own table (global) and the shard's record of erased accounts: the account's id stays
# there with times and counts (nothing the account held), so the job resumes and persist refuses.
ERASURES_TABLE: Final = "account_erasures"
ERASED_TABLE: Final = "erased_accounts"

ERASED_ROWS = Counter("flightlog_erasure_rows_total", "Rows deleted by account erasures, by table", ["table"])
ERASURES_DONE = Counter("flightlog_erasures_total", "Account erasures finished")


@dataclass(slots=True)
class Erasure:
    """An erasure job as stored: ``erased`` counts rows per table (``shard.<table>`` or
    ``global.<table>``)."""

    account_id: int
    application_id: int
    state: str
    erased: dict[str, int] = field(default_factory=dict)
    requested_at: datetime = field(default_factory=lambda: datetime.now(UTC).replace(tzinfo=None))
    finished_at: datetime | None = None

    def report(self) -> dict[str, Any]:
        """The public answer: counts per kind, and the topics that still hold records until when."""
        return {
            "account_id": str(self.account_id),
            "state": self.state,
            "erased": dict(sorted(self.erased.items())),
            "requested_at": _iso(self.requested_at),
            "finished_at": None if self.finished_at is None else _iso(self.finished_at),
            "topics": [
                {
                    "topic": topic,
                    "retention_s": retention_ms // 1000,
                    "records_expire_by": _iso(self.requested_at + timedelta(milliseconds=retention_ms)),
                }
                for topic, retention_ms in sorted(RETENTION_MS.items())
            ],
        }


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="microseconds") + "Z"


async def erasure_of(router: ShardRouter, account_id: int) -> Erasure | None:
    """The erasure job of ``account_id``, if one was ever started."""
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT account_id, application_id, state, erased, requested_at, finished_at"
            f" FROM `{router.global_schema}`.{ERASURES_TABLE} WHERE account_id = %s",
            (account_id,),
        )
        row = await cur.fetchone()
        await conn.commit()
    if row is None:
        return None
    return Erasure(int(row[0]), int(row[1]), row[2], orjson.loads(row[3] or "{}"), row[4], row[5])


async def account_tables(router: ShardRouter, shard: int) -> list[str]:
    """The shard's tables with an ``account_id`` column (the account's rows), by name, its record
    of erased accounts left out."""
    found = await _tables_with_account(router, await router.pool(shard), shard_schema(shard))
    return [t for t in found if t != ERASED_TABLE]


async def global_account_tables(router: ShardRouter) -> list[str]:
    """The global schema's tables with an ``account_id`` column, the job's own table left out."""
    found = await _tables_with_account(router, router.global_pool, router.global_schema)
    return [t for t in found if t != ERASURES_TABLE]


async def _tables_with_account(router: ShardRouter, pool: Any, schema: str) -> list[str]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT TABLE_NAME FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = %s AND COLUMN_NAME = 'account_id' ORDER BY TABLE_NAME",
            (schema,),
        )
        rows = await cur.fetchall()
        await conn.commit()
    return [str(r[0]) for r in rows]


def erasure_lock_name(router: ShardRouter, account_id: int) -> str:
    """The named lock held while a call runs the account's erasure."""
    return leader_lock_name(f"erasure-{account_id}", router.global_schema)


async def announce_erasure(producer: AIOKafkaProducer, account_id: int, topic: str = ERASURES) -> None:
    """Tell transform (``flightlog.erasures``) that the account is erased."""
    value = orjson.dumps(
        {"account_id": str(account_id), "erased_at": _iso(datetime.now(UTC).replace(tzinfo=None))}
    )
    await producer.send_and_wait(topic, value, key=str(account_id).encode())


async def _delete_batches(pool: Any, sql: str, args: tuple[Any, ...]) -> int:
    """Run a ``DELETE ... LIMIT`` until it deletes less than a batch; returns the rows deleted."""
    total = 0
    async with pool.acquire() as conn, conn.cursor() as cur:
        try:
            while True:
                deleted = int(await cur.execute(f"{sql} LIMIT {ERASE_BATCH_ROWS}", args))
                await conn.commit()
                total += deleted
                if deleted < ERASE_BATCH_ROWS:
                    return total
        except BaseException:
            await conn.rollback()
            raise


async def _save_counts(router: ShardRouter, job: Erasure, *, done: bool = False) -> None:
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        try:
            await cur.execute(
                f"UPDATE `{router.global_schema}`.{ERASURES_TABLE} SET erased = %s,"
                " state = IF(%s, 'done', state), finished_at = IF(%s, UTC_TIMESTAMP(6), finished_at)"
                " WHERE account_id = %s",
                (orjson.dumps(job.erased).decode(), done, done, job.account_id),
            )
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise


async def _count(router: ShardRouter, job: Erasure, table: str, deleted: int) -> None:
    if deleted:
        job.erased[table] = job.erased.get(table, 0) + deleted
        ERASED_ROWS.labels(table).inc(deleted)
        await _save_counts(router, job)


async def _erase_deliveries(router: ShardRouter, job: Erasure) -> None:
    """The account's webhook deliveries with their attempts (which name the delivery, not the
    account), a batch of deliveries per transaction."""
    g = router.global_schema
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        try:
            while True:
                await cur.execute(
                    f"SELECT id FROM `{g}`.webhook_deliveries WHERE account_id = %s ORDER BY id"
                    f" LIMIT {ERASE_BATCH_ROWS}",
                    (job.account_id,),
                )
                ids = [int(r[0]) for r in await cur.fetchall()]
                if not ids:
                    await conn.commit()
                    return
                marks = ", ".join(["%s"] * len(ids))
                attempts = await cur.execute(
                    f"DELETE FROM `{g}`.webhook_attempts WHERE delivery_id IN ({marks})", ids
                )
                deliveries = await cur.execute(
                    f"DELETE FROM `{g}`.webhook_deliveries WHERE id IN ({marks})", ids
                )
                await conn.commit()
                await _count(router, job, "global.webhook_attempts", int(attempts))
                await _count(router, job, "global.webhook_deliveries", int(deliveries))
        except BaseException:
            await conn.rollback()
            raise


async def erase_account(
    router: ShardRouter,
    producer: AIOKafkaProducer,
    imap: ImapAccountsSettings,
    account_id: int,
    application_id: int,
    *,
    erasures_topic: str = ERASURES,
) -> Erasure:
    """Start or finish the erasure of ``account_id`` (see the module docstring); returns the job,
    done, or ``running`` when another call is running it now (a named lock per account). Safe to
    call again at any point, also after it finished (it only answers then)."""
    g = router.global_schema
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        try:
            await cur.execute(
                f"INSERT INTO `{g}`.{ERASURES_TABLE} (account_id, application_id, erased)"
                " VALUES (%s, %s, '{}') ON DUPLICATE KEY UPDATE account_id = account_id",
                (account_id, application_id),
            )
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
    # One runner per account: a client that retries while the job still runs gets its state.
    lock = erasure_lock_name(router, account_id)
    async with router.global_pool.acquire() as lock_conn:
        try:
            if not await take_lock(lock_conn, lock):
                running = await erasure_of(router, account_id)
                assert running is not None
                return running
            return await _run(router, producer, imap, account_id, erasures_topic)
        finally:
            # The lock dies with its session; a pooled connection outlives the job, so release it.
            async with lock_conn.cursor() as cur:
                await cur.execute("SELECT RELEASE_LOCK(%s)", (lock,))
                await cur.fetchall()
            await lock_conn.commit()


async def _run(
    router: ShardRouter,
    producer: AIOKafkaProducer,
    imap: ImapAccountsSettings,
    account_id: int,
    erasures_topic: str,
) -> Erasure:
    g = router.global_schema
    job = await erasure_of(router, account_id)
    assert job is not None
    if job.state == "done":
        return job
    await announce_erasure(producer, account_id, erasures_topic)
    await publish_account(producer, imap, account_id, None)

    shard = shard_of(account_id)
    pool = await router.pool(shard)
    accounts = router.table(shard, "accounts")
    async with pool.acquire() as conn, conn.cursor() as cur:
        try:
            await cur.execute(
                f"INSERT INTO {router.table(shard, ERASED_TABLE)} (account_id) VALUES (%s)"
                " ON DUPLICATE KEY UPDATE account_id = account_id",
                (account_id,),
            )
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
    await _count(
        router,
        job,
        "shard.accounts",
        await _delete_batches(pool, f"DELETE FROM {accounts} WHERE id = %s", (account_id,)),
    )
    for table in await account_tables(router, shard):
        deleted = await _delete_batches(
            pool, f"DELETE FROM {router.table(shard, table)} WHERE account_id = %s", (account_id,)
        )
        await _count(router, job, f"shard.{table}", deleted)

    gpool = router.global_pool
    await _erase_deliveries(router, job)
    for table in await global_account_tables(router):
        deleted = await _delete_batches(
            gpool, f"DELETE FROM `{g}`.{table} WHERE account_id = %s", (account_id,)
        )
        await _count(router, job, f"global.{table}", deleted)
    await _save_counts(router, job, done=True)
    ERASURES_DONE.inc()
    logger.info("account %d erased: %s", account_id, job.erased)
    done = await erasure_of(router, account_id)
    assert done is not None
    return done
