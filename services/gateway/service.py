"""gateway: the REST API, the delta feed, API keys, webhooks and IMAP accounts (port 8080).

:func:`setup_app` builds the app: its routes, and its resources as cleanup contexts (the shard
router with the account directory, the Kafka producer, then the webhook and IMAP account stores
on that router; see :mod:`services.gateway.resources`). PATCH and DELETE of messages are
lifecycle events on flightlog.inflight; IMAP accounts are announced on flightlog.imap-accounts.
:func:`main` runs the workers that are not requests: the webhook dispatcher (unless
``FLIGHTLOG_WEBHOOKS_DISPATCHER_IN_GATEWAY`` is false), the change-log trimmer and the message
retention job (one leader in the deployment); it waits for
SIGTERM, then stops them. Open SSE streams end when the runner sets ``STOPPING``. Readiness
includes the dispatcher. Every request is counted and timed per route on ``/metrics``
(:mod:`services.gateway.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from aiohttp import web

from libs.crypto import SecretsSettings
from libs.http import Problem, read_json
from libs.imap_accounts import ImapAccountsSettings
from libs.outbox import SmtpSettings
from libs.resources import ROUTER
from libs.service import ServiceContext, ServiceDefinition
from services.gateway.admin import ADMIN_PREFIX, add_admin_routes
from services.gateway.applications import add_application_routes
from services.gateway.constants import MAX_BODY_BYTES, MAX_QUERY_STRING_LENGTH
from services.gateway.content import ContentSettings, add_content_routes
from services.gateway.delta import add_delta_routes
from services.gateway.imap_accounts import add_imap_account_routes
from services.gateway.messages import add_message_routes
from services.gateway.metrics import request_metrics_middleware
from services.gateway.openapi import DOC_PATHS, add_doc_routes
from services.gateway.privacy import add_privacy_routes
from services.gateway.resources import SETTINGS, setup_resources
from services.gateway.retention import MessageRetention, expire_messages_forever, trim_forever
from services.gateway.sending import SendSettings, add_sending_routes
from services.gateway.settings import GatewaySettings
from services.gateway.threads import add_thread_routes
from services.gateway.webhooks import WEBHOOK_SETTINGS, WebhookDispatcher, WebhookSettings, add_webhook_routes
from services.gateway.webhooks.service import consumer_factory

__all__ = ["DEFINITION", "main", "setup_app"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def limits_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if len(request.query_string) > MAX_QUERY_STRING_LENGTH:
        raise Problem(
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


def setup_app(app: web.Application) -> None:
    # outermost, outside the problem middleware: it counts the status the client gets
    app.middlewares.insert(0, request_metrics_middleware)
    app.middlewares.extend([limits_middleware, json_body_middleware])
    setup_resources(app, GatewaySettings())  # first: the areas below use its router
    add_doc_routes(app)
    add_admin_routes(app)
    add_application_routes(app)
    add_message_routes(app)
    add_thread_routes(app)
    add_delta_routes(app)
    add_webhook_routes(app, WebhookSettings())
    add_imap_account_routes(app, ImapAccountsSettings())
    add_privacy_routes(app)  # after the IMAP accounts' settings: an erasure stops the sync
    add_content_routes(app, ContentSettings())
    add_sending_routes(app, SmtpSettings(), SendSettings())


async def main(ctx: ServiceContext) -> None:
    app = ctx.app
    settings, router, webhooks = app[SETTINGS], app[ROUTER], app[WEBHOOK_SETTINGS]
    async with contextlib.AsyncExitStack() as workers:
        if webhooks.webhooks_dispatcher_in_gateway:
            dispatcher = await workers.enter_async_context(
                WebhookDispatcher(router, webhooks, lambda: consumer_factory(webhooks))
            )
            ctx.ready_checks.append(lambda: dispatcher.running)
        if settings.gateway_changes_retention_s > 0:
            trimmer = asyncio.create_task(
                trim_forever(router, settings.gateway_changes_retention_s, settings.gateway_trim_interval_s),
                name="changes-trimmer",
            )
            workers.push_async_callback(_cancel, trimmer)
        if settings.gateway_message_retention_interval_s > 0:
            retention = MessageRetention(
                settings.gateway_message_retention_interval_s,
                settings.gateway_message_retention_batch_rows,
                settings.gateway_message_retention_pause_s,
            )
            expirer = asyncio.create_task(
                expire_messages_forever(settings, router, retention, ctx.stopping), name="message-retention"
            )
            workers.push_async_callback(_cancel, expirer)
        ctx.set_ready()
        await ctx.stopping.wait()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


DEFINITION = ServiceDefinition(
    name="gateway",
    default_port=8080,
    main=main,
    setup_app=setup_app,
    client_max_size=MAX_BODY_BYTES,
    # for operators only: the docs and the admin API (its key mints keys for any application)
    management_paths=(*DOC_PATHS, ADMIN_PREFIX),
    secrets=(
        (GatewaySettings, "admin_api_key"),
        (GatewaySettings, "gateway_token_secret"),
        (SecretsSettings, "secrets_key"),
        (WebhookSettings, "webhooks_secret_key"),
    ),
)
