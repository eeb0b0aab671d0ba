"""The gateway's own ``web.AppKey``s, and the cleanup contexts of everything its handlers use.

:func:`setup_resources` puts the settings on the app and adds the contexts of the shared
resources (:mod:`libs.resources`: the shard router with the account directory, then the Kafka
producer). Areas with resources of their own (webhooks, IMAP accounts) add their contexts after
these, so theirs can use the router.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from libs.resources import database, kafka_producer
from services.gateway.settings import GatewaySettings

__all__ = ["SETTINGS", "TOKEN_KEY", "setup_resources"]

SETTINGS: Final = web.AppKey("gateway_settings", GatewaySettings)
# The MAC key of cursors and page tokens (the settings' secret, as bytes once).
TOKEN_KEY: Final = web.AppKey("gateway_token_key", bytes)


def setup_resources(app: web.Application, settings: GatewaySettings) -> None:
    app[SETTINGS] = settings
    app[TOKEN_KEY] = settings.gateway_token_secret.encode()
    app.cleanup_ctx.extend(
        [database(settings, key_cache_ttl_s=settings.gateway_key_cache_ttl_s), kafka_producer(settings)]
    )
