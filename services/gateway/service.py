"""gateway: the REST API, delta feed and webhooks (port 8080)."""

from __future__ import annotations

from aiohttp import web

from libs.service import ServiceContext, ServiceDefinition
from libs.shards import ShardRouter
from services.gateway.admin import STATE, GatewayState, add_admin_routes


def add_routes(app: web.Application) -> None:
    app[STATE] = GatewayState()
    add_admin_routes(app)


async def main(ctx: ServiceContext) -> None:
    state = ctx.app[STATE]
    async with ShardRouter(ctx.settings) as router:
        state.router = router
        state.admin_key = ctx.settings.admin_api_key
        ctx.set_ready()
        await ctx.stopping.wait()


DEFINITION = ServiceDefinition(name="gateway", default_port=8080, main=main, add_routes=add_routes)
