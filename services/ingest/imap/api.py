"""The IMAP account API: POST /v1/accounts (provider imap) and GET /v1/accounts/{id}/sync.

The handlers are plain functions (tested directly); :func:`add_imap_account_routes` mounts them
on an aiohttp app that already authenticates API keys (the gateway) and gives them the caller's
application id. The password is encrypted before it is stored and is never returned.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, Self

from aiohttp import web
from aiokafka import AIOKafkaProducer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from libs.accounts import AccountDirectory, create_account
from libs.http import problem_response
from libs.shards import ShardRouter
from services.ingest.imap.distribution import publish_account
from services.ingest.imap.settings import ImapSettings
from services.ingest.imap.store import SyncStore

__all__ = ["ImapAccountIn", "add_imap_account_routes", "create_imap_account", "imap_account_view"]

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ImapAccountIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["imap"] = "imap"
    email: Annotated[str, StringConstraints(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")]
    host: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    port: Annotated[int, Field(gt=0, lt=65536)] = 993
    tls_mode: Literal["implicit", "starttls", "none"] = "implicit"
    username: Annotated[str, StringConstraints(min_length=1, max_length=320)]
    password: Annotated[str, StringConstraints(min_length=1, max_length=1000)] = Field(repr=False)
    shard: int | None = None

    @model_validator(mode="after")
    def _plaintext_only_on_loopback(self) -> Self:
        if self.tls_mode == "none" and not _is_loopback(self.host):
            raise ValueError("tls_mode 'none' is allowed only for a loopback host")
        if self.tls_mode == "starttls":
            raise ValueError("tls_mode 'starttls' is not supported yet; use 'implicit'")
        return self


async def create_imap_account(
    router: ShardRouter,
    store: SyncStore,
    producer: AIOKafkaProducer,
    settings: ImapSettings,
    application_id: int,
    body: ImapAccountIn,
) -> dict[str, Any]:
    account = await create_account(router, application_id, body.email, provider="imap", shard=body.shard)
    await store.insert_account(
        account.id, application_id, body.host, body.port, body.tls_mode, body.username, body.password
    )
    await publish_account(producer, settings, account.id, 1)
    view = await imap_account_view(store, account.id)
    return {"id": str(account.id), "email": account.email, "provider": "imap", **(view or {})}


async def update_imap_credentials(
    store: SyncStore,
    producer: AIOKafkaProducer,
    settings: ImapSettings,
    account_id: int,
    username: str,
    password: str,
) -> int:
    """New credentials restart a sync stopped by an authentication failure."""
    version = await store.update_credentials(account_id, username, password)
    await publish_account(producer, settings, account_id, version)
    return version


async def imap_account_view(store: SyncStore, account_id: int) -> dict[str, Any] | None:
    account = await store.account_public(account_id)
    if account is None:
        return None
    return {**account, "folders": await store.folders_public(account_id)}


def add_imap_account_routes(
    app: web.Application,
    *,
    application_of: Callable[[web.Request], Awaitable[int]],
    get_router: Callable[[], ShardRouter],
    get_directory: Callable[[], AccountDirectory],
    get_store: Callable[[], SyncStore],
    get_producer: Callable[[], AIOKafkaProducer],
    settings: ImapSettings,
) -> None:
    """``application_of`` authenticates the request (raising the gateway's 401) and returns the
    caller's application id."""

    async def post_account(request: web.Request) -> web.StreamResponse:
        app_id = await application_of(request)
        try:
            body = ImapAccountIn.model_validate_json(await request.read())
        except ValidationError as exc:
            return problem_response(422, "Invalid account", "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_input=False)
            ))  # fmt: skip
        created = await create_imap_account(get_router(), get_store(), get_producer(), settings, app_id, body)
        return web.json_response(created, status=201)

    async def get_sync(request: web.Request) -> web.StreamResponse:
        app_id = await application_of(request)
        try:
            account_id = int(request.match_info["account_id"])
        except ValueError:
            return problem_response(404, "Not found", "no such account")
        if await get_directory().owned_account(app_id, account_id) is None:
            return problem_response(404, "Not found", "no such account")
        view = await imap_account_view(get_store(), account_id)
        if view is None:
            return problem_response(404, "Not found", "not an IMAP account")
        return web.json_response({"id": str(account_id), **view})

    app.router.add_post("/v1/accounts", post_account)
    app.router.add_get("/v1/accounts/{account_id}/sync", get_sync)
