"""The shard controller: health-checks every primary, exports replica lag, fails over a dead primary.

It runs as ``flightlog shards watch``, through the same runner as the services
(:func:`libs.service.serve`: ``/healthz``, ``/readyz``, ``/metrics`` on port 8084, SIGTERM drains).
A command rather than a fifth service because it is an operator's process: one per deployment,
holding no data, and it must not share the services' fate (a crash loop in persist must not
stop failovers). One instance acts at a time: the leader holds a named lock on the global
server (``GET_LOCK``); a second one waits as a standby and takes over when the lock is free.

A primary is dead when no check succeeded for ``watch_dead_after_s`` and at least
``watch_failed_checks`` checks in a row failed (a kill -9 answers connects with a refusal at
once, a hung host with the check's timeout). Then :func:`libs.shardops.failover.failover` runs,
once: the cluster it leaves has no replica, so there is nothing to fail over to again.

Metrics (labels: ``cluster``)::

    flightlog_shard_primary_up           1 while the primary answers its health check
    flightlog_shard_replica_up           1 while the replica's IO and SQL threads run
    flightlog_shard_replica_lag_seconds  Seconds_Behind_Master (NaN while not replicating)
    flightlog_shard_semi_sync_up         1 while the primary waits for its replica's acks
    flightlog_shard_failovers_total      failovers by outcome (ok, refused)
    flightlog_shard_failover_seconds     the last failover: detection to the published map
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncmy
from prometheus_client import Counter, Gauge

from libs.aio import wait_for
from libs.db import connect, leader_lock_name
from libs.shardops import ShardOpsError, ShardOpsSettings
from libs.shardops.failover import FailoverResult, failover
from libs.shardops.replication import replica_status, semi_sync_active
from libs.shards import Cluster, ShardMap, load_shard_map

__all__ = ["ClusterHealth", "ShardWatch"]

logger = logging.getLogger(__name__)

REFUSED_RETRY_S = 10.0

PRIMARY_UP = Gauge("flightlog_shard_primary_up", "1 while the primary answers", ["cluster"])
REPLICA_UP = Gauge("flightlog_shard_replica_up", "1 while the replica replicates", ["cluster"])
REPLICA_LAG = Gauge("flightlog_shard_replica_lag_seconds", "the replica's Seconds_Behind_Master", ["cluster"])
SEMI_SYNC_UP = Gauge("flightlog_shard_semi_sync_up", "1 while commits wait for the replica", ["cluster"])
FAILOVERS = Counter("flightlog_shard_failovers_total", "failovers by outcome", ["cluster", "outcome"])
FAILOVER_SECONDS = Gauge(
    "flightlog_shard_failover_seconds", "the last failover, detection to published map", ["cluster"]
)


@dataclass(slots=True)
class ClusterHealth:
    """What the controller knows of one cluster's primary."""

    last_ok: float = field(default_factory=time.monotonic)
    failed_in_a_row: int = 0
    last_status_check: float = 0.0
    last_error: str = ""
    quiet_until: float = 0.0  # after a failover that could not go ahead: when to try again

    def dead(self, now: float, settings: ShardOpsSettings) -> bool:
        return (
            self.failed_in_a_row >= settings.watch_failed_checks
            and now - self.last_ok >= settings.watch_dead_after_s
        )


