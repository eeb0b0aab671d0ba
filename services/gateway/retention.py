"""Retention: the change log's, and the messages' that applications ask for.

Trimming the change log: rows older than the retention go, and the shard's mark says how far.
The mark (``changes_retention.trimmed_through``) is raised in the transaction of the first delete,
so a delta reader sees the mark and the missing rows together and answers 410 instead of silently
skipping changes. Several gateways may trim at once: every step is idempotent.

Message retention: an application sets a period (``applications.message_retention_s``), an
account may override it (``accounts.message_retention_s`` on its shard), and one leader in the
deployment (:func:`libs.leader.lead_until_stopped`, role ``message-retention``) erases the messages
older than it (by ``occurred_at``), shard by shard. Each batch is one short transaction that
deletes at most ``batch_rows`` rows and writes a ``deleted`` change per message, as the delta feed
contract has deletions do (the change relay then makes them ``message.deleted`` webhooks), with
the row's version + 1; then the job pauses ``pause_s``. The batch size bounds how long it holds the
shard's change-order lock (persist's writes wait for it) and the pause bounds its share of the
shard's time, so foreground writes keep their rate; the rate of erasure is at most
``batch_rows / pause_s`` rows a second per gateway leader.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import asyncmy
from prometheus_client import Counter

from libs.changelog import lock_changes
from libs.config import DatabaseSettings
from libs.db import insert_guarded
from libs.ids import shard_of
from libs.leader import lead_until_stopped, sleep_unless_stopped
from libs.shards import ShardRouter
from libs.threads import update_threads

__all__ = [
    "MessageRetention",
    "account_retention",
    "application_retention",
    "expire_messages",
    "expire_messages_forever",
    "set_account_retention",
    "set_application_retention",
    "trim_changes",
    "trim_forever",
]

logger = logging.getLogger(__name__)

DELETE_BATCH = 5000


async def relay_position(router: ShardRouter, shard: int) -> int:
    """The last change id of ``shard`` the relay has published (0 before its first publish)."""
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT last_change_id FROM `{router.global_schema}`.relay_positions WHERE shard_id = %s",
            (shard,),
        )
        row = await cur.fetchone()
        await conn.commit()
    return int(row[0]) if row else 0


async def trim_changes(router: ShardRouter, shard: int, retention_s: float) -> int:
    """Delete the shard's changes older than ``retention_s``; returns the new mark."""
    changes = router.table(shard, "changes")
    mark = router.table(shard, "changes_retention")
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        try:
            # Ids grow with time: everything before the first young change is old.
            await cur.execute(
                f"SELECT id FROM {changes} WHERE created_at >= NOW(6) - INTERVAL %s MICROSECOND"
                " ORDER BY id LIMIT 1",
                (int(retention_s * 1e6),),
            )
            young = await cur.fetchone()
            if young is None:
                await cur.execute(
                    f"SELECT MAX(id) FROM {changes} WHERE created_at < NOW(6) - INTERVAL %s MICROSECOND",
                    (int(retention_s * 1e6),),
                )
                (through,) = await cur.fetchone()
                through = int(through or 0)
            else:
                through = int(young[0]) - 1
            # Never trim what the change relay has not published yet.
            through = min(through, await relay_position(router, shard))
            await cur.execute(
                f"UPDATE {mark} SET trimmed_through = %s, trimmed_at = UTC_TIMESTAMP(6)"
                " WHERE id = 1 AND trimmed_through < %s",
                (through, through),
            )
            while True:
                deleted = await cur.execute(
                    f"DELETE FROM {changes} WHERE id <= %s ORDER BY id LIMIT {DELETE_BATCH}", (through,)
                )
                await conn.commit()
                if deleted < DELETE_BATCH:
                    break
            await cur.execute(f"SELECT trimmed_through FROM {mark} WHERE id = 1")
            (current,) = await cur.fetchone()
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
    return int(current)


async def trim_forever(router: ShardRouter, retention_s: float, interval_s: float) -> None:
    while True:
        for shard in router.shard_map.shards:
            try:
                await trim_changes(router, shard, retention_s)
            except Exception:
                logger.exception(
                    "trimming the change log of shard %d failed; next try in %.0f s", shard, interval_s
                )
        await asyncio.sleep(interval_s)


EXPIRED_MESSAGES = Counter(
    "flightlog_retention_erased_messages_total", "Messages erased by the retention job, by shard", ["shard"]
)
RETENTION_ROLE = "message-retention"


@dataclass(frozen=True, slots=True)
class MessageRetention:
    """How the retention job runs: a pass over every shard each ``interval_s``; batches of at most
    ``batch_rows`` messages, each its own transaction, ``pause_s`` apart."""

    interval_s: float
    batch_rows: int
    pause_s: float


async def application_retention(router: ShardRouter, application_id: int) -> int | None:
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT message_retention_s FROM `{router.global_schema}`.applications WHERE id = %s",
            (application_id,),
        )
        row = await cur.fetchone()
        await conn.commit()
    return None if row is None or row[0] is None else int(row[0])


async def set_application_retention(
    router: ShardRouter, application_id: int, retention_s: int | None
) -> None:
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        try:
            await cur.execute(
                f"UPDATE `{router.global_schema}`.applications SET message_retention_s = %s WHERE id = %s",
                (retention_s, application_id),
            )
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise


