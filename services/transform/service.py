"""transform service (port 8082)."""

from __future__ import annotations

from libs.kafka import make_producer
from libs.service import ServiceContext, ServiceDefinition


async def main(ctx: ServiceContext) -> None:
    async with make_producer(ctx.settings):
        ctx.set_ready()
        await ctx.stopping.wait()


DEFINITION = ServiceDefinition(name="transform", default_port=8082, main=main)
