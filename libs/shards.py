"""The shard map (logical shard -> cluster -> addresses) and the router that hands out pools.

The map lives in the global schema with a version number. :class:`ShardRouter` caches it, polls
the version every ``shard_map_reload_interval_s`` and reloads when it changed, so moving a shard
to another cluster is an update of the map that every service picks up without a restart.

A failover (:mod:`libs.shardops.failover`) is such an update too: the promoted replica becomes
the cluster's primary. A writer that finds its shard unavailable calls
:meth:`ShardRouter.request_reload`, and the router then polls fast for a while, so it follows a
new map within a fraction of a second instead of a whole reload interval.

Reads that tolerate staleness may ask for the replica (``pool(shard, replica=True)``); the router
falls back to the primary when the cluster has no replica or its replica cannot be reached.

Exceptions::

    ShardError            root
    ├── UnknownShard      no such shard in the map
    ├── ShardReadOnly     the shard is being moved; writes must wait
    └── ShardMoved        the shard's schema is gone from the cluster this map names: the map
                          is stale (a move finished and dropped the old copy); retry
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import asyncmy
import asyncmy.errors
from asyncmy.cursors import Cursor

from libs.aio import wait_for
from libs.component import Component
from libs.config import DatabaseSettings
from libs.db import connect, create_pool, shard_schema
from libs.ids import shard_of

__all__ = [
    "SIZE_BUCKET_BYTES",
    "Cluster",
    "ShardError",
    "ShardMap",
    "ShardMoved",
    "ShardReadOnly",
    "ShardRouter",
    "UnknownShard",
    "load_shard_map",
    "register_clusters",
    "schema_gone",
    "schema_sizes",
    "shard_sizes",
    "spread_shards",
]

logger = logging.getLogger(__name__)


class ShardError(Exception):
    retriable = False


class UnknownShard(ShardError):
    pass


class ShardReadOnly(ShardError):
    retriable = True


class ShardMoved(ShardError):
    retriable = True


# No such table / no such database: what a read through a stale map meets once a finished move
# has dropped the shard's old copy.
_SCHEMA_GONE: Final = frozenset({1146, 1049})


def schema_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is the server saying the schema or table asked for does not exist."""
    if not isinstance(exc, asyncmy.errors.ProgrammingError | asyncmy.errors.OperationalError):
        return False
    return bool(exc.args) and exc.args[0] in _SCHEMA_GONE


@dataclass(frozen=True, slots=True)
class Cluster:
    cluster_id: int
    name: str
    primary_host: str
    primary_port: int
    replica_host: str | None = None
    replica_port: int | None = None

    @property
    def primary(self) -> tuple[str, int]:
        return self.primary_host, self.primary_port

    @property
    def replica(self) -> tuple[str, int]:
        """The read replica's address, or the primary's when the cluster has no replica."""
        if self.replica_host and self.replica_port:
            return self.replica_host, self.replica_port
        return self.primary


@dataclass(frozen=True, slots=True)
class ShardMap:
    version: int
    clusters: dict[int, Cluster]
    shard_cluster: dict[int, int]
    readonly: frozenset[int] = frozenset()

    @property
    def shards(self) -> list[int]:
        return sorted(self.shard_cluster)

    def cluster_of(self, shard: int) -> Cluster:
        try:
            return self.clusters[self.shard_cluster[shard]]
        except KeyError:
            raise UnknownShard(f"shard {shard} is not in the shard map (version {self.version})") from None


def spread_shards(shards: Iterable[int], cluster_ids: list[int]) -> dict[int, int]:
    """Assign shards to clusters round-robin: shard 1 to the first cluster, 2 to the second..."""
    return {shard: cluster_ids[i % len(cluster_ids)] for i, shard in enumerate(sorted(shards))}


