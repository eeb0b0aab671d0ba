"""The IMAP account API: POST /v1/accounts (provider imap), GET /v1/accounts/{id}/sync,
PATCH /v1/accounts/{id}/credentials (new username, password or OAuth2 tokens; restarts a sync
stopped by an authentication failure) and DELETE /v1/accounts/{id}/credentials (stop syncing,
forget the password or tokens).

An account logs in with a password, or with OAuth2 (``oauth``: the provider, the refresh token
and optionally a first access token; ingest refreshes it, :mod:`libs.imap_login`). The operations
are plain functions (tested directly); ingest's sync workers pick their effects up from the
accounts topic (:func:`libs.imap_accounts.publish_account`). Passwords and tokens are encrypted
before they are stored and are never returned.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal, Self, TypeVar

from aiohttp import web
from aiokafka import AIOKafkaProducer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic.config import JsonDict

from libs.accounts import Application, create_account
from libs.crypto import SecretBox
from libs.http import invalid_body
from libs.imap_accounts import ImapAccountsSettings, OAuthCredentials, SyncStore, publish_account
from libs.imap_login import AccountLogin
from libs.oauth import (
    ACCESS_TOKEN_PATTERN,
    MAX_ACCESS_TOKEN_CHARS,
    MAX_REFRESH_TOKEN_CHARS,
    REFRESH_TOKEN_PATTERN,
    OAuthSettings,
    ProviderNotConfigured,
    TokenClient,
)
from libs.openapi import Answer, ApiRoutes, Operation
from libs.outbound import AddressRefused, resolve_public
from libs.resources import PRODUCER, ROUTER
from libs.shards import ShardRouter, UnknownShard
from services.gateway import schemas
from services.gateway.auth import authenticated, owned_account
from services.gateway.errors import ApiError, NotFound
from services.gateway.openapi import ACCOUNT

__all__ = [
    "API",
    "IMAP_LOGIN",
    "IMAP_OAUTH",
    "IMAP_SETTINGS",
    "IMAP_STORE",
    "ImapCredentials",
    "NewImapAccount",
    "OAuthGrant",
    "add_imap_account_routes",
    "create_imap_account",
    "disconnect_imap_account",
    "imap_account_view",
    "update_imap_credentials",
]

IMAP_SETTINGS: Final = web.AppKey("imap_accounts_settings", ImapAccountsSettings)
IMAP_STORE: Final = web.AppKey("imap_store", SyncStore)
IMAP_OAUTH: Final = web.AppKey("imap_oauth_settings", OAuthSettings)
IMAP_LOGIN: Final = web.AppKey("imap_login", AccountLogin)

API: Final = ApiRoutes()
_SYNC: Final = (Answer(200, "the sync state", schemas.ImapSync),)

ModelT = TypeVar("ModelT", bound=BaseModel)

# No C0 control character or DEL: a CR or LF would end the IMAP command it is sent in.
_NO_CONTROLS: Final = r"^[^\x00-\x1f\x7f]*$"
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OAuthGrant(BaseModel):
    """An OAuth2 grant for the mailbox, as the application obtained it from the provider."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    provider: Literal["google", "microsoft", "generic"] = Field(
        description="whose tokens: Google, Microsoft (Entra ID) or the platform's generic provider;"
        " the platform must have a client registered with it"
    )
    refresh_token: Annotated[
        str,
        StringConstraints(min_length=1, max_length=MAX_REFRESH_TOKEN_CHARS, pattern=REFRESH_TOKEN_PATTERN),
    ] = Field(repr=False, description="encrypted at rest, never returned")
    access_token: (
        Annotated[
            str,
            StringConstraints(min_length=1, max_length=MAX_ACCESS_TOKEN_CHARS, pattern=ACCESS_TOKEN_PATTERN),
        ]
        | None
    ) = Field(default=None, repr=False, description="left out: one is obtained with the refresh token")
    access_token_expires_in: Annotated[int, Field(gt=0, le=366 * 86_400)] | None = Field(
        default=None,
        description="seconds the access token is valid for, as the token endpoint said (expires_in)",
    )
    sasl_mechanism: Literal["xoauth2", "oauthbearer"] | None = Field(
        default=None, description="left out: OAUTHBEARER when the server offers it, else XOAUTH2"
    )

    def credentials(self) -> OAuthCredentials:
        expires = self.access_token_expires_in
        return OAuthCredentials(
            self.provider,
            self.refresh_token,
            self.access_token,
            datetime.now(UTC) + timedelta(seconds=expires) if expires and self.access_token else None,
            self.sasl_mechanism,
        )


# A password or an OAuth2 grant, never both (checked by _one_secret; said in the schema)
_ONE_SECRET: Final[JsonDict] = {"oneOf": [{"required": ["password"]}, {"required": ["oauth"]}]}