async def account_retention(router: ShardRouter, account_id: int) -> int | None:
    """The account's own retention (None: it follows its application's)."""
    shard = shard_of(account_id)
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT message_retention_s FROM {router.table(shard, 'accounts')} WHERE id = %s", (account_id,)
        )
        row = await cur.fetchone()
        await conn.commit()
    return None if row is None or row[0] is None else int(row[0])


async def set_account_retention(router: ShardRouter, account_id: int, retention_s: int | None) -> None:
    shard = shard_of(account_id)
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        try:
            await cur.execute(
                f"UPDATE {router.table(shard, 'accounts')} SET message_retention_s = %s WHERE id = %s",
                (retention_s, account_id),
            )
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise


async def _applications_with_retention(router: ShardRouter) -> dict[int, int]:
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT id, message_retention_s FROM `{router.global_schema}`.applications"
            " WHERE message_retention_s IS NOT NULL"
        )
        rows = await cur.fetchall()
        await conn.commit()
    return {int(r[0]): int(r[1]) for r in rows}


async def _accounts_with_retention(router: ShardRouter, shard: int, apps: dict[int, int]) -> dict[int, int]:
    """Each of the shard's accounts that has a retention, with it (its own over its application's)."""
    where = "message_retention_s IS NOT NULL"
    if apps:
        where += f" OR application_id IN ({', '.join(['%s'] * len(apps))})"
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT id, application_id, message_retention_s FROM {router.table(shard, 'accounts')}"
            f" WHERE {where}",
            list(apps),
        )
        rows = await cur.fetchall()
        await conn.commit()
    return {int(r[0]): int(r[2]) if r[2] is not None else apps[int(r[1])] for r in rows}


async def _expire_batch(
    router: ShardRouter, shard: int, account_id: int, retention_s: int, limit: int
) -> int:
    """Erase up to ``limit`` of the account's messages older than ``retention_s``, with their
    ``deleted`` changes and their threads recomputed (a thread changes, or goes, with them), in
    one transaction; returns how many."""
    messages = router.table(shard, "messages")
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        try:
            await cur.execute(
                f"SELECT id, version, thread_key FROM {messages} WHERE account_id = %s"
                " AND occurred_at < UTC_TIMESTAMP(6) - INTERVAL %s SECOND"
                f" ORDER BY occurred_at, id LIMIT {int(limit)} FOR UPDATE",
                (account_id, retention_s),
            )
            found = list(await cur.fetchall())
            rows = [(int(r[0]), int(r[1])) for r in found]
            if rows:
                await cur.execute(
                    f"DELETE FROM {messages} WHERE id IN ({', '.join(['%s'] * len(rows))})",
                    [i for i, _ in rows],
                )
                # Under the changes lock, as persist recomputes threads (libs.threads).
                await lock_changes(cur, router, shard)
                keys = sorted({(account_id, str(r[2])) for r in found if r[2] is not None})
                changes = [(account_id, "message", i, "deleted", version + 1) for i, version in rows]
                changes += await update_threads(cur, shard, router.table(shard, "threads"), messages, keys)
                await insert_guarded(
                    cur,
                    shard,
                    f"INSERT INTO {router.table(shard, 'changes')}"
                    " (account_id, object_type, object_id, change_type, version) VALUES "
                    + ", ".join(["(%s, %s, %s, %s, %s)"] * len(changes)),
                    [v for change in changes for v in change],
                    rows=len(changes),
                )
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
    return len(rows)


async def expire_messages(
    router: ShardRouter, shard: int, settings: MessageRetention, stopping: asyncio.Event | None = None
) -> int:
    """One pass of the retention job over one shard; returns the messages erased."""
    accounts = await _accounts_with_retention(router, shard, await _applications_with_retention(router))
    erased = 0
    for account_id, retention_s in sorted(accounts.items()):
        while stopping is None or not stopping.is_set():
            n = await _expire_batch(router, shard, account_id, retention_s, settings.batch_rows)
            if n:
                erased += n
                EXPIRED_MESSAGES.labels(str(shard)).inc(n)
                await asyncio.sleep(settings.pause_s)
            if n < settings.batch_rows:
                break
    return erased


async def expire_messages_forever(
    db: DatabaseSettings, router: ShardRouter, settings: MessageRetention, stopping: asyncio.Event
) -> None:
    """Run the retention job while this process leads its role (one in the deployment)."""

    async def lead(conn: asyncmy.Connection) -> None:
        while not stopping.is_set():
            for shard in router.shard_map.shards:
                if shard in router.shard_map.readonly or stopping.is_set():
                    continue  # a moving shard takes no writes; the next pass gets it
                try:
                    erased = await expire_messages(router, shard, settings, stopping)
                    if erased:
                        logger.info("retention erased %d messages of shard %d", erased, shard)
                except Exception:
                    logger.exception("message retention of shard %d failed; next pass in %.0f s",
                                     shard, settings.interval_s)  # fmt: skip
            async with conn.cursor() as cur:  # the lock's connection is still ours
                await cur.execute("SELECT 1")
                await cur.fetchall()
            await sleep_unless_stopped(stopping, settings.interval_s)

    await lead_until_stopped(
        db,
        RETENTION_ROLE,
        stopping,
        lead,
        standby_poll_s=settings.interval_s,
        error_backoff_s=settings.interval_s,
    )