async def load_shard_map(conn: asyncmy.Connection, global_schema: str) -> ShardMap:
    async with conn.cursor() as cur:
        await cur.execute(f"SELECT version FROM `{global_schema}`.shard_map_version WHERE id = 1")
        (version,) = await cur.fetchone()
        await cur.execute(
            "SELECT cluster_id, name, primary_host, primary_port, replica_host, replica_port"
            f" FROM `{global_schema}`.clusters"
        )
        clusters = {row[0]: Cluster(*row) for row in await cur.fetchall()}
        await cur.execute(f"SELECT shard_id, cluster_id, state FROM `{global_schema}`.shards")
        rows = await cur.fetchall()
    await conn.commit()  # end the read view so the next poll sees new versions
    return ShardMap(
        version=int(version),
        clusters=clusters,
        shard_cluster={r[0]: r[1] for r in rows},
        readonly=frozenset(r[0] for r in rows if r[2] == "readonly"),
    )


# After a request_reload(): poll the version this often, for this long (a failover publishes its
# map a few seconds after the writes start failing).
FAST_RELOAD_INTERVAL_S = 0.2
FAST_RELOAD_WINDOW_S = 15.0
# A replica that could not be reached is not tried again for this long: its reads go to the primary.
REPLICA_RETRY_S = 5.0


class ShardRouter(Component):
    """Routes a shard (or any id) to a connection pool on the cluster that holds it.

    One pool per server, shared by all of its shards; queries name their schema explicitly
    (:meth:`table`). Use as ``async with ShardRouter(settings) as router``.

    :param replica_reads: route every read (``write=False``) to the replica, as
        ``replica=True`` does for one call.
    """

    def __init__(self, settings: DatabaseSettings, *, replica_reads: bool = False) -> None:
        self._settings = settings
        self._replica_reads = replica_reads
        self._fast_until = 0.0
        self._wake = asyncio.Event()
        self._replica_down_until: dict[tuple[str, int], float] = {}
        self._map: ShardMap | None = None
        self._pools: dict[tuple[str, int], asyncmy.Pool] = {}
        self._global: asyncmy.Pool | None = None
        self._reloader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        if self._global is not None:
            return
        s = self._settings
        self._global = await create_pool(s, s.global_db_host, s.global_db_port)
        await self.reload()
        self._reloader = asyncio.create_task(self._reload_forever(), name="shard-map-reloader")

    async def stop(self) -> None:
        if self._reloader is not None:
            self._reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloader
            self._reloader = None
        pools = [*self._pools.values(), *([self._global] if self._global else [])]
        self._pools.clear()
        self._global = None
        for pool in pools:
            pool.close()
        for pool in pools:
            await pool.wait_closed()

    @property
    def shard_map(self) -> ShardMap:
        if self._map is None:
            raise ShardError("the router is not started")
        return self._map

    @property
    def global_pool(self) -> asyncmy.Pool:
        if self._global is None:
            raise ShardError("the router is not started")
        return self._global

    @property
    def global_schema(self) -> str:
        return self._settings.global_db_name

    async def reload(self) -> bool:
        """Reload the map if its version changed; returns whether it did."""
        async with self._lock, self.global_pool.acquire() as conn:
            fresh = await load_shard_map(conn, self._settings.global_db_name)
            if self._map is not None and fresh.version == self._map.version:
                return False
            old = self._map
            self._map = fresh
            logger.info(
                "shard map version %d: %d shards on %d clusters",
                fresh.version,
                len(fresh.shard_cluster),
                len(fresh.clusters),
            )
            if old is not None:
                await self._close_unused_pools()
            return True

    def request_reload(self) -> None:
        """Poll the map fast for a while: a write found its shard unavailable, and a failover
        may be about to publish a new primary. Cheap to call on every failure."""
        self._fast_until = time.monotonic() + FAST_RELOAD_WINDOW_S
        self._wake.set()

    async def _reload_forever(self) -> None:
        while True:
            fast = time.monotonic() < self._fast_until
            interval = FAST_RELOAD_INTERVAL_S if fast else self._settings.shard_map_reload_interval_s
            with contextlib.suppress(TimeoutError):
                # libs.aio's: no inner task per wait (3.11's asyncio.wait_for makes one, which a
                # test's check for tasks left running sees), and a cancel is never swallowed.
                await wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self.reload()
            except Exception:
                logger.exception("shard map reload failed; keeping version %d", self.shard_map.version)

    async def _close_unused_pools(self) -> None:
        in_use = {c.primary for c in self.shard_map.clusters.values()}
        in_use |= {c.replica for c in self.shard_map.clusters.values()}
        for address in [a for a in self._pools if a not in in_use]:
            pool = self._pools.pop(address)
            pool.close()
            await pool.wait_closed()

    async def _pool_for(self, address: tuple[str, int]) -> asyncmy.Pool:
        pool = self._pools.get(address)
        if pool is None:
            pool = await create_pool(self._settings, *address)
            # Another task may have created one while we awaited; keep the first.
            if address in self._pools:
                pool.close()
                await pool.wait_closed()
                return self._pools[address]
            self._pools[address] = pool
        return pool

    async def pool(self, shard: int, *, write: bool = True, replica: bool = False) -> asyncmy.Pool:
        """The pool of the server to use for ``shard``.

        ``replica=True`` (a read that tolerates staleness; implies ``write=False``) gives the
        cluster's replica, or its primary when it has none or the replica could not be reached
        in the last :data:`REPLICA_RETRY_S` (see :meth:`mark_replica_down`).
        """
        cluster = self.shard_map.cluster_of(shard)
        if replica:
            write = False
        if write and shard in self.shard_map.readonly:
            raise ShardReadOnly(f"shard {shard} is read-only while it moves")
        if (replica or (self._replica_reads and not write)) and cluster.replica != cluster.primary:
            address = cluster.replica
            if self._replica_down_until.get(address, 0.0) <= time.monotonic():
                try:
                    return await self._pool_for(address)
                except (OSError, asyncmy.errors.OperationalError) as exc:
                    logger.warning(
                        "replica %s:%d of %s unreachable (%s); reading from the primary",
                        *address,
                        cluster.name,
                        exc,
                    )
                    self.mark_replica_down(shard)
        return await self._pool_for(cluster.primary)

    def mark_replica_down(self, shard: int) -> None:
        """Send ``shard``'s replica reads to its primary for a while: a read on the replica
        failed with a connection error (the caller retries it on the primary)."""
        cluster = self.shard_map.cluster_of(shard)
        self._replica_down_until[cluster.replica] = time.monotonic() + REPLICA_RETRY_S

    async def pool_for_id(self, id_: int, *, write: bool = True, replica: bool = False) -> asyncmy.Pool:
        return await self.pool(shard_of(id_), write=write, replica=replica)

    @staticmethod
    def table(shard: int, name: str) -> str:
        return f"`{shard_schema(shard)}`.`{name}`"


