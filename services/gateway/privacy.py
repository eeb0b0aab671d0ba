"""Privacy and retention: erasing an account, and how long messages are kept.

=======  ====================================  ===================================================
DELETE   /v1/accounts/{account_id}             erase the account and everything it has; the report
GET      /v1/accounts/{account_id}/retention   the account's message retention
PUT      /v1/accounts/{account_id}/retention   set or clear (null) the account's own retention
GET      /v1/retention                         the application's message retention
PUT      /v1/retention                         set or clear (null) the application's retention
=======  ====================================  ===================================================

An erasure is a job (:mod:`libs.erasure`): the DELETE runs it to the end and answers with its
report; a DELETE again (after a crash, or at any time later) finishes or repeats that report, for
the application that owned the account and for no other (404 alike for a missing account).
"""

from __future__ import annotations

from typing import Annotated, Final

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from libs.accounts import Application
from libs.erasure import erase_account, erasure_of
from libs.http import invalid_body, read_json
from libs.openapi import Answer, ApiRoutes, Operation
from libs.resources import DIRECTORY, PRODUCER, ROUTER
from services.gateway import schemas
from services.gateway.auth import authenticated, owned_account, path_id
from services.gateway.constants import MAX_BODY_BYTES, MAX_RETENTION_S, MIN_RETENTION_S
from services.gateway.errors import NotFound
from services.gateway.imap_accounts import IMAP_SETTINGS
from services.gateway.openapi import ACCOUNT
from services.gateway.params import Query
from services.gateway.resources import SETTINGS
from services.gateway.retention import (
    account_retention,
    application_retention,
    set_account_retention,
    set_application_retention,
)

__all__ = ["API", "RetentionBody", "add_privacy_routes"]

API: Final = ApiRoutes()


class RetentionBody(BaseModel):
    """A retention in seconds; null clears it (an account then follows its application, an
    application keeps messages for ever)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    retention_s: Annotated[int, Field(ge=MIN_RETENTION_S, le=MAX_RETENTION_S)] | None


async def _retention_body(request: web.Request) -> int | None:
    try:
        return RetentionBody.model_validate(await read_json(request, max_bytes=MAX_BODY_BYTES)).retention_s
    except ValidationError as exc:
        raise invalid_body(exc) from None


@API.delete(
    "/v1/accounts/{account_id}",
    Operation(
        "eraseAccount",
        "accounts",
        "Erase the account and everything it has",
        (
            Answer(200, "what was erased, and the topics whose records expire later", schemas.AccountErasure),
            Answer(
                202,
                "another request is erasing the account now: what it erased so far",
                schemas.AccountErasure,
            ),
        ),
        description="Messages, change log, IMAP sync state and credentials, webhook deliveries and the"
        " account itself; transform forgets the account's message states and drops its records still"
        " in flight; ingest stops syncing its mailbox. Idempotent: calling again finishes an erasure"
        " that was interrupted, or repeats the report of one that finished. Records already in the"
        " append-only topics stay until their retention passes (`topics`).",
        params=(ACCOUNT,),
        problems=(404,),
    ),
)
@authenticated
async def delete_account(request: web.Request, app: Application) -> web.StreamResponse:
    Query(request, ())
    router = request.app[ROUTER]
    try:
        account_id = (await owned_account(request, app)).id
    except NotFound:
        # Its row goes first: an erasure begun for this application is found through its job.
        account_id = path_id(request, "account_id", "account")
        job = await erasure_of(router, account_id)
        if job is None or job.application_id != app.id:
            raise
    job = await erase_account(
        router,
        request.app[PRODUCER],
        request.app[IMAP_SETTINGS],
        account_id,
        app.id,
        erasures_topic=request.app[SETTINGS].gateway_erasures_topic,
    )
    request.app[DIRECTORY].forget_account(account_id)
    return web.json_response(job.report(), status=200 if job.state == "done" else 202)


async def _account_view(request: web.Request, app: Application) -> web.Response:
    account_id = (await owned_account(request, app)).id
    router = request.app[ROUTER]
    own = await account_retention(router, account_id)
    effective = own if own is not None else await application_retention(router, app.id)
    return web.json_response(
        {"account_id": str(account_id), "retention_s": own, "effective_retention_s": effective}
    )


@API.get(
    "/v1/accounts/{account_id}/retention",
    Operation(
        "getAccountRetention",
        "retention",
        "The account's message retention",
        (Answer(200, "its own retention and the one that applies", schemas.Retention),),
        params=(ACCOUNT,),
        problems=(404,),
    ),
)
@authenticated
async def get_account_retention(request: web.Request, app: Application) -> web.StreamResponse:
    Query(request, ())
    return await _account_view(request, app)


@API.put(
    "/v1/accounts/{account_id}/retention",
    Operation(
        "setAccountRetention",
        "retention",
        "Set the account's own message retention (null: follow the application's)",
        (Answer(200, "its own retention and the one that applies", schemas.Retention),),
        description="Messages older than the retention (by when they occurred) are erased by a"
        " background job, each with a `deleted` change (delta feed, `message.deleted` webhooks).",
        params=(ACCOUNT,),
        body=RetentionBody,
        problems=(404,),
    ),
)
@authenticated
async def put_account_retention(request: web.Request, app: Application) -> web.StreamResponse:
    Query(request, ())
    account_id = (await owned_account(request, app)).id  # 404 before looking at the body
    await set_account_retention(request.app[ROUTER], account_id, await _retention_body(request))
    return await _account_view(request, app)


@API.get(
    "/v1/retention",
    Operation(
        "getRetention",
        "retention",
        "The application's message retention",
        (Answer(200, "the retention", schemas.ApplicationRetention),),
    ),
)
@authenticated
async def get_retention(request: web.Request, app: Application) -> web.StreamResponse:
    Query(request, ())
    return web.json_response({"retention_s": await application_retention(request.app[ROUTER], app.id)})


@API.put(
    "/v1/retention",
    Operation(
        "setRetention",
        "retention",
        "Set the application's message retention (null: keep messages for ever)",
        (Answer(200, "the retention", schemas.ApplicationRetention),),
        description="Applies to every account of the application without a retention of its own.",
        body=RetentionBody,
    ),
)
@authenticated
async def put_retention(request: web.Request, app: Application) -> web.StreamResponse:
    Query(request, ())
    router = request.app[ROUTER]
    await set_application_retention(router, app.id, await _retention_body(request))
    return web.json_response({"retention_s": await application_retention(router, app.id)})


def add_privacy_routes(app: web.Application) -> None:
    API.register(app)
