"""gateway: the REST API, delta feed and webhooks (port 8080)."""

from __future__ import annotations

from libs.service import ServiceContext, ServiceDefinition
from libs.shards import ShardRouter


async def main(ctx: ServiceContext) -> None:
    async with ShardRouter(ctx.settings, replica_reads=True):
        ctx.set_ready()
        await ctx.stopping.wait()


DEFINITION = ServiceDefinition(name="gateway", default_port=8080, main=main)