class ShardWatch:
    """The controller's loop; :meth:`run` until ``stopping`` is set.

    :param on_failover: called with each failover's result (the tests and the bench time it).
    """

    def __init__(
        self,
        settings: ShardOpsSettings,
        *,
        on_failover: Callable[[FailoverResult], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_failover = on_failover
        self.health: dict[int, ClusterHealth] = {}
        self.failovers: list[FailoverResult] = []
        self._admin = settings.admin(connect_timeout_s=settings.watch_check_timeout_s)
        self._map: ShardMap | None = None
        self._map_read = 0.0
        self.leader = False

    async def run(self, stopping: asyncio.Event, ready: Callable[[], None] | None = None) -> None:
        s = self.settings
        lock = leader_lock_name("shard-controller", s.global_db_name)
        while not stopping.is_set():
            try:
                async with connect(s, s.global_db_host, s.global_db_port) as conn:
                    if not await self._take_lock(conn, lock):
                        logger.info("another controller leads; waiting as a standby")
                        await self._sleep(stopping, 2.0)
                        continue
                    self.leader = True
                    logger.info("leading: watching the shard map's clusters")
                    if ready is not None:
                        ready()
                    await self._lead(conn, stopping)
            except Exception:
                logger.exception("controller: lost the global server; retrying")
                await self._sleep(stopping, 1.0)
            finally:
                self.leader = False

    @staticmethod
    async def _take_lock(conn: asyncmy.Connection, name: str) -> bool:
        async with conn.cursor() as cur:
            await cur.execute("SELECT GET_LOCK(%s, 0)", (name,))
            (got,) = await cur.fetchone()
        return bool(got == 1)

    @staticmethod
    async def _sleep(stopping: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await wait_for(stopping.wait(), seconds)

    async def _lead(self, global_conn: asyncmy.Connection, stopping: asyncio.Event) -> None:
        s = self.settings
        while not stopping.is_set():
            tick = time.monotonic()
            if self._map is None or tick - self._map_read >= 1.0:
                # the lock's connection reads the map: a lost global server ends the leadership
                self._map = await load_shard_map(global_conn, s.global_db_name)
                self._map_read = tick
            await asyncio.gather(*(self._watch(c) for c in self._map.clusters.values()))
            await self._sleep(stopping, max(0.0, s.watch_interval_s - (time.monotonic() - tick)))

    async def _watch(self, cluster: Cluster) -> None:
        s = self.settings
        health = self.health.setdefault(cluster.cluster_id, ClusterHealth())
        now = time.monotonic()
        try:
            async with asyncio.timeout(s.watch_check_timeout_s):
                async with connect(self._admin, *cluster.primary) as conn:
                    async with conn.cursor() as cur:
                        await cur.execute("SELECT 1")
                    if now - health.last_status_check >= s.watch_status_interval_s:
                        SEMI_SYNC_UP.labels(cluster.name).set(1 if await semi_sync_active(conn) else 0)
            health.last_ok, health.failed_in_a_row, health.last_error = time.monotonic(), 0, ""
            PRIMARY_UP.labels(cluster.name).set(1)
        except Exception as exc:  # whatever stops a connect and SELECT 1 is a failed check
            health.failed_in_a_row += 1
            health.last_error = f"{type(exc).__name__}: {exc}"
            PRIMARY_UP.labels(cluster.name).set(0)
        if now - health.last_status_check >= s.watch_status_interval_s:
            health.last_status_check = now
            await self._replica_metrics(cluster)
        if health.dead(time.monotonic(), s) and time.monotonic() >= health.quiet_until:
            await self._fail_over(cluster, health)

    async def _replica_metrics(self, cluster: Cluster) -> None:
        if cluster.replica == cluster.primary:
            REPLICA_UP.labels(cluster.name).set(0)
            REPLICA_LAG.labels(cluster.name).set(math.nan)
            return
        try:
            async with asyncio.timeout(self.settings.watch_check_timeout_s):
                async with connect(self._admin, *cluster.replica) as conn:
                    status = await replica_status(conn)
        except Exception:
            REPLICA_UP.labels(cluster.name).set(0)
            REPLICA_LAG.labels(cluster.name).set(math.nan)
            return
        REPLICA_UP.labels(cluster.name).set(1 if status.replicating else 0)
        REPLICA_LAG.labels(cluster.name).set(
            math.nan if status.seconds_behind is None else status.seconds_behind
        )

    async def _fail_over(self, cluster: Cluster, health: ClusterHealth) -> None:
        s = self.settings
        down_s = time.monotonic() - health.last_ok
        reason = (
            f"primary {cluster.primary_host}:{cluster.primary_port} failed {health.failed_in_a_row}"
            f" checks over {down_s:.2f} s ({health.last_error})"
        )
        # what cannot go ahead now is said once per REFUSED_RETRY_S, not on every check
        health.quiet_until = time.monotonic() + REFUSED_RETRY_S
        if not s.watch_auto_failover:
            logger.error("cluster %s: %s; automatic failover is off", cluster.name, reason)
            return
        if cluster.replica == cluster.primary:
            logger.error("cluster %s: %s; it has no replica to promote", cluster.name, reason)
            return
        detected = time.monotonic()
        try:
            result = await failover(s, cluster.name, reason=reason)
        except ShardOpsError as exc:
            FAILOVERS.labels(cluster.name, "refused").inc()
            logger.error("cluster %s: %s; failover refused: %s", cluster.name, reason, exc)
            return
        FAILOVERS.labels(cluster.name, "ok").inc()
        FAILOVER_SECONDS.labels(cluster.name).set(time.monotonic() - detected)
        health.last_ok, health.failed_in_a_row = time.monotonic(), 0
        self.failovers.append(result)
        health.quiet_until = 0.0
        self._map_read = 0.0  # the failover changed the map: read it at once
        if self.on_failover is not None:
            self.on_failover(result)
