"""ingest service (port 8081): POST /v1/events onto ``flightlog.inflight``, and IMAP sync.

The HTTP app's resources are cleanup contexts (:mod:`libs.resources`): the shard router with the
account directory (API keys and account ownership), then the one idempotent ``acks=all``
producer every request shares. :func:`main` runs (unless ``FLIGHTLOG_IMAP_SYNC_ENABLED=false``)
the IMAP account distributor and its sync workers, with a router and a producer of their own. On
SIGTERM the sync workers stop first and hand their accounts back to the group, then the batches
in flight are answered, and only then do the app's resources close.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from aiohttp import web

from libs.authn import AUTH_FAILURES, auth_failure_limiter
from libs.config import ServiceSettings
from libs.crypto import SecretBox, SecretsSettings
from libs.imap_accounts import SyncStore
from libs.imap_login import AccountLogin
from libs.kafka import make_producer
from libs.oauth import OAuthSettings, TokenClient
from libs.resources import database, kafka_producer
from libs.service import ServiceContext, ServiceDefinition
from libs.shards import ShardRouter
from services.ingest.constants import MAX_BODY_BYTES
from services.ingest.imap.distribution import AccountDistributor
from services.ingest.imap.settings import ImapSettings
from services.ingest.routes import INTAKE, SETTINGS, add_ingest_routes
from services.ingest.settings import IngestSettings

__all__ = ["DEFINITION", "imap_sync", "main", "setup_app"]


def setup_app(app: web.Application) -> None:
    service = ServiceSettings()
    app[AUTH_FAILURES] = auth_failure_limiter(service)
    app.cleanup_ctx.extend([database(service), kafka_producer(service)])
    add_ingest_routes(app, IngestSettings())


@asynccontextmanager
async def imap_sync(settings: ServiceSettings, imap: ImapSettings) -> AsyncIterator[AccountDistributor]:
    """The IMAP sync workers of this instance, with their own router, producer and OAuth2 token
    client."""
    oauth = OAuthSettings()
    async with (
        ShardRouter(settings) as router,
        make_producer(settings) as producer,
        TokenClient(oauth) as tokens,
    ):
        store = SyncStore(router, SecretBox.from_settings())
        login = AccountLogin(store, tokens, oauth)
        async with AccountDistributor(
            settings, imap, store, producer, settings.instance_id, login=login
        ) as distributor:
            yield distributor


async def main(ctx: ServiceContext) -> None:
    imap = ImapSettings()
    intake = ctx.app[INTAKE]
    async with AsyncExitStack() as workers:
        # Last out: the batches in flight are answered before the app's producer closes.
        workers.push_async_callback(intake.drain, ctx.app[SETTINGS].ingest_drain_timeout_s)
        if imap.imap_sync_enabled:
            await workers.enter_async_context(imap_sync(ctx.settings, imap))
        ctx.set_ready()
        await ctx.stopping.wait()


DEFINITION = ServiceDefinition(
    name="ingest",
    default_port=8081,
    main=main,
    setup_app=setup_app,
    client_max_size=MAX_BODY_BYTES,
    secrets=((SecretsSettings, "secrets_key"),),  # IMAP passwords, decrypted to log in
)
