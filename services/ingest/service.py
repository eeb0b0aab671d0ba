"""ingest service (port 8081)."""

from __future__ import annotations

from libs.kafka import make_producer
from libs.service import ServiceContext, ServiceDefinition


async def main(ctx: ServiceContext) -> None:
    async with make_producer(ctx.settings):
        ctx.set_ready()
        await ctx.stopping.wait()


DEFINITION = ServiceDefinition(name="ingest", default_port=8081, main=main)
