"""Trimming the change log: rows older than the retention go, and the shard's mark says how far.

The mark (``changes_retention.trimmed_through``) is raised in the transaction of the first delete,
so a delta reader sees the mark and the missing rows together and answers 410 instead of silently
skipping changes. Several gateways may trim at once: every step is idempotent.
"""

from __future__ import annotations

import asyncio
import logging

from libs.shards import ShardRouter

__all__ = ["trim_changes", "trim_forever"]

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
