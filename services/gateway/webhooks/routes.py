"""The subscription API, authenticated by an application's API key (``Authorization: Bearer``).

=======  ==================================================  =========================================
POST     /v1/webhooks                                        create; the answer shows the secret once
GET      /v1/webhooks                                        list the application's endpoints
GET      /v1/webhooks/{id}                                   one endpoint (with disabled_reason)
PATCH    /v1/webhooks/{id}                                   url, description, event_types, account_ids,
                                                             ordering, enabled (true re-enables a
                                                             disabled one)
DELETE   /v1/webhooks/{id}                                   delete; pending deliveries are cancelled
POST     /v1/webhooks/{id}/rotate-secret                     new secret (shown once); the old one signs
                                                             too for ``webhooks_secret_grace_s``
GET      /v1/webhooks/{id}/deliveries                        the delivery log (?state=&before=&limit=)
GET      /v1/webhooks/{id}/deliveries/{delivery_id}          one delivery with all its attempts
POST     /v1/webhooks/{id}/deliveries/{delivery_id}/replay   send it again (same webhook-id)
POST     /v1/webhooks/{id}/replay                            {"since", "until"}: replay a time range
=======  ==================================================  =========================================
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from libs.accounts import Application
from libs.http import invalid_body, read_json
from libs.ids import parse_public_id
from libs.openapi import Answer, ApiRoutes, Operation, PublicId
from libs.resources import DIRECTORY, ROUTER
from services.gateway.auth import application_of
from services.gateway.constants import MAX_BODY_BYTES
from services.gateway.errors import ApiError
from services.gateway.openapi import id_param, query
from services.gateway.webhooks import schemas
from services.gateway.webhooks.settings import WebhookSettings
from services.gateway.webhooks.store import (
    DEFAULT_EVENT_TYPES,
    DELIVERY_STATES,
    EVENT_TYPES,
    Endpoint,
    WebhookStore,
)
from services.gateway.webhooks.targets import MAX_URL_LENGTH, TargetRefused, check_target

__all__ = [
    "API",
    "DELIVERY_STATES",
    "MAX_ACCOUNT_FILTER",
    "MAX_PAGE",
    "WEBHOOK_SETTINGS",
    "WEBHOOK_STORE",
    "NewWebhook",
    "ReplayRange",
    "WebhookPatch",
    "add_webhook_routes",
]

MAX_ACCOUNT_FILTER: Final = 1000
MAX_PAGE: Final = 500

M = TypeVar("M", bound=BaseModel)
REPLAY_CAP: Final = WebhookSettings.model_fields["webhooks_replay_max_deliveries"].default

API: Final = ApiRoutes()
BASE: Final = "/v1/webhooks"
_WEBHOOK: Final = id_param("id", "one of the application's webhooks")
_DELIVERY: Final = id_param("delivery_id", "a delivery of that webhook")


WEBHOOK_SETTINGS: Final = web.AppKey("webhook_settings", WebhookSettings)
WEBHOOK_STORE: Final = web.AppKey("webhook_store", WebhookStore)


# skip_refused or strict: how a lane treats an event its receiver refuses (see the dispatcher)
Ordering = Annotated[Literal["skip_refused", "strict"], Field(description=schemas.WEBHOOK_ORDERING_DOC)]
Url = Annotated[
    str,
    StringConstraints(min_length=8, max_length=MAX_URL_LENGTH),
    Field(description="http(s), no credentials or fragment; private and loopback addresses are refused"),
]
AccountFilter = Annotated[
    list[PublicId],
    Field(
        min_length=1,
        max_length=MAX_ACCOUNT_FILTER,
        description="only these accounts of the application (null or left out: all of them)",
    ),
]
EventType = Annotated[str, StringConstraints(pattern="^(" + "|".join(EVENT_TYPES).replace(".", r"\.") + ")$")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "true" is not a boolean, "5" not a number

    @field_validator("account_ids", check_fields=False)
    @classmethod
    def _ids(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            for v in value:
                parse_public_id(v)
        return value


class NewWebhook(_Body):
    url: Url
    description: Annotated[str, StringConstraints(max_length=500)] = ""
    event_types: Annotated[list[EventType], Field(min_length=1, max_length=len(EVENT_TYPES))] = Field(
        default_factory=lambda: list(DEFAULT_EVENT_TYPES),
        description="left out: every created, updated and deleted type; the status types"
        " (message.sent, message.delivered, message.undelivered, message.failed) are asked for by"
        " name, and replace message.created or message.updated for the changes they tell",
    )
    account_ids: AccountFilter | None = None
    ordering: Ordering = "skip_refused"


class WebhookPatch(_Body):
    url: Url | None = None
    description: Annotated[str, StringConstraints(max_length=500)] | None = None
    event_types: Annotated[list[EventType], Field(min_length=1, max_length=len(EVENT_TYPES))] | None = None
    account_ids: AccountFilter | None = None
    enabled: bool | None = Field(None, description="true re-enables a disabled endpoint")
    ordering: Ordering | None = None


class ReplayRange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    since: datetime
    until: datetime = Field(description="after since")

    @field_validator("since", "until", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        if not isinstance(value, str):  # not a number of seconds either
            raise ValueError("must be an RFC 3339 date-time string")
        return value


AppHandler = Callable[
    [web.Request, WebhookSettings, WebhookStore, Application], Awaitable[web.StreamResponse]
]


def _authed(handler: AppHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        app = await application_of(request)
        return await handler(request, request.app[WEBHOOK_SETTINGS], request.app[WEBHOOK_STORE], app)

    return wrapped


async def _json(request: web.Request) -> Any:
    return await read_json(request, max_bytes=MAX_BODY_BYTES)


def _validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_body(exc, "Invalid webhook") from None


async def _check_url(settings: WebhookSettings, url: str) -> None:
    try:
        await check_target(url, allow_private=settings.webhooks_allow_private_targets)
    except TargetRefused as exc:
        raise ApiError(422, "Invalid webhook target", str(exc)) from None


async def _check_accounts(request: web.Request, app: Application, ids: list[str] | None) -> set[int] | None:
    if ids is None:
        return None
    parsed = {parse_public_id(i) for i in ids}
    for account_id in sorted(parsed):
        if await request.app[DIRECTORY].owned_account(app.id, account_id) is None:
            raise ApiError(
                422, "Invalid webhook", f"account {account_id} is not an account of this application"
            )
    return parsed


async def _endpoint(request: web.Request, store: WebhookStore, app: Application) -> Endpoint:
    endpoint_id = _path_id(request, "id")
    endpoint = await store.endpoint(app.id, endpoint_id)
    if endpoint is None:
        raise ApiError(404, "Not found", f"no webhook {endpoint_id}")
    return endpoint


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 20


def _path_id(request: web.Request, name: str) -> int:
    try:
        value = int(request.match_info[name])
    except ValueError:
        raise ApiError(404, "Not found", f"{request.match_info[name]!r} is not an id") from None
    if not 0 < value < 2**63:
        raise ApiError(404, "Not found", f"{value} is not an id")
    return value


@API.post(
    BASE,
    Operation(
        "createWebhook",
        "webhooks",
        "Subscribe an endpoint; the answer shows its signing secret once",
        (Answer(201, "the endpoint and its secret", schemas.WebhookWithSecret),),
        description="Deliveries are signed the Standard Webhooks way (webhook-id, webhook-timestamp,"
        " webhook-signature), retried with backoff, in change order per account.",
        body=NewWebhook,
        problems=(409,),
    ),
)
@_authed
async def create(
    request: web.Request, settings: WebhookSettings, store: WebhookStore, app: Application
) -> web.Response:
    body = _validate(NewWebhook, await _json(request))
    await _check_url(settings, body.url)
    accounts = await _check_accounts(request, app, body.account_ids)
    if await store.count_endpoints(app.id) >= settings.webhooks_max_endpoints_per_application:
        raise ApiError(409, "Too many webhooks", "this application has the maximum number of webhooks")
    endpoint = await store.create_endpoint(
        app.id, body.url, body.description, sorted(set(body.event_types)), accounts, body.ordering
    )
    return web.json_response({**endpoint.public(), "secret": endpoint.secret}, status=201)


@API.get(
    BASE,
    Operation(
        "listWebhooks",
        "webhooks",
        "The application's webhook endpoints",
        (Answer(200, "the endpoints", schemas.WebhookList),),
    ),
    allow_head=True,
)
@_authed
async def list_(
    request: web.Request, settings: WebhookSettings, store: WebhookStore, app: Application
) -> web.Response:
    return web.json_response({"data": [e.public() for e in await store.endpoints(app.id)]})


@API.get(
    BASE + "/{id}",
    Operation(
        "getWebhook",
        "webhooks",
        "One endpoint (with why it was disabled, if it was)",
        (Answer(200, "the endpoint", schemas.Webhook),),
        params=(_WEBHOOK,),
        problems=(404,),
    ),
    allow_head=True,
)
@_authed
async def get(
    request: web.Request, settings: WebhookSettings, store: WebhookStore, app: Application
) -> web.Response:
    return web.json_response((await _endpoint(request, store, app)).public())


@API.patch(
    BASE + "/{id}",
    Operation(
        "patchWebhook",
        "webhooks",
        "Change url, description, event_types, account_ids or enabled",
        (Answer(200, "the endpoint", schemas.Webhook),),
        params=(_WEBHOOK,),
        body=WebhookPatch,
        problems=(404,),
    ),
)
@_authed
async def patch(
    request: web.Request, settings: WebhookSettings, store: WebhookStore, app: Application
) -> web.Response:
    endpoint = await _endpoint(request, store, app)
    body = _validate(WebhookPatch, await _json(request))
    changes: dict[str, Any] = {}
    given = body.model_fields_set
    if body.url is not None:
        await _check_url(settings, body.url)
        changes["url"] = body.url
    if body.description is not None:
        changes["description"] = body.description
    if body.event_types is not None:
        changes["event_types"] = sorted(set(body.event_types))
    if "account_ids" in given:  # null clears the filter
        changes["account_ids"] = await _check_accounts(request, app, body.account_ids)
    if body.enabled is not None:
        changes["enabled"] = body.enabled
    if body.ordering is not None:
        changes["ordering"] = body.ordering
    await store.update_endpoint(endpoint, changes)
    fresh = await store.endpoint(app.id, endpoint.id)
    assert fresh is not None
    return web.json_response(fresh.public())


@API.delete(
    BASE + "/{id}",
    Operation(
        "deleteWebhook",
        "webhooks",
        "Delete an endpoint; its pending deliveries are cancelled",
        (Answer(204, "deleted"),),
        params=(_WEBHOOK,),
        problems=(404,),
    ),
)
@_authed
async def delete(
    request: web.Request, settings: WebhookSettings, store: WebhookStore, app: Application
) -> web.Response:
    await store.delete_endpoint(await _endpoint(request, store, app))
    return web.Response(status=204)


@API.post(
    BASE + "/{id}/rotate-secret",
    Operation(
        "rotateWebhookSecret",
        "webhooks",
        "A new signing secret, shown once; the old one keeps signing for a grace period",
        (Answer(200, "the endpoint and its new secret", schemas.WebhookWithSecret),),
        params=(_WEBHOOK,),
        problems=(404,),
    ),
)
@_authed
async def rotate(
    request: web.Request, settings: WebhookSettings, store: WebhookStore, app: Application
) -> web.Response:
    endpoint = await _endpoint(request, store, app)
    secret = await store.rotate_secret(endpoint, settings.webhooks_secret_grace_s)
    fresh = await store.endpoint(app.id, endpoint.id)
    assert fresh is not None
    return web.json_response({**fresh.public(), "secret": secret})


@API.get(
    BASE + "/{id}/deliveries",
    Operation(
        "listWebhookDeliveries",
        "webhooks",
        "The delivery log, newest first",
        (Answer(200, "a page of deliveries", schemas.DeliveryPage),),
        params=(
            _WEBHOOK,
            query("state", {"type": "string", "enum": list(DELIVERY_STATES)}, "only this state"),
            query("before", _WEBHOOK.schema, "next_before of the previous page"),
            query(
                "limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100}, "page size"
            ),
        ),
        problems=(404,),
    ),
    allow_head=True,
)
@_authed
async def deliveries(
    request: web.Request, settings: WebhookSettings, store: WebhookStore, app: Application
) -> web.Response:
    endpoint = await _endpoint(request, store, app)
    q = request.query
    state = q.get("state")
    if state is not None and state not in DELIVERY_STATES:
        raise ApiError(400, "Bad request", "state is pending, delivered, failed or cancelled")
    limit_text, before_text = q.get("limit", "100"), q.get("before")
    if not _digits(limit_text) or not 1 <= int(limit_text) <= MAX_PAGE:
        raise ApiError(400, "Bad request", f"limit is an integer in 1..{MAX_PAGE}")
    if before_text is not None and (not _digits(before_text) or not 0 < int(before_text) < 2**63):
        raise ApiError(400, "Bad request", "before is the id of a delivery (next_before of a page)")
    limit = int(limit_text)
    before = None if before_text is None else int(before_text)
    rows = await store.deliveries(endpoint.id, state=state, before_id=before, limit=limit)
    next_before = str(rows[-1].id) if len(rows) == limit else None
    return web.json_response({"data": [d.public() for d in rows], "next_before": next_before})


@API.get(
    BASE + "/{id}/deliveries/{delivery_id}",
    Operation(
        "getWebhookDelivery",
        "webhooks",
        "One delivery with all its attempts",
        (Answer(200, "the delivery", schemas.DeliveryDetail),),
        params=(_WEBHOOK, _DELIVERY),
        problems=(404,),
    ),
    allow_head=True,
)
@_authed
async def delivery(
    request: web.Request, settings: WebhookSettings, store: WebhookStore, app: Application
) -> web.Response:
    endpoint = await _endpoint(request, store, app)
    found = await store.delivery(endpoint.id, _path_id(request, "delivery_id"))
    if found is None:
        raise ApiError(404, "Not found", "no such delivery for this webhook")
    d, attempts = found
    return web.json_response({**d.public(), "attempts": [a.public() for a in attempts]})


@API.post(
    BASE + "/{id}/deliveries/{delivery_id}/replay",
    Operation(
        "replayWebhookDelivery",
        "webhooks",
        "Send a delivery again (same webhook-id), after the lane's pending ones",
        (Answer(202, "queued", schemas.Replayed),),
        params=(_WEBHOOK, _DELIVERY),
        problems=(404,),
    ),
)
@_authed
async def replay_one(
    request: web.Request, settings: WebhookSettings, store: WebhookStore, app: Application
) -> web.Response:
    endpoint = await _endpoint(request, store, app)
    count = await store.replay(endpoint.id, [_path_id(request, "delivery_id")])
    if count == 0:
        raise ApiError(404, "Not found", "no such delivery for this webhook")
    return web.json_response({"replayed": count}, status=202)


@API.post(
    BASE + "/{id}/replay",
    Operation(
        "replayWebhookRange",
        "webhooks",
        "Send again every delivery of a time range (by event time)",
        (Answer(202, "queued", schemas.Replayed),),
        description=f"At most {REPLAY_CAP} deliveries (webhooks_replay_max_deliveries).",
        params=(_WEBHOOK,),
        body=ReplayRange,
        problems=(404,),
    ),
)
@_authed
async def replay_range(
    request: web.Request, settings: WebhookSettings, store: WebhookStore, app: Application
) -> web.Response:
    endpoint = await _endpoint(request, store, app)
    body = _validate(ReplayRange, await _json(request))
    since, until = (
        t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t for t in (body.since, body.until)
    )
    if until <= since:
        raise ApiError(422, "Invalid replay", "until must be after since")
    cap = settings.webhooks_replay_max_deliveries
    ids = await store.deliveries_between(endpoint.id, since, until, cap + 1)
    if len(ids) > cap:
        raise ApiError(422, "Replay too large", f"more than {cap} deliveries in the range; narrow it")
    return web.json_response({"replayed": await store.replay(endpoint.id, ids)}, status=202)


async def _store(app: web.Application) -> AsyncIterator[None]:
    app[WEBHOOK_STORE] = WebhookStore(app[ROUTER], app[WEBHOOK_SETTINGS].webhooks_secret_key)
    yield


def add_webhook_routes(app: web.Application, settings: WebhookSettings) -> None:
    """Add the /v1/webhooks routes and their store (a cleanup context after the host's router:
    they use the host's :data:`ROUTER` and its :data:`DIRECTORY`, so a key revoked anywhere in
    the host is refused here at once)."""
    app[WEBHOOK_SETTINGS] = settings
    app.cleanup_ctx.append(_store)
    API.register(app)
