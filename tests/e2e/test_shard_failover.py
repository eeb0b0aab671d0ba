"""kill -9 a cluster's primary under writes: the controller fails over, no acknowledged write is lost.

The cluster is the test's own (a global server, a primary and its semi-synchronous replica, on
free ports under a temporary directory); the shared stack is never touched. Writes are persist's
own (``write_shard`` through a ``ShardRouter``), retried as persist retries an unavailable shard.
The controller is ``flightlog shards watch``'s loop, run in this process.

The time until writes succeed again is printed, not asserted (the < 5 s target is a bench
figure, ``flightlog bench --stages failover``); what is asserted is that the failover happened
by itself, that writes succeed again, and that every acknowledged write is on the new primary.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.bench.failover import kill_primary_under_writes, private_deployment
from libs.db import connect
from libs.shards import load_shard_map

pytestmark = pytest.mark.e2e


async def test_a_killed_primary_fails_over_without_losing_an_acknowledged_write(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with private_deployment(Path(tmp_path_factory.mktemp("failover"))) as deployment:
        await deployment.schemas()
        old, new = deployment.primary.port, deployment.replica.port
        run = await kill_primary_under_writes(deployment, before_s=2.0, after_s=2.0)

        assert run.failover is not None, "the controller did not fail over"
        print(
            f"\nkill -9 to writes succeeding again: {run.writes_again_s:.2f} s"
            f" (detection {run.detected_after_s:.2f} s; {run.failover.summary()});"
            f" {len(run.acked)} writes acknowledged, {run.failed_writes} failed attempts retried"
        )
        assert run.failover.old_primary[1] == old and run.failover.new_primary[1] == new
        assert not run.failover.fenced  # it was dead: left out of the map instead
        assert run.acked and run.failed_writes > 0
        assert run.missing == [], f"{len(run.missing)} acknowledged writes lost: {run.missing[:10]}"

        s = deployment.settings
        async with connect(s, s.global_db_host, s.global_db_port) as conn:
            shard_map = await load_shard_map(conn, s.global_db_name)
            async with conn.cursor() as cur:
                await cur.execute(
                    f"SELECT old_primary_port, new_primary_port, fenced, shard_map_version"
                    f" FROM `{s.global_db_name}`.cluster_failovers"
                )
                assert list(await cur.fetchall()) == [(old, new, 0, shard_map.version)]
        (cluster,) = shard_map.clusters.values()
        assert cluster.primary[1] == new and cluster.replica_host is None
        assert deployment.replica.query("SELECT @@read_only") == [["0"]]