async def register_clusters(
    settings: DatabaseSettings,
    clusters: list[tuple[str, str, int]],
    shard_count: int,
    replicas: Mapping[str, tuple[str, int]] | None = None,
) -> ShardMap:
    """Write clusters and a round-robin shard assignment into the global schema.

    Existing shards keep their cluster (moving one is a separate operation); new shards are
    spread over the clusters. ``replicas`` gives clusters' replica addresses by name. Bumps the
    map version when anything changed.

    A cluster that failed over (its map primary is its configured replica, or it was recorded
    in ``cluster_failovers``) keeps the map's addresses: the map, not the configuration, knows
    which server is primary now, and writing the configured one back would send writes to the
    fenced old primary.
    """
    schema = settings.global_db_name
    async with connect(settings, settings.global_db_host, settings.global_db_port) as conn:
        current = await load_shard_map(conn, schema)
        changed = False
        async with conn.cursor() as cur:
            by_name = {c.name: c for c in current.clusters.values()}
            next_id = max(current.clusters, default=0) + 1
            ids = []
            failed_over = await _failed_over_clusters(cur, schema)
            for name, host, port in clusters:
                existing = by_name.get(name)
                replica = (replicas or {}).get(name)
                if existing is None:
                    await cur.execute(
                        f"INSERT INTO `{schema}`.clusters (cluster_id, name, primary_host,"
                        " primary_port, replica_host, replica_port) VALUES (%s, %s, %s, %s, %s, %s)",
                        (next_id, name, host, port, *(replica or (None, None))),
                    )
                    ids.append(next_id)
                    next_id += 1
                    changed = True
                elif existing.cluster_id in failed_over or (replica and existing.primary == replica):
                    ids.append(existing.cluster_id)
                else:
                    if replica is not None and (existing.replica_host, existing.replica_port) != replica:
                        await cur.execute(
                            f"UPDATE `{schema}`.clusters SET replica_host = %s, replica_port = %s"
                            " WHERE cluster_id = %s",
                            (*replica, existing.cluster_id),
                        )
                        changed = True
                    if existing.primary != (host, port):
                        await cur.execute(
                            f"UPDATE `{schema}`.clusters SET primary_host = %s, primary_port = %s"
                            " WHERE cluster_id = %s",
                            (host, port, existing.cluster_id),
                        )
                        changed = True
                    ids.append(existing.cluster_id)
            wanted = range(1, shard_count + 1)
            missing = [s for s in wanted if s not in current.shard_cluster]
            assignment = spread_shards(wanted, ids)
            for shard in missing:
                await cur.execute(
                    f"INSERT INTO `{schema}`.shards (shard_id, cluster_id) VALUES (%s, %s)",
                    (shard, assignment[shard]),
                )
                changed = True
            if changed:
                await cur.execute(
                    f"UPDATE `{schema}`.shard_map_version SET version = version + 1 WHERE id = 1"
                )
        await conn.commit()
        return await load_shard_map(conn, schema)


