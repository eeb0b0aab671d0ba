"""sender: submits the outbox's messages over SMTP (port 8085 for health and metrics).

See :mod:`services.sender.worker` for why it is a service of its own and how it sends once.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

from libs.crypto import SecretBox, SecretsSettings
from libs.imap_accounts import ImapAccountsSettings, SyncStore
from libs.kafka import make_producer
from libs.outbox import OutboxStore, SmtpSettings
from libs.service import ServiceContext, ServiceDefinition
from libs.shards import ShardRouter
from services.sender.settings import SenderSettings
from services.sender.worker import Sender

__all__ = ["DEFINITION"]


async def main(ctx: ServiceContext) -> None:
    s = ctx.settings
    settings, smtp = SenderSettings(), SmtpSettings()  # before any connection: a bad value fails at start
    box = SecretBox.from_settings()
    async with AsyncExitStack() as stack:
        router = await stack.enter_async_context(ShardRouter(s))
        producer = await stack.enter_async_context(make_producer(s))
        sender = Sender(
            router, OutboxStore(router, box), producer, s.instance_id, settings, smtp,
            SyncStore(router, box), ImapAccountsSettings(),
        )  # fmt: skip
        ctx.set_ready()
        await sender.run(ctx.stopping)


DEFINITION = ServiceDefinition(
    name="sender", default_port=8085, main=main, secrets=((SecretsSettings, "secrets_key"),)
)
