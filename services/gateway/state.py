"""The gateway's shared state, filled in by ``main`` once its resources are open."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web
from aiokafka import AIOKafkaProducer

from libs.accounts import AccountDirectory
from libs.imap_accounts import SyncStore
from libs.shards import ShardRouter
from services.gateway.settings import GatewaySettings

__all__ = ["STATE", "GatewayState"]


@dataclass(slots=True)
class GatewayState:
    """Routes answer 503 until ``main`` has set the router (the runner's readiness gate)."""

    settings: GatewaySettings = field(default_factory=GatewaySettings)
    admin_key: str = ""
    router: ShardRouter | None = None
    directory: AccountDirectory | None = None
    producer: AIOKafkaProducer | None = None  # lifecycle events (PATCH, DELETE) and IMAP accounts
    imap_store: SyncStore | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def shards(self) -> ShardRouter:
        assert self.router is not None, "routes are gated until the router is open"
        return self.router

    @property
    def accounts(self) -> AccountDirectory:
        assert self.directory is not None, "routes are gated until the router is open"
        return self.directory

    @property
    def kafka(self) -> AIOKafkaProducer:
        assert self.producer is not None, "routes are gated until the producer is open"
        return self.producer

    @property
    def imap(self) -> SyncStore:
        assert self.imap_store is not None, "routes are gated until the router is open"
        return self.imap_store

    @property
    def token_key(self) -> bytes:
        return self.settings.gateway_token_secret.encode()


STATE: Final = web.AppKey("gateway_state", GatewayState)
