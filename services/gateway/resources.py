"""The gateway's own ``web.AppKey``s, and the cleanup contexts of everything its handlers use.

:func:`setup_resources` puts the settings on the app and adds the contexts of the shared
resources (:mod:`libs.resources`: the shard router with the account directory, then the Kafka
producer), then the change notifier the delta streams wait on (:data:`NOTIFIER`). Areas with
resources of their own (webhooks, IMAP accounts) add their contexts after these, so theirs can
use the router.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web
from aiokafka import AIOKafkaConsumer

from libs.authn import AUTH_FAILURES, auth_failure_limiter
from libs.kafka import make_consumer
from libs.ratelimit import KeyedSlots
from libs.resources import ROUTER, CleanupContext, database, kafka_producer
from libs.service import STOPPING
from services.gateway.notifier import ChangeNotifier
from services.gateway.settings import GatewaySettings

__all__ = [
    "LONG_POLL_SLOTS",
    "NOTIFIER",
    "SETTINGS",
    "STREAM_SLOTS",
    "TOKEN_KEY",
    "change_notifier",
    "setup_resources",
]

SETTINGS: Final = web.AppKey("gateway_settings", GatewaySettings)
# The MAC key of cursors and page tokens (the settings' secret, as bytes once).
TOKEN_KEY: Final = web.AppKey("gateway_token_key", bytes)
# One per process: wakes the delta streams and long-polls whose account changed.
NOTIFIER: Final = web.AppKey("gateway_notifier", ChangeNotifier)
# Open delta streams and waiting long-polls, per application id (this process's).
STREAM_SLOTS: Final = web.AppKey("gateway_stream_slots", KeyedSlots[int])
LONG_POLL_SLOTS: Final = web.AppKey("gateway_long_poll_slots", KeyedSlots[int])


def setup_resources(app: web.Application, settings: GatewaySettings) -> None:
    app[SETTINGS] = settings
    app[AUTH_FAILURES] = auth_failure_limiter(settings)
    app[STREAM_SLOTS] = KeyedSlots(settings.gateway_max_streams_per_application)
    app[LONG_POLL_SLOTS] = KeyedSlots(settings.gateway_max_long_polls_per_application)
    app[TOKEN_KEY] = settings.gateway_token_secret.encode()
    app.cleanup_ctx.extend(
        [
            database(
                settings,
                key_cache_ttl_s=settings.gateway_key_cache_ttl_s,
                cache_max_entries=settings.gateway_cache_max_entries,
                cache_max_misses=settings.gateway_cache_max_misses,
            ),
            kafka_producer(settings),
            change_notifier(settings),
        ]
    )


def change_notifier(settings: GatewaySettings) -> CleanupContext:
    """The change notifier (:data:`NOTIFIER`), fed by ``gateway_changes_topic`` from its end."""

    def consumer() -> AIOKafkaConsumer:
        # No group: every gateway process reads every partition; nothing to commit or rebalance.
        return make_consumer(
            settings, settings.gateway_changes_topic, group_id=None, auto_offset_reset="latest"
        )

    async def open_notifier(app: web.Application) -> AsyncIterator[None]:
        async with ChangeNotifier(
            app[ROUTER], consumer, recheck_s=settings.gateway_delta_recheck_s, stopping=app[STOPPING]
        ) as notifier:
            app[NOTIFIER] = notifier
            yield

    return open_notifier
