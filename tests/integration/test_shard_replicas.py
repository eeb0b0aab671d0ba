"""A cluster's replica: real GTID replication, replica reads, and ``shards verify`` finding a difference.

The servers are the test's own (a global server and a primary with its replica, on free ports,
under a temporary directory), built by the same :class:`cli.stack.Stack` code as ``flightlog
stack up``; the shared stack's servers are never touched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cli.bench.deploy import PrivateDeployment
from cli.bench.failover import private_deployment, record
from libs.db import connect
from libs.shardops.replication import replica_status, semi_sync_active
from libs.shardops.verify import RowDiff, verify_replica
from libs.shards import ShardRouter
from services.persist.writer import write_shard

pytestmark = pytest.mark.integration

SHARD = 1
ACCOUNT = (SHARD << 48) | 7


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateDeployment]:
    with private_deployment(Path(tmp_path_factory.mktemp("replicas"))) as deployment:
        yield deployment


@pytest.fixture(scope="module")
async def replica_router(deployment: PrivateDeployment) -> AsyncIterator[ShardRouter]:
    await deployment.schemas()
    async with ShardRouter(deployment.settings) as router:
        yield router


async def _visible_on_replica(router: ShardRouter, key: str, timeout_s: float = 10.0) -> float:
    """Seconds until the message ``key`` can be read on the replica."""
    start = time.monotonic()
    pool = await router.pool(SHARD, replica=True)
    while time.monotonic() - start < timeout_s:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT 1 FROM {router.table(SHARD, 'messages')} WHERE account_id = %s AND message_key = %s",
                (ACCOUNT, key.encode()),
            )
            found = await cur.fetchone()
            await conn.commit()
        if found:
            return time.monotonic() - start
        await asyncio.sleep(0.005)
    raise AssertionError(f"{key} not on the replica after {timeout_s} s")


async def test_stack_runs_a_replica_that_follows_its_primary(
    deployment: PrivateDeployment, replica_router: ShardRouter
) -> None:
    cluster = replica_router.shard_map.cluster_of(SHARD)
    assert cluster.primary == ("127.0.0.1", deployment.primary.port)
    assert cluster.replica == ("127.0.0.1", deployment.replica.port)
    assert deployment.replica.query("SELECT @@read_only, @@gtid_strict_mode") == [["1", "1"]]
    admin = deployment.settings.admin()
    async with connect(admin, *cluster.replica) as conn:
        status = await replica_status(conn)
    assert status.replicating, status
    async with connect(admin, *cluster.primary) as conn:
        assert await semi_sync_active(conn)

    lags = []
    for n in range(20):
        key = f"replicated-{n}"
        await write_shard(replica_router, SHARD, [record(ACCOUNT, key)])
        lags.append(await _visible_on_replica(replica_router, key))
    lags.sort()
    print(f"\nreplica visibility after commit: p50 {lags[10] * 1000:.1f} ms, max {lags[-1] * 1000:.1f} ms")


async def test_replica_reads_fall_back_to_the_primary(
    deployment: PrivateDeployment, replica_router: ShardRouter
) -> None:
    cluster = replica_router.shard_map.cluster_of(SHARD)
    replica_pool = await replica_router.pool(SHARD, replica=True)
    primary_pool = await replica_router.pool(SHARD)
    assert replica_pool is not primary_pool
    replica_router.mark_replica_down(SHARD)
    assert await replica_router.pool(SHARD, replica=True) is primary_pool
    assert cluster.replica != cluster.primary


async def test_verify_finds_nothing_then_an_altered_replica_row(
    deployment: PrivateDeployment, replica_router: ShardRouter
) -> None:
    await write_shard(replica_router, SHARD, [record(ACCOUNT, f"verify-{n}") for n in range(2500)])
    report = await verify_replica(deployment.settings, SHARD, chunk_rows=500)
    assert report.ok, report.lines()
    messages = next(t for t in report.tables if t.table == "messages")
    assert messages.rows >= 2500 and messages.chunks >= 5

    schema = f"flightlog_shard_{SHARD:04d}"
    (altered,) = deployment.replica.query(
        f"SELECT id FROM {schema}.messages ORDER BY id LIMIT 1 OFFSET 1234"
    )[0]
    (dropped,) = deployment.replica.query(f"SELECT id FROM {schema}.messages ORDER BY id LIMIT 1 OFFSET 77")[
        0
    ]
    # behind replication's back, and out of the replica's binlog
    deployment.replica.query(
        "SET SESSION sql_log_bin = 0;"
        f" UPDATE {schema}.messages SET subject = 'tampered' WHERE id = {altered};"
        f" DELETE FROM {schema}.messages WHERE id = {dropped}"
    )
    report = await verify_replica(deployment.settings, SHARD, chunk_rows=500)
    print("\n" + "\n".join(report.lines()))
    assert sorted(report.diffs, key=lambda d: d.kind) == [
        RowDiff("messages", (int(altered),), "different"),
        RowDiff("messages", (int(dropped),), "missing"),
    ]
    assert next(t for t in report.tables if t.table == "messages").mismatched_chunks == 2

    sampled = await verify_replica(deployment.settings, SHARD, sample=100_000)  # every row, by sampling
    assert {d.key for d in sampled.diffs} == {(int(altered),), (int(dropped),)}
