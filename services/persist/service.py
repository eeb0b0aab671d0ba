"""persist service (port 8083)."""

from __future__ import annotations

from libs.kafka import make_producer
from libs.service import ServiceContext, ServiceDefinition


async def main(ctx: ServiceContext) -> None:
    async with make_producer(ctx.settings):
        ctx.set_ready()
        await ctx.stopping.wait()


DEFINITION = ServiceDefinition(name="persist", default_port=8083, main=main)