async def _failed_over_clusters(cur: Cursor, schema: str) -> set[int]:
    """Clusters with a failover on record (none before migration 0011 created the table)."""
    await cur.execute(
        "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s"
        " AND TABLE_NAME = 'cluster_failovers'",
        (schema,),
    )
    (exists,) = await cur.fetchone()
    if not exists:
        return set()
    await cur.execute(f"SELECT DISTINCT cluster_id FROM `{schema}`.cluster_failovers")
    return {int(row[0]) for row in await cur.fetchall()}


# Sizes closer than this are the same size: InnoDB's figures move in steps and lag the data.
SIZE_BUCKET_BYTES = 1 << 20


async def schema_sizes(conn: asyncmy.Connection) -> dict[int, tuple[int, int]]:
    """Each shard schema on the server of ``conn``: (data + index bytes, estimated rows), as
    information_schema measures them (InnoDB's statistics: approximate, refreshed lazily)."""
    async with conn.cursor() as cur:
        await cur.execute(
            "SELECT TABLE_SCHEMA, SUM(DATA_LENGTH + INDEX_LENGTH), SUM(TABLE_ROWS)"
            " FROM information_schema.TABLES WHERE TABLE_SCHEMA LIKE 'flightlog\\_shard\\_%'"
            " GROUP BY TABLE_SCHEMA"
        )
        rows = await cur.fetchall()
    await conn.commit()
    out = {}
    for schema, size, table_rows in rows:
        suffix = str(schema).rsplit("_", 1)[-1]
        if suffix.isdigit():
            out[int(suffix)] = (int(size or 0), int(table_rows or 0))
    return out


async def shard_sizes(router: ShardRouter) -> dict[int, int]:
    """Every shard in the map: its measured size in bytes on its cluster's primary (one query
    per cluster). A shard its cluster does not hold (yet) measures 0."""
    m = router.shard_map
    sizes: dict[int, int] = {}
    for cluster in m.clusters.values():
        shards = [s for s, c in m.shard_cluster.items() if c == cluster.cluster_id]
        if not shards:
            continue
        pool = await router._pool_for(cluster.primary)
        async with pool.acquire() as conn:
            measured = await schema_sizes(conn)
        sizes.update({s: measured.get(s, (0, 0))[0] for s in shards})
    return sizes
