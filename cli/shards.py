"""``flightlog shards failover|watch|verify|move|create|list``: the operations of :mod:`libs.shardops`.

Registered on ``flightlog shards`` by :mod:`cli.main`. Each reads its settings from the
environment (:class:`libs.shardops.ShardOpsSettings`: the global schema's address, the
administrative login, the controller's timings).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from libs.service import ServiceContext, ServiceDefinition, run_service
from libs.shardops import ShardOpsError, ShardOpsSettings
from libs.shardops.capacity import create_shards, placements
from libs.shardops.failover import failover as fail_over
from libs.shardops.move import cleanup_moved, move_shard
from libs.shardops.verify import verify_replica
from libs.shardops.watch import ShardWatch

__all__ = ["CONTROLLER_PORT", "create", "failover", "list_shards", "move", "verify", "watch"]

CONTROLLER_PORT = 8084  # the controller's /healthz and /readyz (/metrics: this plus 1000)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def failover(
    cluster: Annotated[str, typer.Argument(help="The cluster's name in the shard map, e.g. c2.")],
    reason: Annotated[str, typer.Option(help="Recorded with the failover.")] = "manual",
) -> None:
    """Promote a cluster's replica, fence the old primary and publish the new shard map version."""
    try:
        result = asyncio.run(fail_over(ShardOpsSettings(), cluster, reason=reason))
    except ShardOpsError as exc:
        _fail(str(exc))
        return
    typer.echo(result.summary())


def watch() -> None:
    """Run the controller: health-check primaries, export replica lag, fail over a dead primary.

    Serves /healthz and /readyz on FLIGHTLOG_HTTP_PORT (default 8084), /metrics on the management
    port (FLIGHTLOG_MANAGEMENT_PORT, default 9084); one instance
    leads (a lock on the global server), others wait as standbys. Stop it with SIGTERM or Ctrl-C.
    """

    async def main(ctx: ServiceContext) -> None:
        await ShardWatch(ShardOpsSettings()).run(ctx.stopping, ready=ctx.set_ready)

    run_service(ServiceDefinition(name="shard-controller", default_port=CONTROLLER_PORT, main=main))


def verify(
    shard: Annotated[int, typer.Argument(help="The logical shard to compare.")],
    sample: Annotated[
        int | None, typer.Option(help="Compare this many random rows per table instead of every chunk.")
    ] = None,
    chunk_rows: Annotated[int, typer.Option(help="Rows per checksummed chunk.")] = 1000,
) -> None:
    """Compare a shard's rows on its primary and replica (chunk checksums, then a row diff).

    Exits 1 when a row differs."""
    try:
        report = asyncio.run(verify_replica(ShardOpsSettings(), shard, sample=sample, chunk_rows=chunk_rows))
    except ShardOpsError as exc:
        _fail(str(exc))
        return
    for line in report.lines():
        typer.echo(line)
    if not report.ok:
        raise typer.Exit(1)


def move(
    shard: Annotated[int, typer.Argument(help="The logical shard to move.")],
    to: Annotated[
        str | None, typer.Option("--to", help="The cluster's name in the shard map, e.g. c2.")
    ] = None,
    cleanup: Annotated[
        bool, typer.Option("--cleanup", help="Drop what an earlier move left on the old cluster.")
    ] = False,
    chunk_rows: Annotated[int, typer.Option(help="Rows per checksummed chunk of the verify.")] = 1000,
) -> None:
    """Copy a shard to another cluster while it takes writes, verify it, switch the map.

    Writes pause (persist parks them) from the fence to the new map version; the old copy is
    kept on the old cluster until --cleanup."""
    settings = ShardOpsSettings()
    try:
        if cleanup:
            for line in asyncio.run(cleanup_moved(settings, shard)) or ["nothing to drop"]:
                typer.echo(f"dropped {line}" if line != "nothing to drop" else line)
            if to is None:
                return
        if to is None:
            _fail("say where: --to CLUSTER (or --cleanup)")
            return
        result = asyncio.run(move_shard(settings, shard, to, chunk_rows=chunk_rows, progress=typer.echo))
    except ShardOpsError as exc:
        _fail(str(exc))
        return
    if result.verify is not None:
        for line in result.verify.lines():
            typer.echo(line)


def create(n: Annotated[int, typer.Argument(help="How many logical shards to add.")]) -> None:
    """Add N logical shards, each on the least-loaded cluster by measured size, migrated, in the map."""
    try:
        version, placed = asyncio.run(create_shards(ShardOpsSettings(), n))
    except ShardOpsError as exc:
        _fail(str(exc))
        return
    for shard, cluster in placed.items():
        typer.echo(f"shard {shard} on cluster {cluster}")
    typer.echo(f"shard map version {version}")


def list_shards() -> None:
    """Every logical shard: its cluster, address, size (data and index), replica lag."""
    version, rows = asyncio.run(placements(ShardOpsSettings()))
    typer.echo(f"shard map version {version}")
    for row in rows:
        typer.echo(row.line())
