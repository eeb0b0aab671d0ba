"""persist: postflight records into the account shards (port 8083 for health and metrics).

It also runs the change relay (:mod:`services.persist.relay`), which publishes the shards'
``changes`` rows to flightlog.changes; it is left after the worker, so SIGTERM drains both.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

from libs.kafka import PERSIST_RETRY, POSTFLIGHT, make_consumer, make_producer
from libs.service import ServiceContext, ServiceDefinition
from libs.shards import ShardRouter
from services.persist.relay import ChangeRelay, RelaySettings
from services.persist.worker import PersistSettings, PersistWorker


async def main(ctx: ServiceContext) -> None:
    s = ctx.settings
    relay_settings = RelaySettings()
    persist_settings = PersistSettings()  # before any connection: a bad value fails at start
    async with AsyncExitStack() as stack:
        router = await stack.enter_async_context(ShardRouter(s))
        producer = await stack.enter_async_context(make_producer(s))
        relay = None
        if relay_settings.relay_enabled:
            relay_producer = await stack.enter_async_context(make_producer(s))
            relay = await stack.enter_async_context(ChangeRelay(router, relay_producer, relay_settings))
        group = persist_settings.persist_group_id
        consumer = await stack.enter_async_context(
            make_consumer(
                s,
                POSTFLIGHT,
                group_id=group,
                max_partition_fetch_bytes=4 * 1024**2,
                fetch_min_bytes=persist_settings.persist_fetch_min_bytes,
                fetch_max_wait_ms=persist_settings.persist_fetch_max_wait_ms,
            )
        )
        retry = await stack.enter_async_context(make_consumer(s, PERSIST_RETRY, group_id=f"{group}-retry"))
        ctx.set_ready()
        worker = PersistWorker(
            router,
            producer,
            consumer,
            retry,
            settings=persist_settings,
            on_changes=relay.notify if relay is not None else None,
        )
        await worker.run(ctx.stopping)


# A record allocates about a hundred objects: at 50,000 the collector runs every few hundred
# records (53 -> 45 us a record in a 2,000-record-batch microbenchmark).
DEFINITION = ServiceDefinition(name="persist", default_port=8083, main=main, gc_young_objects=50_000)
