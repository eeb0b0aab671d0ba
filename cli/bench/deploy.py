"""Private MariaDB deployments for the shard-operation stages (failover, shard-move, shard-down)
and their tests: a global server and clusters of their own on free ports, apart from the shared
stack's servers, data and global schema, so a stage can kill or move them freely.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cli.stack import HOST, MariaDB, Stack
from libs.config import StackSettings
from libs.db import connect
from libs.db.migrate import migrate_global, migrate_shard
from libs.shardops import ShardOpsSettings
from libs.shards import ShardMap, register_clusters

__all__ = ["PrivateDeployment", "free_port", "private_deployment"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PrivateDeployment:
    """A global server holding ``global_schema`` and ``clusters`` one-primary clusters (``c1``,
    ``c2`` ...); with ``replicas``, the one cluster also gets its semi-synchronous replica."""

    state_dir: Path
    global_schema: str
    clusters: int = 1
    replicas: bool = False
    buffer_pool_mb: int = 32
    global_server: MariaDB = field(init=False)
    stack: Stack = field(init=False)
    settings: ShardOpsSettings = field(init=False)

    def __post_init__(self) -> None:
        if self.replicas and self.clusters != 1:
            raise ValueError("a private deployment replicates one cluster only")
        self.global_server = MariaDB(
            StackSettings(
                state_dir=self.state_dir / "global",
                mariadb_ports=(free_port(),),
                mariadb_buffer_pool_mb=32,
                mariadb_replicas=False,
            ),
            0,
        )
        ports = tuple(free_port() for _ in range(self.clusters))
        self.stack = Stack(
            StackSettings(
                state_dir=self.state_dir / "clusters",
                mariadb_ports=ports,
                mariadb_buffer_pool_mb=self.buffer_pool_mb,
                mariadb_replicas=self.replicas,
                # the replica's port is the primary's plus this offset: a free one
                mariadb_replica_port_offset=free_port() - ports[0] if self.replicas else 10,
            )
        )
        self.settings = ShardOpsSettings(
            global_db_port=self.global_server.port,
            global_db_name=self.global_schema,
            db_connect_timeout_s=1.0,
            # services poll the map slowly; a parked write asks for it at once (request_reload)
            shard_map_reload_interval_s=5.0,
        )

    @property
    def primary(self) -> MariaDB:
        return self.stack.mariadb[0]

    @property
    def replica(self) -> MariaDB:
        return self.stack.replicas[0]

    def up(self) -> None:
        for server in (self.global_server, *self.stack.mariadb, *self.stack.replicas):
            server.up()

    def down(self) -> None:
        for server in (*reversed(self.stack.replicas), *reversed(self.stack.mariadb), self.global_server):
            server.down()

    async def schemas(self, shards: int = 2) -> ShardMap:
        """The global schema and the shard map (round-robin over the clusters, with the
        replica), then each shard migrated on its primary."""
        s = self.settings
        async with connect(s, s.global_db_host, s.global_db_port) as conn:
            await migrate_global(conn, s.global_db_name)
        replicas = self.stack.replica_addresses() if self.replicas else None
        shard_map = await register_clusters(s, self.stack.clusters(), shards, replicas=replicas)
        for shard in shard_map.shards:
            async with connect(s, *shard_map.cluster_of(shard).primary) as conn:
                await migrate_shard(conn, shard)
        return shard_map


@contextlib.contextmanager
def private_deployment(
    state_dir: Path,
    global_schema: str,
    *,
    clusters: int = 1,
    replicas: bool = False,
    buffer_pool_mb: int = 32,
) -> Iterator[PrivateDeployment]:
    """A started :class:`PrivateDeployment`, stopped on exit."""
    deployment = PrivateDeployment(state_dir, global_schema, clusters, replicas, buffer_pool_mb)
    try:
        deployment.up()
        yield deployment
    finally:
        deployment.down()
