"""The resources more than one service's HTTP app holds, as typed ``web.AppKey``s, and the
cleanup contexts that open them.

A service adds the contexts it needs to ``app.cleanup_ctx`` in its ``setup_app``; aiohttp enters
them in order before the port opens and leaves them in reverse after the last request, so a
handler reads ``request.app[ROUTER]`` and never meets one that is missing or closed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Final

from aiohttp import web
from aiokafka import AIOKafkaProducer

from libs.accounts import AccountDirectory
from libs.config import DatabaseSettings, KafkaSettings
from libs.kafka import make_producer
from libs.shards import ShardRouter

__all__ = ["DIRECTORY", "PRODUCER", "ROUTER", "CleanupContext", "database", "kafka_producer"]

CleanupContext = Callable[[web.Application], AsyncIterator[None]]

ROUTER: Final = web.AppKey("router", ShardRouter)
# API keys and account ownership, cached; one per process, so a key revoked through one route
# is refused at once by every route of the process.
DIRECTORY: Final = web.AppKey("directory", AccountDirectory)
# The process's one idempotent acks=all producer, shared by every request.
PRODUCER: Final = web.AppKey("producer", AIOKafkaProducer)


def database(
    settings: DatabaseSettings,
    *,
    key_cache_ttl_s: float = 30.0,
    cache_max_entries: int = 50_000,
    cache_max_misses: int = 10_000,
) -> CleanupContext:
    """The shard router (:data:`ROUTER`) and the account directory on it (:data:`DIRECTORY`),
    whose caches keep answers ``key_cache_ttl_s`` and hold the numbers of entries given
    (:class:`~libs.accounts.AccountDirectory`)."""

    async def open_database(app: web.Application) -> AsyncIterator[None]:
        async with ShardRouter(settings) as router:
            app[ROUTER] = router
            app[DIRECTORY] = AccountDirectory(
                router, key_cache_ttl_s, max_entries=cache_max_entries, max_misses=cache_max_misses
            )
            yield

    return open_database


def kafka_producer(settings: KafkaSettings) -> CleanupContext:
    """The Kafka producer (:data:`PRODUCER`)."""

    async def open_producer(app: web.Application) -> AsyncIterator[None]:
        async with make_producer(settings) as producer:
            app[PRODUCER] = producer
            yield

    return open_producer
