"""The IMAP account API: POST /v1/accounts (provider imap), GET /v1/accounts/{id}/sync and
PATCH /v1/accounts/{id}/credentials (new username and/or password; restarts a sync stopped by an
authentication failure).

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
from libs.ids import InvalidId, parse_public_id
from libs.imap_accounts import SyncStore, publish_account
from libs.shards import ShardRouter, UnknownShard
from services.ingest.imap.settings import ImapSettings

__all__ = [
    "ImapAccountIn",
    "ImapCredentialsIn",
    "add_imap_account_routes",
    "create_imap_account",
    "disconnect_imap_account",
    "imap_account_view",
    "update_imap_credentials",
]

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ImapAccountIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    provider: Literal["imap"] = "imap"
    email: Annotated[str, StringConstraints(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")]
    host: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    port: Annotated[int, Field(gt=0, lt=65536)] = 993
    tls_mode: Literal["implicit", "starttls", "none"] = "implicit"
    username: Annotated[str, StringConstraints(min_length=1, max_length=320)]
    password: Annotated[str, StringConstraints(min_length=1, max_length=1000)] = Field(repr=False)
    shard: Annotated[int, Field(ge=0, le=65535)] | None = None

    @model_validator(mode="after")
    def _plaintext_only_on_loopback(self) -> Self:
        if self.tls_mode == "none" and not _is_loopback(self.host):
            raise ValueError("tls_mode 'none' is allowed only for a loopback host")
        return self


class ImapCredentialsIn(BaseModel):
    """New credentials; a username left out keeps the current one."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    username: Annotated[str, StringConstraints(min_length=1, max_length=320)] | None = None
    password: Annotated[str, StringConstraints(min_length=1, max_length=1000)] = Field(repr=False)


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


async def disconnect_imap_account(
    store: SyncStore, producer: AIOKafkaProducer, settings: ImapSettings, account_id: int
) -> None:
    """Stop syncing and forget the password; the messages already synced stay. The tombstone on
    the accounts topic stops the worker wherever it runs, and keeps it stopped after restarts."""
    await store.disconnect(account_id)
    await publish_account(producer, settings, account_id, None)


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

    def invalid(title: str, exc: ValidationError) -> web.Response:
        return problem_response(422, title, "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors(include_input=False)
        ))  # fmt: skip

    async def owned_imap_account(request: web.Request) -> int | web.Response:
        """The path's account id, or the 404 that a foreign and a missing account get alike."""
        app_id = await application_of(request)
        text = request.match_info["account_id"]
        try:
            account_id = parse_public_id(text)
        except InvalidId:
            return problem_response(404, "Not found", f"account {text[:40]} not found")
        if await get_directory().owned_account(app_id, account_id) is None:
            return problem_response(404, "Not found", f"account {account_id} not found")
        return account_id

    async def post_account(request: web.Request) -> web.StreamResponse:
        app_id = await application_of(request)
        try:
            body = ImapAccountIn.model_validate_json(await request.read())
        except ValidationError as exc:
            return invalid("Invalid account", exc)
        try:
            created = await create_imap_account(
                get_router(), get_store(), get_producer(), settings, app_id, body
            )
        except UnknownShard as exc:
            return problem_response(422, "Unknown shard", str(exc))
        return web.json_response(created, status=201)

    async def get_sync(request: web.Request) -> web.StreamResponse:
        account_id = await owned_imap_account(request)
        if isinstance(account_id, web.Response):
            return account_id
        view = await imap_account_view(get_store(), account_id)
        if view is None:
            return problem_response(404, "Not found", f"account {account_id} is not an IMAP account")
        return web.json_response({"id": str(account_id), **view})

    async def patch_credentials(request: web.Request) -> web.StreamResponse:
        account_id = await owned_imap_account(request)
        if isinstance(account_id, web.Response):
            return account_id
        store = get_store()
        current = await store.account_public(account_id)
        if current is None:
            return problem_response(404, "Not found", f"account {account_id} is not an IMAP account")
        try:
            body = ImapCredentialsIn.model_validate_json(await request.read())
        except ValidationError as exc:
            return invalid("Invalid credentials", exc)
        await update_imap_credentials(
            store, get_producer(), settings, account_id, body.username or current["username"], body.password
        )
        view = await imap_account_view(store, account_id)
        assert view is not None
        return web.json_response({"id": str(account_id), **view})

    async def delete_credentials(request: web.Request) -> web.StreamResponse:
        account_id = await owned_imap_account(request)
        if isinstance(account_id, web.Response):
            return account_id
        store = get_store()
        if await store.account_public(account_id) is None:
            return problem_response(404, "Not found", f"account {account_id} is not an IMAP account")
        await disconnect_imap_account(store, get_producer(), settings, account_id)
        view = await imap_account_view(store, account_id)
        assert view is not None
        return web.json_response({"id": str(account_id), **view})

    app.router.add_post("/v1/accounts", post_account)
    app.router.add_get("/v1/accounts/{account_id}/sync", get_sync, allow_head=False)
    app.router.add_patch("/v1/accounts/{account_id}/credentials", patch_credentials)
    app.router.add_delete("/v1/accounts/{account_id}/credentials", delete_credentials)
