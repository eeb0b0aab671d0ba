"""Operations on the shard map's clusters: replication status, failover, the controller, verify.

A cluster is a primary and (in the local stack, one) GTID replica with semi-synchronous
replication; the shard map names both. The operations here act on the servers and publish what
they changed as a new map version, which every :class:`~libs.shards.ShardRouter` follows:

- :mod:`libs.shardops.replication`: one server's replication state, fencing and promotion;
- :mod:`libs.shardops.failover`: promote a cluster's replica and publish it (``flightlog shards
  failover``);
- :mod:`libs.shardops.watch`: the controller that health-checks every primary, exports the
  replicas' lag and fails over a dead primary by itself (``flightlog shards watch``);
- :mod:`libs.shardops.verify`: chunked checksums between two copies of a shard, then a row diff
  of the chunks that differ (``flightlog shards verify``).

The operations log in as an administrative user of their own (``admin_db_user``): the services'
user cannot set ``read_only`` and is fenced by it, which is the point of fencing.

Exceptions::

    ShardOpsError          root; an operation refused or failed, with the reason
    └── FailoverError      a failover cannot go ahead (no replica, the replica is behind ...)
"""

from __future__ import annotations

from pydantic import Field

from libs.config import AdminDatabaseSettings

__all__ = ["FailoverError", "ShardOpsError", "ShardOpsSettings"]


class ShardOpsError(Exception):
    retriable = False


class FailoverError(ShardOpsError):
    pass


class ShardOpsSettings(AdminDatabaseSettings):
    """The shard operations and the controller (``flightlog shards failover|watch|verify``).

    A primary is declared dead when no health check succeeded for ``watch_dead_after_s`` and
    at least ``watch_failed_checks`` checks in a row failed; one check is a connect and
    ``SELECT 1`` within ``watch_check_timeout_s``, every ``watch_interval_s``. Detection therefore
    takes between ``watch_dead_after_s`` and that plus one check; the failover itself waits up to
    ``failover_catch_up_timeout_s`` for the replica to apply what it received.
    """

    watch_interval_s: float = Field(default=0.25, gt=0)
    watch_check_timeout_s: float = Field(default=0.5, gt=0)
    watch_failed_checks: int = Field(default=3, ge=1)
    watch_dead_after_s: float = Field(default=1.0, ge=0)
    watch_status_interval_s: float = Field(default=1.0, gt=0)  # replica lag and semi-sync status
    watch_auto_failover: bool = True  # false: detect, export and log, but leave failover to an operator
    failover_fence_timeout_s: float = Field(default=1.0, gt=0)  # reaching the old primary to fence it
    failover_catch_up_timeout_s: float = Field(default=3.0, gt=0)
