"""Admin paths of the gateway: applications (tenants) and accounts on shards.

Guarded by the operator's admin key (``FLIGHTLOG_ADMIN_API_KEY``), never by an application key.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Final, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from libs.accounts import create_account, create_application
from libs.http import problem_response
from libs.shards import ShardRouter, UnknownShard

__all__ = ["STATE", "GatewayState", "add_admin_routes"]


@dataclass(slots=True)
class GatewayState:
    """Filled in by the service's main() once its resources are open (routes answer 503 before)."""

    admin_key: str = ""
    router: ShardRouter | None = None

    @property
    def shards(self) -> ShardRouter:
        assert self.router is not None, "routes are gated until the router is open"
        return self.router


STATE: Final = web.AppKey("gateway_state", GatewayState)


class NewApplication(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]


class NewAccount(BaseModel):
    model_config = ConfigDict(extra="forbid")
    application_id: Annotated[int, Field(gt=0)]
    email: Annotated[str, StringConstraints(min_length=3, max_length=320)]
    provider: Annotated[str, StringConstraints(pattern="^(events|imap)$")] = "events"
    shard: Annotated[int, Field(ge=0, le=65535)] | None = None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _admin_only(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not supplied or not hmac.compare_digest(supplied, request.app[STATE].admin_key):
            return problem_response(401, "Unauthorized", "admin paths need the operator's admin API key")
        return await handler(request)

    return guarded


M = TypeVar("M", bound=BaseModel)


async def _body(request: web.Request, model: type[M]) -> M | web.Response:
    try:
        return model.model_validate_json(await request.read())
    except ValidationError as exc:
        errors = [{"field": ".".join(map(str, e["loc"])), "message": e["msg"]} for e in exc.errors()]
        return problem_response(
            422, "Invalid request body", "the body does not match the schema", errors=errors
        )


@_admin_only
async def post_application(request: web.Request) -> web.StreamResponse:
    body = await _body(request, NewApplication)
    if isinstance(body, web.Response):
        return body
    app, key = await create_application(request.app[STATE].shards, body.name)
    return web.json_response({"id": str(app.id), "name": app.name, "api_key": key}, status=201)


@_admin_only
async def post_account(request: web.Request) -> web.StreamResponse:
    body = await _body(request, NewAccount)
    if isinstance(body, web.Response):
        return body
    router = request.app[STATE].shards
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT 1 FROM `{router.global_schema}`.applications WHERE id = %s", (body.application_id,)
        )
        exists = await cur.fetchone()
        await conn.commit()
    if not exists:
        return problem_response(
            422, "Unknown application", f"application {body.application_id} does not exist"
        )
    try:
        account = await create_account(
            router, body.application_id, body.email, provider=body.provider, shard=body.shard
        )
    except UnknownShard as exc:
        return problem_response(422, "Unknown shard", str(exc))
    return web.json_response(
        {
            "id": str(account.id),
            "application_id": str(account.application_id),
            "email": account.email,
            "provider": account.provider,
            "shard": account.id >> 48,
        },
        status=201,
    )


def add_admin_routes(app: web.Application) -> None:
    app.add_routes(
        [web.post("/v1/admin/applications", post_application), web.post("/v1/admin/accounts", post_account)]
    )
