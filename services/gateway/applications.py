"""What an application manages about itself: its accounts (read) and its API keys.

=======  ===========================  ==============================================================
GET      /v1/accounts                 the application's accounts, in id order (``page_token``)
GET      /v1/accounts/{account_id}    one account
GET      /v1/api-keys                 the application's keys (prefix and dates; never the key)
POST     /v1/api-keys                 a new key, shown once in the answer
DELETE   /v1/api-keys/{key_id}        revoke a key (not the last active one)
=======  ===========================  ==============================================================

A revoked key is refused at once by the gateway that revoked it and within
``gateway_key_cache_ttl_s`` by every other replica.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from libs.accounts import (
    Account,
    ApiKey,
    Application,
    create_api_key,
    list_accounts,
    list_api_keys,
    revoke_api_key,
)
from libs.cursor import CursorError, PageToken, decode_page_token, encode_page_token
from libs.ids import shard_of
from libs.openapi import Answer, ApiRoutes, Operation
from libs.resources import DIRECTORY, ROUTER
from services.gateway import schemas
from services.gateway.auth import authenticated, owned_account, path_id
from services.gateway.constants import DEFAULT_PAGE_SIZE, MAX_ACCOUNTS_PAGE_SIZE, MAX_ACTIVE_KEYS
from services.gateway.errors import ApiError, NotFound
from services.gateway.openapi import ACCOUNT, TOKEN, id_param, query
from services.gateway.params import Query
from services.gateway.resources import TOKEN_KEY

__all__ = ["API", "account_json", "add_application_routes", "key_json"]

API: Final = ApiRoutes()


def account_json(account: Account) -> dict[str, Any]:
    return {
        "id": str(account.id),
        "application_id": str(account.application_id),
        "email": account.email,
        "provider": account.provider,
        "shard": shard_of(account.id),
    }


def key_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": str(key.id),
        "prefix": key.key_prefix,
        "created_at": key.created_at.isoformat(timespec="microseconds") + "Z",
        "revoked_at": None
        if key.revoked_at is None
        else key.revoked_at.isoformat(timespec="microseconds") + "Z",
    }


@API.get(
    "/v1/accounts",
    Operation(
        "listAccounts",
        "accounts",
        "The application's accounts, in id order",
        (Answer(200, "a page of accounts", schemas.AccountPage),),
        params=(
            query(
                "limit",
                {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_ACCOUNTS_PAGE_SIZE,
                    "default": DEFAULT_PAGE_SIZE,
                },
                "page size",
            ),
            query("page_token", TOKEN, "next_page_token of the previous page"),
        ),
    ),
)
@authenticated
async def get_accounts(request: web.Request, app: Application) -> web.StreamResponse:
    p = Query(request, {"limit", "page_token"})
    token_key = request.app[TOKEN_KEY]
    limit = p.integer("limit", DEFAULT_PAGE_SIZE, 1, MAX_ACCOUNTS_PAGE_SIZE)
    token = p.text("page_token", max_length=128)
    after = 0
    if token is not None:
        try:
            after = decode_page_token(token_key, token, 0, app.id).message_id
        except CursorError as exc:
            raise ApiError(400, "Invalid page_token", str(exc)) from None
    found = await list_accounts(request.app[ROUTER], app.id, after_id=after, limit=limit + 1)
    page = found[:limit]
    next_token = None
    if len(found) > limit:
        next_token = encode_page_token(token_key, PageToken(0, app.id, 0, page[-1].id))
    return web.json_response({"data": [account_json(a) for a in page], "next_page_token": next_token})


@API.get(
    "/v1/accounts/{account_id}",
    Operation(
        "getAccount",
        "accounts",
        "One account",
        (Answer(200, "the account", schemas.Account),),
        params=(ACCOUNT,),
        problems=(404,),
    ),
)
@authenticated
async def get_account(request: web.Request, app: Application) -> web.StreamResponse:
    Query(request, ())
    return web.json_response(account_json(await owned_account(request, app)))


@API.get(
    "/v1/api-keys",
    Operation(
        "listApiKeys",
        "keys",
        "The application's API keys (never the keys themselves)",
        (Answer(200, "the keys", schemas.ApiKeyList),),
    ),
)
@authenticated
async def get_keys(request: web.Request, app: Application) -> web.StreamResponse:
    Query(request, ())
    keys = await list_api_keys(request.app[ROUTER], app.id)
    return web.json_response({"data": [key_json(k) for k in keys]})


@API.post(
    "/v1/api-keys",
    Operation(
        "createApiKey",
        "keys",
        "A new API key, shown once",
        (Answer(201, "the key", schemas.NewApiKey),),
        problems=(409,),
    ),
)
@authenticated
async def post_key(request: web.Request, app: Application) -> web.StreamResponse:
    Query(request, ())
    router = request.app[ROUTER]
    active = [k for k in await list_api_keys(router, app.id) if k.revoked_at is None]
    if len(active) >= MAX_ACTIVE_KEYS:
        raise ApiError(
            409,
            "Too many keys",
            f"an application has at most {MAX_ACTIVE_KEYS} active keys; revoke one first",
        )
    key, secret = await create_api_key(router, app.id)
    return web.json_response({**key_json(key), "api_key": secret}, status=201)


@API.delete(
    "/v1/api-keys/{key_id}",
    Operation(
        "revokeApiKey",
        "keys",
        "Revoke a key (not the application's last active one)",
        (Answer(200, "the revoked key", schemas.ApiKey),),
        params=(id_param("key_id", "one of the application's keys"),),
        problems=(404, 409),
    ),
)
@authenticated
async def delete_key(request: web.Request, app: Application) -> web.StreamResponse:
    Query(request, ())
    router = request.app[ROUTER]
    key_id = path_id(request, "key_id", "API key")
    keys = await list_api_keys(router, app.id)
    target = next((k for k in keys if k.id == key_id), None)
    if target is None:
        raise NotFound("API key", str(key_id))
    if target.revoked_at is None and not any(k.revoked_at is None and k.id != key_id for k in keys):
        raise ApiError(
            409, "Last active key", "create another key before revoking the application's last one"
        )
    revoked = await revoke_api_key(router, app.id, key_id)
    if revoked is None:
        raise NotFound("API key", str(key_id))
    key, digest = revoked
    request.app[DIRECTORY].forget_key(digest)
    return web.json_response(key_json(key))


def add_application_routes(app: web.Application) -> None:
    API.register(app)
