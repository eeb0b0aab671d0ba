"""Admin paths of the gateway: applications (tenants), their first keys, and accounts on shards.

Guarded by the operator's admin key (``FLIGHTLOG_ADMIN_API_KEY``), never by an application key.

=======  ===============================================  ==========================================
POST     /v1/admin/applications                           a new application and its first API key
POST     /v1/admin/applications/{application_id}/api-keys  another key (e.g. after losing every key)
POST     /v1/admin/accounts                               an account of an application, on a shard
=======  ===============================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Final, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from libs.accounts import application_exists, create_account, create_api_key, create_application
from libs.authn import check_admin_key
from libs.http import invalid_body, read_json
from libs.openapi import Answer, ApiRoutes, Operation
from libs.resources import ROUTER
from libs.shards import UnknownShard
from services.gateway import schemas
from services.gateway.applications import account_json, key_json
from services.gateway.auth import path_id
from services.gateway.constants import MAX_BODY_BYTES
from services.gateway.errors import ApiError, NotFound
from services.gateway.openapi import ADMIN, id_param
from services.gateway.params import Query
from services.gateway.resources import SETTINGS

__all__ = ["ADMIN_PREFIX", "API", "NewAccount", "NewApplication", "add_admin_routes"]

# Every admin route is under this prefix, served on the management port only (libs.service).
ADMIN_PREFIX: Final = "/v1/admin/"

API: Final = ApiRoutes()


class NewApplication(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON's true is not an id, "5" no number
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]


class NewAccount(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    application_id: Annotated[int, Field(gt=0, lt=2**63)]
    email: Annotated[str, StringConstraints(min_length=3, max_length=320)]
    provider: Annotated[str, StringConstraints(pattern="^(events|imap)$")] = "events"
    shard: Annotated[int, Field(ge=0, le=65535)] | None = None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _admin_only(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        check_admin_key(request, request.app[SETTINGS].admin_api_key)
        Query(request, ())
        return await handler(request)

    return guarded


M = TypeVar("M", bound=BaseModel)


async def _body(request: web.Request, model: type[M]) -> M:
    data = await read_json(request, max_bytes=MAX_BODY_BYTES)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_body(exc) from None


@API.post(
    "/v1/admin/applications",
    Operation(
        "createApplication",
        "admin",
        "A new application and its first API key",
        (Answer(201, "the application", schemas.Application),),
        body=NewApplication,
        security=ADMIN,
    ),
)
@_admin_only
async def post_application(request: web.Request) -> web.StreamResponse:
    body = await _body(request, NewApplication)
    app, key = await create_application(request.app[ROUTER], body.name)
    return web.json_response({"id": str(app.id), "name": app.name, "api_key": key}, status=201)


@API.post(
    "/v1/admin/applications/{application_id}/api-keys",
    Operation(
        "createApplicationKey",
        "admin",
        "Another API key for an application",
        (Answer(201, "the key", schemas.NewApiKey),),
        params=(id_param("application_id", "an application"),),
        problems=(404,),
        security=ADMIN,
    ),
)
@_admin_only
async def post_application_key(request: web.Request) -> web.StreamResponse:
    application_id = path_id(request, "application_id", "application")
    router = request.app[ROUTER]
    if application_id >= 2**63 or not await application_exists(router, application_id):
        raise NotFound("application", str(application_id))
    key, secret = await create_api_key(router, application_id)
    return web.json_response({**key_json(key), "api_key": secret}, status=201)


@API.post(
    "/v1/admin/accounts",
    Operation(
        "createAccount",
        "admin",
        "An account of an application, on a shard (the least loaded when not named)",
        (Answer(201, "the account", schemas.Account),),
        body=NewAccount,
        security=ADMIN,
    ),
)
@_admin_only
async def post_account(request: web.Request) -> web.StreamResponse:
    body = await _body(request, NewAccount)
    router = request.app[ROUTER]
    if not await application_exists(router, body.application_id):
        raise ApiError(422, "Unknown application", f"application {body.application_id} does not exist")
    try:
        account = await create_account(
            router, body.application_id, body.email, provider=body.provider, shard=body.shard
        )
    except UnknownShard as exc:
        raise ApiError(422, "Unknown shard", str(exc)) from None
    return web.json_response(account_json(account), status=201)


def add_admin_routes(app: web.Application) -> None:
    API.register(app)
