"""MariaDB on each cluster: schemas, shard-bit ids that survive a restart, and the #199 guard."""

from __future__ import annotations

import asyncio

import pytest

from cli.stack import Stack
from libs.config import DatabaseSettings
from libs.db import connect, insert_guarded, shard_schema
from libs.db.migrate import ensure_auto_increment, migrate_shard
from libs.ids import ShardBitsMismatch, auto_increment_start, shard_of
from libs.shards import ShardMap, ShardRouter

pytestmark = pytest.mark.integration

INSERT_ACCOUNT = "INSERT INTO {table} (application_id, email) VALUES (%s, %s)"


async def _insert_account(router: ShardRouter, shard: int, email: str) -> int:
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        try:
            id_ = await insert_guarded(
                cur, shard, INSERT_ACCOUNT.format(table=router.table(shard, "accounts")), (1, email)
            )
        except BaseException:
            await conn.rollback()
            raise
        await conn.commit()
        return id_


def _one_shard_per_cluster(shard_map: ShardMap) -> dict[int, int]:
    chosen: dict[int, int] = {}
    for shard in shard_map.shards:
        chosen.setdefault(shard_map.shard_cluster[shard], shard)
    return chosen


async def test_every_cluster_holds_its_shards(router: ShardRouter, stack: Stack) -> None:
    m = router.shard_map
    assert len(m.shards) == stack.settings.shard_count
    assert {c.primary_port for c in m.clusters.values()} == set(stack.settings.mariadb_ports)
    for shard in m.shards:
        pool = await router.pool(shard)
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT TABLE_NAME, AUTO_INCREMENT FROM information_schema.TABLES"
                " WHERE TABLE_SCHEMA = %s AND AUTO_INCREMENT IS NOT NULL",
                (shard_schema(shard),),
            )
            counters = dict(await cur.fetchall())
            await conn.commit()
        assert set(counters) >= {"accounts", "messages", "changes"}
        assert all(shard_of(int(v)) == shard for v in counters.values()), counters


async def test_ids_carry_shard_bits_across_a_restart(
    router: ShardRouter, stack: Stack, db_settings: DatabaseSettings
) -> None:
    per_cluster = _one_shard_per_cluster(router.shard_map)
    assert len(per_cluster) == len(stack.mariadb) >= 2
    before = {}
    for shard in per_cluster.values():
        id_ = await _insert_account(router, shard, f"before-restart@{shard}.test")
        assert shard_of(id_) == shard
        before[shard] = id_

    # Restart every MariaDB server; the router's pooled connections die with them.
    await router.stop()
    for server in stack.mariadb:
        await asyncio.to_thread(server.down)
        await asyncio.to_thread(server.up)
    await router.start()

    for shard, old in before.items():
        id_ = await _insert_account(router, shard, f"after-restart@{shard}.test")
        assert shard_of(id_) == shard
        assert id_ > old


async def test_guard_refuses_a_counter_without_shard_bits(
    router: ShardRouter, db_settings: DatabaseSettings
) -> None:
    # A scratch shard outside the map, its counter forced back to 1 as bug #199 would leave it.
    shard = 4242
    cluster = next(iter(router.shard_map.clusters.values()))
    async with connect(db_settings, *cluster.primary) as conn:
        await migrate_shard(conn, shard)
        table = f"`{shard_schema(shard)}`.`accounts`"
        async with conn.cursor() as cur:
            await cur.execute(f"DELETE FROM {table}")
            await conn.commit()
            await cur.execute(f"ALTER TABLE {table} AUTO_INCREMENT = 1")
            with pytest.raises(ShardBitsMismatch, match=f"expected shard {shard}"):
                await insert_guarded(cur, shard, INSERT_ACCOUNT.format(table=table), (1, "x@y.test"))
            await conn.rollback()
            await cur.execute(f"SELECT COUNT(*) FROM {table}")
            assert await cur.fetchone() == (0,)  # nothing with a wrong id was committed

        assert await ensure_auto_increment(conn, shard) == ["accounts"]
        async with conn.cursor() as cur:
            id_ = await insert_guarded(cur, shard, INSERT_ACCOUNT.format(table=table), (1, "x@y.test"))
            await conn.rollback()
        assert id_ == auto_increment_start(shard)
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE `{shard_schema(shard)}`")


async def test_migrations_are_idempotent(router: ShardRouter, db_settings: DatabaseSettings) -> None:
    shard = router.shard_map.shards[0]
    async with connect(db_settings, *router.shard_map.cluster_of(shard).primary) as conn:
        assert await migrate_shard(conn, shard) == []


async def test_router_reloads_a_new_map_version(router: ShardRouter, db_settings: DatabaseSettings) -> None:
    version = router.shard_map.version
    assert await router.reload() is False
    table = f"`{db_settings.global_db_name}`.shard_map_version"
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"UPDATE {table} SET version = version + 1 WHERE id = 1")
        await conn.commit()
    try:
        assert await router.reload() is True
        assert router.shard_map.version == version + 1
    finally:
        # Put the version back unless someone moved it meanwhile: every router on the stack
        # (`make dev`'s services among them) reloads once more, and the map stays as it was.
        async with router.global_pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"UPDATE {table} SET version = %s WHERE id = 1 AND version = %s", (version, version + 1)
            )
            await conn.commit()
