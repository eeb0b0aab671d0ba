"""The dispatcher as a service of its own (port 8084 for health and metrics).

The gateway may run it in-process instead; several instances are safe (one delivers at a time).
"""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer

from libs.kafka import CHANGES, make_consumer
from libs.service import ServiceContext, ServiceDefinition
from libs.shards import ShardRouter
from services.gateway.webhooks.dispatcher import WebhookDispatcher
from services.gateway.webhooks.settings import WebhookSettings


def consumer_factory(settings: WebhookSettings) -> AIOKafkaConsumer:
    return make_consumer(settings, CHANGES, group_id=settings.webhooks_consumer_group)


async def main(ctx: ServiceContext) -> None:
    settings = WebhookSettings()
    async with (
        ShardRouter(settings) as router,
        WebhookDispatcher(router, settings, lambda: consumer_factory(settings)),
    ):
        ctx.set_ready()
        await ctx.stopping.wait()


DEFINITION = ServiceDefinition(
    name="webhooks", default_port=8084, main=main, secrets=((WebhookSettings, "webhooks_secret_key"),)
)
