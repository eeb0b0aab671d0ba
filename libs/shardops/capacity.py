"""Capacity: add logical shards, and what each shard weighs (``flightlog shards create|list``).

New shards go to the least-loaded cluster by measured size (the sum of its shard schemas' data
and index bytes on its primary). Several new shards are placed one after the other, each counted
at the clusters' average shard size, so ``create 4`` spreads over equal clusters instead of
piling onto one. A shard is migrated on its cluster (counters with the shard's bits) before it
enters the map: no router can route to a schema that is not there.
"""

from __future__ import annotations

from dataclasses import dataclass

from libs.db import connect
from libs.db.migrate import migrate_shard
from libs.ids import MAX_SHARD
from libs.shardops import ShardOpsError, ShardOpsSettings
from libs.shardops.replication import replica_status
from libs.shards import ShardMap, load_shard_map, schema_sizes

__all__ = ["ShardPlacement", "create_shards", "placements"]


@dataclass(frozen=True, slots=True)
class ShardPlacement:
    shard: int
    cluster: str
    primary: tuple[str, int]
    replica: tuple[str, int] | None
    size_bytes: int | None  # None: the primary did not answer
    rows: int | None  # InnoDB's estimate
    replica_lag_s: float | None  # None: no replica, or not replicating
    readonly: bool

    def line(self) -> str:
        size = "?" if self.size_bytes is None else f"{self.size_bytes / 1048576:.1f} MiB"
        rows = "?" if self.rows is None else f"~{self.rows} rows"
        if self.replica is None:
            replica = "no replica"
        else:
            lag = "not replicating" if self.replica_lag_s is None else f"lag {self.replica_lag_s:.0f} s"
            replica = f"replica {self.replica[0]}:{self.replica[1]} {lag}"
        ro = "  (read-only: moving)" if self.readonly else ""
        return (
            f"shard {self.shard:>5}  cluster {self.cluster}  {self.primary[0]}:{self.primary[1]}"
            f"  {size} {rows}  {replica}{ro}"
        )


async def _map(settings: ShardOpsSettings) -> ShardMap:
    async with connect(settings, settings.global_db_host, settings.global_db_port) as conn:
        return await load_shard_map(conn, settings.global_db_name)


async def _cluster_sizes(
    settings: ShardOpsSettings, shard_map: ShardMap
) -> dict[int, dict[int, tuple[int, int]]]:
    """cluster id -> {shard: (bytes, rows)} of the shards the map places there."""
    out: dict[int, dict[int, tuple[int, int]]] = {}
    for cluster in shard_map.clusters.values():
        try:
            async with connect(settings, *cluster.primary) as conn:
                measured = await schema_sizes(conn)
        except Exception:  # a primary down: the others are still worth listing
            continue
        out[cluster.cluster_id] = {
            s: measured.get(s, (0, 0)) for s, c in shard_map.shard_cluster.items() if c == cluster.cluster_id
        }
    return out


async def placements(settings: ShardOpsSettings) -> tuple[int, list[ShardPlacement]]:
    """The map's version and every shard's placement, size and replica lag."""
    shard_map = await _map(settings)
    sizes = await _cluster_sizes(settings, shard_map)
    lags: dict[int, float | None] = {}
    admin = settings.admin(connect_timeout_s=1.0)
    for cluster in shard_map.clusters.values():
        if cluster.replica_host is None:
            continue
        try:
            async with connect(admin, *cluster.replica) as conn:
                status = await replica_status(conn)
            lags[cluster.cluster_id] = status.seconds_behind if status.replicating else None
        except Exception:
            lags[cluster.cluster_id] = None
    out = []
    for shard in shard_map.shards:
        c = shard_map.cluster_of(shard)
        measured = sizes.get(c.cluster_id, {}).get(shard)
        out.append(
            ShardPlacement(
                shard,
                c.name,
                c.primary,
                c.replica if c.replica_host else None,
                None if measured is None else measured[0],
                None if measured is None else measured[1],
                lags.get(c.cluster_id),
                shard in shard_map.readonly,
            )
        )
    return shard_map.version, out


async def create_shards(settings: ShardOpsSettings, n: int) -> tuple[int, dict[int, str]]:
    """Add ``n`` shards after the highest one; returns the map version and shard -> cluster name."""
    if n < 1:
        raise ShardOpsError("create at least one shard")
    shard_map = await _map(settings)
    if not shard_map.clusters:
        raise ShardOpsError("the shard map has no cluster")
    first = max(shard_map.shards, default=0) + 1
    if first + n - 1 > MAX_SHARD:
        raise ShardOpsError(f"shard ids end at {MAX_SHARD}")
    sizes = await _cluster_sizes(settings, shard_map)
    load = {cid: sum(b for b, _ in sizes.get(cid, {}).values()) for cid in shard_map.clusters}
    count = {cid: len(sizes.get(cid, {})) for cid in shard_map.clusters}
    shards_total = max(1, sum(count.values()))
    average = sum(load.values()) // shards_total
    placed: dict[int, int] = {}
    for shard in range(first, first + n):
        # unreachable clusters (no sizes) take no new shard
        candidates = [cid for cid in shard_map.clusters if cid in sizes] or list(shard_map.clusters)
        cid = min(candidates, key=lambda c: (load[c], count[c], c))
        placed[shard] = cid
        load[cid] += average
        count[cid] += 1
    for shard, cid in placed.items():
        # the services' user cannot create schemas; its grant covers every shard schema already
        async with connect(settings.admin(), *shard_map.clusters[cid].primary) as conn:
            await migrate_shard(conn, shard)
    schema = settings.global_db_name
    async with connect(settings, settings.global_db_host, settings.global_db_port) as conn:
        async with conn.cursor() as cur:
            await cur.execute(f"SELECT version FROM `{schema}`.shard_map_version WHERE id = 1 FOR UPDATE")
            (version,) = await cur.fetchone()
            for shard, cid in placed.items():
                await cur.execute(
                    f"INSERT INTO `{schema}`.shards (shard_id, cluster_id) VALUES (%s, %s)", (shard, cid)
                )
            version = int(version) + 1
            await cur.execute(
                f"UPDATE `{schema}`.shard_map_version SET version = %s WHERE id = 1", (version,)
            )
        await conn.commit()
    return version, {s: shard_map.clusters[c].name for s, c in placed.items()}
