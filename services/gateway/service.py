"""gateway: the REST API, the delta feed, API keys, webhooks and IMAP accounts (port 8080).

The app is built by :func:`add_routes` (routes answer 503 until :func:`main` has opened its
resources); :func:`main` opens, in order, the shard router and the account directory, the Kafka
producer (PATCH and DELETE of messages are lifecycle events on flightlog.inflight; IMAP accounts
are announced on flightlog.imap-accounts) and, unless ``FLIGHTLOG_WEBHOOKS_DISPATCHER_IN_GATEWAY``
is false, the webhook dispatcher; it runs the change-log trimmer and waits for SIGTERM, then
closes them in reverse. Open SSE streams end when it stops. Readiness includes the dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from aiohttp import web

from libs.accounts import AccountDirectory
from libs.crypto import SecretBox
from libs.http import problem_response, read_json
from libs.imap_accounts import SyncStore
from libs.kafka import make_producer
from libs.service import ServiceContext, ServiceDefinition
from libs.shards import ShardRouter
from services.gateway.admin import add_admin_routes
from services.gateway.applications import add_application_routes
from services.gateway.auth import application_of
from services.gateway.constants import MAX_BODY_BYTES, MAX_QUERY_STRING_LENGTH
from services.gateway.delta import add_delta_routes
from services.gateway.errors import problem_middleware
from services.gateway.messages import add_message_routes
from services.gateway.openapi import add_doc_routes
from services.gateway.retention import trim_forever
from services.gateway.settings import GatewaySettings
from services.gateway.state import STATE, GatewayState
from services.gateway.webhooks import WEBHOOK_API, WebhookApi, WebhookDispatcher, add_webhook_routes
from services.gateway.webhooks.service import consumer_factory
from services.ingest.imap.api import add_imap_account_routes
from services.ingest.imap.settings import ImapSettings

__all__ = ["DEFINITION", "add_routes", "main"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def limits_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if len(request.query_string) > MAX_QUERY_STRING_LENGTH:
        return problem_response(
            414, "Query too long", f"the query string is longer than {MAX_QUERY_STRING_LENGTH} characters"
        )
    return await handler(request)


@web.middleware
async def json_body_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Check every JSON body at the door (400 malformed or too deep, 413 too large), so a route
    that parses its body its own way (the IMAP account API validates the bytes with pydantic) or
    a route added later cannot take one the others refuse; the routes' own ``read_json`` then
    reuses the parsed document."""
    if request.body_exists and request.content_type == "application/json":
        await read_json(request, max_bytes=MAX_BODY_BYTES)
    return await handler(request)


async def _application_id(request: web.Request) -> int:
    return (await application_of(request, request.app[STATE].accounts)).id


def add_routes(app: web.Application) -> None:
    state = app[STATE] = GatewayState()
    app.middlewares.extend([problem_middleware, limits_middleware, json_body_middleware])
    add_doc_routes(app)
    add_admin_routes(app)
    add_application_routes(app)
    add_message_routes(app)
    add_delta_routes(app)
    add_webhook_routes(app, WebhookApi())
    add_imap_account_routes(
        app,
        application_of=_application_id,
        get_router=lambda: state.shards,
        get_directory=lambda: state.accounts,
        get_store=lambda: state.imap,
        get_producer=lambda: state.kafka,
        settings=ImapSettings(),
    )


async def main(ctx: ServiceContext) -> None:
    state = ctx.app[STATE]
    webhooks = ctx.app[WEBHOOK_API]
    settings = GatewaySettings()
    async with contextlib.AsyncExitStack() as resources:
        router = await resources.enter_async_context(ShardRouter(settings))
        state.settings = settings
        state.router = router
        state.directory = AccountDirectory(router, ttl_s=settings.gateway_key_cache_ttl_s)
        state.imap_store = SyncStore(router, SecretBox.from_settings())
        state.admin_key = ctx.settings.admin_api_key
        state.stopping = ctx.stopping
        state.producer = await resources.enter_async_context(make_producer(settings))
        webhooks.bind(router, state.directory)
        if webhooks.settings.webhooks_dispatcher_in_gateway:
            dispatcher = await resources.enter_async_context(
                WebhookDispatcher(router, webhooks.settings, lambda: consumer_factory(webhooks.settings))
            )
            ctx.ready_checks.append(lambda: dispatcher.running)
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