class NewImapAccount(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, json_schema_extra=_ONE_SECRET)

    provider: Literal["imap"] = "imap"
    email: Annotated[str, StringConstraints(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")]
    host: Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=_NO_CONTROLS)]
    port: Annotated[int, Field(gt=0, lt=65536)] = 993
    tls_mode: Literal["implicit", "starttls", "none"] = Field(
        "implicit",
        description="implicit TLS (IMAPS), STARTTLS before login (no plaintext fallback), or none,"
        " only for a loopback host",
    )
    username: Annotated[str, StringConstraints(min_length=1, max_length=320, pattern=_NO_CONTROLS)]
    password: (
        Annotated[str, StringConstraints(min_length=1, max_length=1000, pattern=_NO_CONTROLS)] | None
    ) = Field(default=None, repr=False, description="encrypted at rest, never returned; or oauth")
    oauth: OAuthGrant | None = Field(default=None, description="log in with OAuth2 instead of a password")
    shard: Annotated[int, Field(ge=0, le=65535)] | None = None

    @model_validator(mode="after")
    def _plaintext_only_on_loopback(self) -> Self:
        if self.tls_mode == "none" and not _is_loopback(self.host):
            raise ValueError("tls_mode 'none' is allowed only for a loopback host")
        _one_secret(self.password, self.oauth)
        return self


def _one_secret(password: str | None, oauth: OAuthGrant | None) -> None:
    if (password is None) == (oauth is None):
        raise ValueError("give either password or oauth")


class ImapCredentials(BaseModel):
    """New credentials, a password or an OAuth2 grant; a username left out keeps the current one."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, json_schema_extra=_ONE_SECRET)

    username: Annotated[str, StringConstraints(min_length=1, max_length=320, pattern=_NO_CONTROLS)] | None = (
        Field(None, description="left out: the current one")
    )
    password: (
        Annotated[str, StringConstraints(min_length=1, max_length=1000, pattern=_NO_CONTROLS)] | None
    ) = Field(None, repr=False)
    oauth: OAuthGrant | None = Field(default=None, description="switch to (or renew) OAuth2 tokens")

    @model_validator(mode="after")
    def _one(self) -> Self:
        _one_secret(self.password, self.oauth)
        return self


async def check_server(settings: ImapAccountsSettings, host: str, port: int) -> None:
    """422 unless ``port`` is an allowed IMAP port and ``host`` resolves to public addresses only
    (or private ones are allowed): the platform is not a port scanner of the networks it sits
    in. The answer does not say whether anything listens there."""
    if port not in settings.imap_allowed_ports:
        allowed = ", ".join(str(p) for p in settings.imap_allowed_ports)
        raise ApiError(422, "Port not allowed", f"IMAP accounts may use the ports {allowed}")
    if settings.imap_allow_private_hosts:
        return  # nothing to refuse; the sync resolves the name when it connects
    try:
        await resolve_public(host, port, allow_private=False)
    except AddressRefused as exc:
        raise ApiError(422, "Host not allowed", str(exc)) from None


def check_provider(settings: OAuthSettings, oauth: OAuthGrant | None) -> None:
    """422 unless the grant's provider has a client registered here."""
    if oauth is None:
        return
    try:
        settings.provider(oauth.provider)
    except ProviderNotConfigured:
        raise ApiError(
            422, "OAuth2 provider not configured", f"this platform has no OAuth2 client for {oauth.provider}"
        ) from None


async def create_imap_account(
    router: ShardRouter,
    store: SyncStore,
    producer: AIOKafkaProducer,
    settings: ImapAccountsSettings,
    application_id: int,
    body: NewImapAccount,
) -> dict[str, Any]:
    account = await create_account(router, application_id, body.email, provider="imap", shard=body.shard)
    await store.insert_account(
        account.id, application_id, body.host, body.port, body.tls_mode, body.username, body.password or "",
        body.oauth.credentials() if body.oauth else None,
    )  # fmt: skip
    await publish_account(producer, settings, account.id, 1)
    view = await imap_account_view(store, account.id)
    return {"id": str(account.id), "email": account.email, "provider": "imap", **(view or {})}


async def update_imap_credentials(
    store: SyncStore,
    producer: AIOKafkaProducer,
    settings: ImapAccountsSettings,
    account_id: int,
    username: str,
    password: str,
    oauth: OAuthCredentials | None = None,
) -> int:
    """New credentials (a password, or with ``oauth`` tokens) restart a sync stopped by an
    authentication failure."""
    version = await store.update_credentials(account_id, username, password, oauth)
    await publish_account(producer, settings, account_id, version)
    return version


