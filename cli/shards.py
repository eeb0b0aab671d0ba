"""``flightlog shards failover|watch|verify``: the shard operations of :mod:`libs.shardops`.

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
from libs.shardops.failover import failover as fail_over
from libs.shardops.verify import verify_replica
from libs.shardops.watch import ShardWatch

__all__ = ["CONTROLLER_PORT", "failover", "verify", "watch"]

CONTROLLER_PORT = 8084  # the controller's /healthz, /readyz and /metrics


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

    Serves /healthz, /readyz and /metrics on FLIGHTLOG_HTTP_PORT (default 8084); one instance
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
