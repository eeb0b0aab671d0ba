"""Fail a cluster over to its replica, and publish the new primary as a shard map version.

The order is what makes it safe:

1. **Fence** the old primary: ``read_only`` if it can be reached within
   ``failover_fence_timeout_s`` (the services' user cannot write to it any more; their writes
   fail with 1290 and persist parks and retries them), and read everything it committed. A dead
   primary cannot be fenced, and need not be: it takes no writes. Either way it leaves the map.
2. **Catch up**: wait until the replica has applied everything it has: the fenced primary's
   whole GTID position, or for a dead one what the replica received (``Gtid_IO_Pos``). With
   semi-synchronous replication every acknowledged commit was received, so none is lost.
3. **Promote**: ``STOP SLAVE``, ``RESET SLAVE ALL``, ``read_only = OFF``.
4. **Publish**: in one transaction of the global schema, the replica becomes the cluster's
   primary (the cluster has no replica until one is rebuilt), the map's version goes up and the
   failover is recorded in ``cluster_failovers``. The update is conditional on the map still
   naming the old primary, so two controllers racing cannot publish twice.

Every service's router polls the version (fast while its writes fail, see
:meth:`libs.shards.ShardRouter.request_reload`) and sends writes to the new primary.

The global schema is the one thing this cannot move: it holds the map itself, and services find
it by a configured address. A cluster whose primary holds it is refused (see the README).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from libs.db import connect
from libs.shardops import FailoverError, ShardOpsSettings
from libs.shardops.replication import fence, promote, replica_status, wait_for_gtid
from libs.shards import Cluster, load_shard_map

__all__ = ["FailoverResult", "failover"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FailoverResult:
    cluster: str
    old_primary: tuple[str, int]
    new_primary: tuple[str, int]
    fenced: bool  # the old primary was reached and set read_only (False: it was dead)
    gtid_position: str  # where the new primary starts from
    shard_map_version: int
    timings_s: dict[str, float] = field(default_factory=dict)  # fence, catch_up, promote, publish, total

    def summary(self) -> str:
        steps = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.timings_s.items())
        how = "fenced (read_only)" if self.fenced else "unreachable, left out of the map"
        return (
            f"cluster {self.cluster}: {self.new_primary[0]}:{self.new_primary[1]} is the primary"
            f" (shard map version {self.shard_map_version}); old primary"
            f" {self.old_primary[0]}:{self.old_primary[1]} {how}; GTID {self.gtid_position}; {steps}"
        )


async def _cluster(settings: ShardOpsSettings, name: str) -> Cluster:
    async with connect(settings, settings.global_db_host, settings.global_db_port) as conn:
        shard_map = await load_shard_map(conn, settings.global_db_name)
    for cluster in shard_map.clusters.values():
        if cluster.name == name:
            return cluster
    raise FailoverError(f"no cluster {name!r} in the shard map (version {shard_map.version})")


async def _fence(settings: ShardOpsSettings, cluster: Cluster) -> str | None:
    """The old primary's GTID position once fenced, or None when it could not be reached."""
    admin = settings.admin(connect_timeout_s=settings.failover_fence_timeout_s)
    try:
        async with asyncio.timeout(settings.failover_fence_timeout_s * 2):
            async with connect(admin, *cluster.primary) as conn:
                return await fence(conn)
    except (OSError, TimeoutError, Exception) as exc:  # any failure to reach it: it is gone
        logger.warning(
            "cluster %s: old primary %s:%d not fenced (%s: %s); leaving it out of the map",
            cluster.name,
            *cluster.primary,
            type(exc).__name__,
            exc,
        )
        return None


async def failover(
    settings: ShardOpsSettings, cluster_name: str, *, reason: str = "manual"
) -> FailoverResult:
    """Promote ``cluster_name``'s replica and publish it; see the module docstring."""
    started = time.monotonic()
    started_at = datetime.now(UTC).replace(tzinfo=None)
    timings: dict[str, float] = {}
    cluster = await _cluster(settings, cluster_name)
    if cluster.replica_host is None or cluster.replica_port is None:
        raise FailoverError(f"cluster {cluster_name} has no replica to promote")
    if (settings.global_db_host, settings.global_db_port) == cluster.primary:
        raise FailoverError(
            f"cluster {cluster_name}'s primary holds the global schema {settings.global_db_name},"
            " which services find by its configured address: it cannot fail over with the shards"
        )
    old, new = cluster.primary, cluster.replica

    position = await _fence(settings, cluster)
    timings["fence"] = time.monotonic() - started

    mark = time.monotonic()
    admin = settings.admin()
    async with connect(admin, *new) as conn:
        status = await replica_status(conn)
        if status.configured:
            # dead primary: what the replica received is all there is (semi-sync: every
            # acknowledged commit among it)
            target = position if position is not None else status.io_pos
            if not await wait_for_gtid(conn, target, settings.failover_catch_up_timeout_s):
                raise FailoverError(
                    f"cluster {cluster_name}: replica {new[0]}:{new[1]} did not apply {target} within"
                    f" {settings.failover_catch_up_timeout_s:.1f} s ({status.last_error or 'no error'})"
                )
        else:
            logger.warning("cluster %s: %s:%d follows nobody: promoted before?", cluster_name, *new)
        timings["catch_up"] = time.monotonic() - mark
        mark = time.monotonic()
        gtid = await promote(conn)
        timings["promote"] = time.monotonic() - mark

    mark = time.monotonic()
    version = await _publish(settings, cluster, position is not None, gtid, reason, started_at)
    timings["publish"] = time.monotonic() - mark
    timings["total"] = time.monotonic() - started
    result = FailoverResult(cluster_name, old, new, position is not None, gtid, version, timings)
    logger.warning("failover (%s): %s", reason, result.summary())
    return result


async def _publish(
    settings: ShardOpsSettings, cluster: Cluster, fenced: bool, gtid: str, reason: str, started_at: datetime
) -> int:
    schema = settings.global_db_name
    async with connect(settings, settings.global_db_host, settings.global_db_port) as conn:
        async with conn.cursor() as cur:
            await cur.execute(f"SELECT version FROM `{schema}`.shard_map_version WHERE id = 1 FOR UPDATE")
            (version,) = await cur.fetchone()
            changed = await cur.execute(
                f"UPDATE `{schema}`.clusters SET primary_host = %s, primary_port = %s,"
                " replica_host = NULL, replica_port = NULL"
                " WHERE cluster_id = %s AND primary_host = %s AND primary_port = %s",
                (*cluster.replica, cluster.cluster_id, *cluster.primary),
            )
            if changed != 1:
                await conn.rollback()
                raise FailoverError(f"cluster {cluster.name}'s primary changed in the map meanwhile")
            version = int(version) + 1
            await cur.execute(
                f"UPDATE `{schema}`.shard_map_version SET version = %s WHERE id = 1", (version,)
            )
            await cur.execute(
                f"INSERT INTO `{schema}`.cluster_failovers (cluster_id, old_primary_host,"
                " old_primary_port, new_primary_host, new_primary_port, fenced, gtid_position,"
                " reason, shard_map_version, started_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    cluster.cluster_id,
                    *cluster.primary,
                    *cluster.replica,
                    fenced,
                    gtid,
                    reason[:1000],
                    version,
                    started_at,
                ),
            )
        await conn.commit()
    return version
