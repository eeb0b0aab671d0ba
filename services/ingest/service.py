"""ingest service (port 8081): POST /v1/events onto ``flightlog.inflight``, and IMAP sync.

Resources are opened in order and closed in reverse: the shard router (API keys and account
ownership), then the one idempotent ``acks=all`` producer every request shares, then (unless
``FLIGHTLOG_IMAP_SYNC_ENABLED=false``) the IMAP account distributor and its sync workers, which
stop first on SIGTERM and hand their accounts back to the group.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from aiohttp import web

from libs.accounts import AccountDirectory
from libs.config import ServiceSettings
from libs.crypto import SecretBox
from libs.imap_accounts import SyncStore
from libs.kafka import make_producer
from libs.service import ServiceContext, ServiceDefinition
from libs.shards import ShardRouter
from services.ingest.constants import MAX_BODY_BYTES
from services.ingest.imap.distribution import AccountDistributor
from services.ingest.imap.settings import ImapSettings
from services.ingest.routes import STATE, IngestState, add_ingest_routes, drain
from services.ingest.settings import IngestSettings

__all__ = ["DEFINITION", "add_routes", "imap_sync", "ingest_resources", "main"]


def add_routes(app: web.Application, settings: IngestSettings | None = None) -> None:
    add_ingest_routes(app, settings or IngestSettings())


@asynccontextmanager
async def ingest_resources(state: IngestState, settings: ServiceSettings) -> AsyncIterator[IngestState]:
    """Open what the routes need; on exit, drain the batches in flight before closing."""
    async with ShardRouter(settings) as router, make_producer(settings) as producer:
        state.directory = AccountDirectory(router)
        state.producer = producer
        state.accepting = True
        try:
            yield state
        finally:
            await drain(state, state.settings.ingest_drain_timeout_s)
            state.producer = None
            state.directory = None


@asynccontextmanager
async def imap_sync(settings: ServiceSettings, imap: ImapSettings) -> AsyncIterator[AccountDistributor]:
    """The IMAP sync workers of this instance, with their own router and producer."""
    async with ShardRouter(settings) as router, make_producer(settings) as producer:
        store = SyncStore(router, SecretBox.from_settings())
        async with AccountDistributor(settings, imap, store, producer, settings.instance_id) as distributor:
            yield distributor


async def main(ctx: ServiceContext) -> None:
    imap = ImapSettings()
    async with ingest_resources(ctx.app[STATE], ctx.settings), AsyncExitStack() as stack:
        if imap.imap_sync_enabled:
            await stack.enter_async_context(imap_sync(ctx.settings, imap))
        ctx.set_ready()
        await ctx.stopping.wait()


DEFINITION = ServiceDefinition(
    name="ingest", default_port=8081, main=main, add_routes=add_routes, client_max_size=MAX_BODY_BYTES
)
