"""gateway: the REST API, the delta feed and API keys (port 8080).

The app is built by :func:`add_routes` (routes answer 503 until :func:`main` has opened the shard
router); :func:`main` opens the router and the account directory, runs the change-log trimmer and
waits for SIGTERM. Open SSE streams end when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from aiohttp import web

from libs.accounts import AccountDirectory
from libs.http import problem_response
from libs.service import ServiceContext, ServiceDefinition
from libs.shards import ShardRouter
from services.gateway.admin import add_admin_routes
from services.gateway.applications import add_application_routes
from services.gateway.constants import MAX_BODY_BYTES, MAX_QUERY_STRING_LENGTH
from services.gateway.delta import add_delta_routes
from services.gateway.errors import problem_middleware
from services.gateway.messages import add_message_routes
from services.gateway.openapi import add_doc_routes
from services.gateway.retention import trim_forever
from services.gateway.settings import GatewaySettings
from services.gateway.state import STATE, GatewayState

__all__ = ["DEFINITION", "add_routes", "main"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def limits_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if len(request.query_string) > MAX_QUERY_STRING_LENGTH:
        return problem_response(
            414, "Query too long", f"the query string is longer than {MAX_QUERY_STRING_LENGTH} characters"
        )
    return await handler(request)


def add_routes(app: web.Application) -> None:
    app[STATE] = GatewayState()
    app.middlewares.extend([problem_middleware, limits_middleware])
    add_doc_routes(app)
    add_admin_routes(app)
    add_application_routes(app)
    add_message_routes(app)
    add_delta_routes(app)


async def main(ctx: ServiceContext) -> None:
    state = ctx.app[STATE]
    settings = GatewaySettings()
    async with ShardRouter(settings) as router:
        state.settings = settings
        state.router = router
        state.directory = AccountDirectory(router, ttl_s=settings.gateway_key_cache_ttl_s)
        state.admin_key = ctx.settings.admin_api_key
        state.stopping = ctx.stopping
        trimmer = None
        if settings.gateway_changes_retention_s > 0:
            trimmer = asyncio.create_task(
                trim_forever(router, settings.gateway_changes_retention_s, settings.gateway_trim_interval_s),
                name="changes-trimmer",
            )
        ctx.set_ready()
        try:
            await ctx.stopping.wait()
        finally:
            if trimmer is not None:
                trimmer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await trimmer


DEFINITION = ServiceDefinition(
    name="gateway", default_port=8080, main=main, add_routes=add_routes, client_max_size=MAX_BODY_BYTES
)