async def disconnect_imap_account(
    store: SyncStore, producer: AIOKafkaProducer, settings: ImapAccountsSettings, account_id: int
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


async def _imap_account(request: web.Request, app: Application) -> tuple[int, dict[str, Any]]:
    """The path's IMAP account and its public view, or the 404 a foreign or missing account
    gets alike."""
    account_id = (await owned_account(request, app)).id
    current = await request.app[IMAP_STORE].account_public(account_id)
    if current is None:
        raise ApiError(404, "Not found", f"account {account_id} is not an IMAP account")
    return account_id, current


def _body(model: type[ModelT], raw: bytes, title: str) -> ModelT:
    # Validated from the bytes in pydantic's strict JSON mode ("993" is not a port).
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid_body(exc, title) from None


@API.post(
    "/v1/accounts",
    Operation(
        "createImapAccount",
        "accounts",
        "Connect an IMAP mailbox: an account that ingest keeps in sync",
        (Answer(201, "the account and its sync state", schemas.ImapAccount),),
        description="The password is encrypted at rest and never returned. The account is announced"
        " on flightlog.imap-accounts; one ingest instance picks it up and syncs it (GET .../sync).",
        body=NewImapAccount,
    ),
)
@authenticated
async def post_account(request: web.Request, app: Application) -> web.StreamResponse:
    body = _body(NewImapAccount, await request.read(), "Invalid account")
    check_provider(request.app[IMAP_OAUTH], body.oauth)  # before any name is resolved
    await check_server(request.app[IMAP_SETTINGS], body.host, body.port)
    try:
        created = await create_imap_account(
            request.app[ROUTER], request.app[IMAP_STORE], request.app[PRODUCER],
            request.app[IMAP_SETTINGS], app.id, body,
        )  # fmt: skip
    except UnknownShard as exc:
        raise ApiError(422, "Unknown shard", str(exc)) from None
    return web.json_response(created, status=201)


@API.get(
    "/v1/accounts/{account_id}/sync",
    Operation(
        "getImapSync",
        "accounts",
        "An IMAP account's sync state, per folder",
        _SYNC,
        params=(ACCOUNT,),
        problems=(404,),
    ),
)
@authenticated
async def get_sync(request: web.Request, app: Application) -> web.StreamResponse:
    account_id = (await owned_account(request, app)).id
    view = await imap_account_view(request.app[IMAP_STORE], account_id)
    if view is None:
        raise ApiError(404, "Not found", f"account {account_id} is not an IMAP account")
    return web.json_response({"id": str(account_id), **view})


@API.patch(
    "/v1/accounts/{account_id}/credentials",
    Operation(
        "updateImapCredentials",
        "accounts",
        "New IMAP credentials; restarts a sync stopped by an authentication failure",
        _SYNC,
        params=(ACCOUNT,),
        body=ImapCredentials,
        problems=(404,),
    ),
)
@authenticated
async def patch_credentials(request: web.Request, app: Application) -> web.StreamResponse:
    account_id, current = await _imap_account(request, app)
    store = request.app[IMAP_STORE]
    body = _body(ImapCredentials, await request.read(), "Invalid credentials")
    check_provider(request.app[IMAP_OAUTH], body.oauth)
    oauth = body.oauth.credentials() if body.oauth else None
    await update_imap_credentials(
        store, request.app[PRODUCER], request.app[IMAP_SETTINGS], account_id,
        body.username or current["username"], body.password or "", oauth,
    )  # fmt: skip
    return await _view(store, account_id)


@API.delete(
    "/v1/accounts/{account_id}/credentials",
    Operation(
        "disconnectImapAccount",
        "accounts",
        "Stop syncing and forget the password (state disconnected); synced messages stay",
        _SYNC,
        description="New credentials (PATCH) connect the account again.",
        params=(ACCOUNT,),
        problems=(404,),
    ),
)
@authenticated
async def delete_credentials(request: web.Request, app: Application) -> web.StreamResponse:
    account_id, _ = await _imap_account(request, app)
    store = request.app[IMAP_STORE]
    await disconnect_imap_account(store, request.app[PRODUCER], request.app[IMAP_SETTINGS], account_id)
    return await _view(store, account_id)


async def _view(store: SyncStore, account_id: int) -> web.Response:
    view = await imap_account_view(store, account_id)
    if view is None:  # the account was erased meanwhile
        raise NotFound("account", str(account_id))
    return web.json_response({"id": str(account_id), **view})


async def _store(app: web.Application) -> AsyncIterator[None]:
    app[IMAP_STORE] = SyncStore(app[ROUTER], SecretBox.from_settings())
    # content fetches log OAuth2 accounts in, refreshing their tokens as ingest does
    async with TokenClient(app[IMAP_OAUTH]) as tokens:
        app[IMAP_LOGIN] = AccountLogin(app[IMAP_STORE], tokens, app[IMAP_OAUTH])
        yield


def add_imap_account_routes(
    app: web.Application, settings: ImapAccountsSettings, oauth: OAuthSettings | None = None
) -> None:
    """Add the routes and their store (a cleanup context after the gateway's router)."""
    app[IMAP_SETTINGS] = settings
    app[IMAP_OAUTH] = oauth or OAuthSettings()
    app.cleanup_ctx.append(_store)
    API.register(app)
