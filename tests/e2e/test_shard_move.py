"""``flightlog shards move`` under writes, and ``shards create``, on private servers.

The servers are the test's own (a global server and two one-server clusters on free ports under
a temporary directory, :func:`cli.bench.shard_move.move_deployment`); the shared stack is never
touched. Writes are persist's own (``write_shard`` through a ``ShardRouter``), retried as persist
retries a parked record. The write pause is printed, not asserted (the <= 1 s target is a bench
figure, ``flightlog bench --stages shard-move``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.bench.deploy import PrivateDeployment
from cli.bench.shard_move import SHARD, move_deployment, move_under_writes, record
from libs.accounts import create_account, create_application
from libs.db import connect, shard_schema
from libs.ids import shard_of
from libs.shardops.capacity import create_shards, placements
from libs.shardops.move import cleanup_moved, moved_schema
from libs.shards import ShardRouter, load_shard_map
from services.persist.writer import write_shard

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateDeployment]:
    with move_deployment(Path(tmp_path_factory.mktemp("move"))) as deployment:
        yield deployment


async def test_a_shard_moves_under_writes_with_nothing_lost_duplicated_or_failed(
    deployment: PrivateDeployment,
) -> None:
    await deployment.schemas()
    c1, c2 = deployment.stack.mariadb
    run = await move_under_writes(deployment, writers=4, before_s=2.0, after_s=1.0, progress=print)
    move = run.move
    assert move is not None and move.verify is not None
    print(
        f"\nmove {run.move_s:.2f} s; {move.summary()}\nwrite pause of held writes:"
        f" {run.pause.text() if run.pause else 'none held'}; {run.writes} writes,"
        f" {run.retried_attempts} attempts retried ({run.errors}), {run.failed_writes} failed"
    )
    assert run.failed_writes == 0
    assert move.verify.ok, move.verify.lines()
    assert run.writes > 100 and run.retried_attempts > 0

    s = deployment.settings
    async with connect(s, s.global_db_host, s.global_db_port) as conn:
        shard_map = await load_shard_map(conn, s.global_db_name)
    assert shard_map.cluster_of(SHARD).name == "c2" and SHARD not in shard_map.readonly
    assert shard_map.version == move.shard_map_version

    schema = shard_schema(SHARD)
    async with connect(s, *shard_map.cluster_of(SHARD).primary) as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT id, account_id, message_key, version FROM `{schema}`.messages")
        rows = await cur.fetchall()
        stored = {(int(a), bytes(k).decode()): int(v) for _, a, k, v in rows}
        assert len(stored) == len(rows)  # one row per message
        assert all(shard_of(int(i)) == SHARD for i, *_ in rows)
        # every acknowledged version (or a later one) is on the target
        behind = {k: v for k, v in run.acked.items() if stored.get(k, 0) < v}
        assert not behind, f"{len(behind)} acknowledged writes missing: {list(behind.items())[:5]}"
        # each write was a new version of its message, so each has exactly one change row
        await cur.execute(
            f"SELECT COUNT(*), COUNT(DISTINCT object_id, version), MIN(id >> 48), MAX(id >> 48)"
            f" FROM `{schema}`.changes"
        )
        changes, distinct, lo, hi = await cur.fetchone()
        assert changes == distinct == run.writes
        assert lo == hi == SHARD

    # the old copy is fenced away on c1, nothing left in the live name there
    assert c1.query(f"SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{schema}'") == [
        ["0"]
    ]
    assert int(c1.query(f"SELECT COUNT(*) FROM {moved_schema(SHARD)}.messages")[0][0]) > 0

    # a new message after the move: on c2, its id with the shard's bits (counters carried over)
    async with ShardRouter(s) as router:
        await write_shard(router, SHARD, [record(run.accounts[0], "after-the-move", 1)])
    (new_id,) = c2.query(f"SELECT id FROM {schema}.messages WHERE message_key = 'after-the-move'")[0]
    assert shard_of(int(new_id)) == SHARD and int(new_id) > max(int(i) for i, *_ in rows)

    assert await cleanup_moved(s, SHARD) == [f"c1: {moved_schema(SHARD)}", f"c1: {schema}"]
    assert c1.query(f"SHOW DATABASES LIKE '{moved_schema(SHARD)}'") == []


async def test_create_adds_shards_that_take_writes_with_their_bits(deployment: PrivateDeployment) -> None:
    s = deployment.settings
    version, placed = await create_shards(s, 3)
    print(f"\ncreated: {placed} (map version {version})")
    assert sorted(placed) == [3, 4, 5]
    assert set(placed.values()) <= {"c1", "c2"}
    _, rows = await placements(s)
    assert [p.shard for p in rows] == [1, 2, 3, 4, 5]
    assert all(p.size_bytes is not None and p.size_bytes > 0 for p in rows)
    print("\n".join(p.line() for p in rows))
    async with ShardRouter(s) as router:
        app, _ = await create_application(router, "capacity")
        for shard in placed:
            account = await create_account(router, app.id, f"a{shard}@example.test", shard=shard)
            assert shard_of(account.id) == shard
            result = await write_shard(router, shard, [record(account.id, "first", 1)])
            assert result.changed == 1
            pool = await router.pool(shard)
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(f"SELECT id FROM {router.table(shard, 'messages')}")
                ((message_id,),) = await cur.fetchall()
                await conn.commit()
            assert shard_of(int(message_id)) == shard
