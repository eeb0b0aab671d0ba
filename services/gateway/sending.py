"""Sending mail: PUT/GET /v1/accounts/{id}/smtp (the account's submission server) and
POST /v1/accounts/{id}/messages/send.

A send is stored in the account's outbox (:mod:`libs.outbox`) with its Message-ID and Date
fixed, then posted to flightlog.inflight as ``message.accepted``; the answer (202) comes once
Kafka has it. The sender service submits it and posts the rest of its lifecycle. The same
idempotency key (body or ``Idempotency-Key`` header) answers with the first request's message
and sends nothing more; the same key with a different message is a 409.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Final, Literal, Self

from aiohttp import web
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from libs.accounts import Application
from libs.crypto import SecretBox
from libs.events import EventType
from libs.http import invalid_body
from libs.inflight import publish_inflight
from libs.openapi import Answer, ApiRoutes, Operation
from libs.outbound import AddressRefused, resolve_public
from libs.outbox import IdempotencyConflict, OutboxStore, SmtpSettings
from libs.ratelimit import KeyedTokenBuckets
from libs.resources import PRODUCER, ROUTER
from libs.sending import Mailbox, Outgoing, SendRequest, rfc_message_id, send_event, send_message_key
from services.gateway.auth import authenticated, owned_account
from services.gateway.errors import ApiError
from services.gateway.openapi import ACCOUNT
from services.gateway.resources import SETTINGS

__all__ = ["SendSettings", "add_sending_routes"]

OUTBOX: Final = web.AppKey("outbox", OutboxStore)
SMTP_SETTINGS: Final = web.AppKey("smtp_settings", SmtpSettings)
SEND_LIMITER: Final = web.AppKey("send_limiter", KeyedTokenBuckets[int])

API: Final = ApiRoutes()
_NO_CONTROLS: Final = r"^[^\x00-\x1f\x7f]*$"
MAX_IDEMPOTENCY_KEY_BYTES: Final = 255


class SendSettings(BaseSettings):
    """Per-account sending limits, per gateway process (N processes allow up to N times)."""

    model_config = SettingsConfigDict(env_prefix="FLIGHTLOG_", extra="ignore", frozen=True)

    # Messages an account may send per second on average, and in a burst.
    send_rate_per_account_s: float = Field(default=1.0, gt=0)
    send_burst_per_account: int = Field(default=60, ge=1)
    send_rate_tracked_accounts_max: int = Field(default=100_000, ge=1)


SEND_SETTINGS: Final = web.AppKey("send_settings", SendSettings)


class SmtpServer(BaseModel):
    """The account's submission server. Without username and password the account logs in with
    its IMAP credentials, as most providers allow."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    host: Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=_NO_CONTROLS)]
    port: Annotated[int, Field(gt=0, lt=65536)] = 587
    tls_mode: Literal["implicit", "starttls"] = Field(
        "starttls", description="implicit TLS (465) or STARTTLS (587); never plaintext"
    )
    username: Annotated[str, StringConstraints(min_length=1, max_length=320, pattern=_NO_CONTROLS)] | None = (
        None
    )
    password: (
        Annotated[str, StringConstraints(min_length=1, max_length=1000, pattern=_NO_CONTROLS)] | None
    ) = Field(None, repr=False, description="encrypted at rest, never returned")

    @model_validator(mode="after")
    def _both_or_neither(self) -> Self:
        if (self.username is None) != (self.password is None):
            raise ValueError("give username and password together, or neither to reuse the IMAP login")
        return self


class SmtpServerView(BaseModel):
    id: str
    host: str
    port: int
    tls_mode: str
    username: str | None
    reuses_imap_login: bool


class SendAccepted(BaseModel):
    message_key: str = Field(description="the message's key in the account (GET it once stored)")
    message_id: str = Field(description="the Message-ID header every attempt carries, without <>")
    status: Literal["accepted"] = "accepted"


def _body(model: type[BaseModel], raw: bytes, title: str) -> BaseModel:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid_body(exc, title) from None


async def _check_server(settings: SmtpSettings, host: str, port: int) -> None:
    if port not in settings.smtp_allowed_ports:
        allowed = ", ".join(str(p) for p in settings.smtp_allowed_ports)
        raise ApiError(422, "Port not allowed", f"SMTP servers may use the ports {allowed}")
    if settings.smtp_allow_private_hosts:
        return
    try:
        await resolve_public(host, port, allow_private=False)
    except AddressRefused as exc:
        raise ApiError(422, "Host not allowed", str(exc)) from None


async def _smtp_view(request: web.Request, account_id: int) -> web.Response:
    view = await request.app[OUTBOX].smtp_public(account_id)
    if view is None:
        raise ApiError(404, "Not found", f"account {account_id} has no SMTP server")
    return web.json_response({"id": str(account_id), **view})


@API.put(
    "/v1/accounts/{account_id}/smtp",
    Operation(
        "putSmtpServer",
        "sending",
        "Set the account's SMTP submission server (and login, unless it reuses its IMAP one)",
        (Answer(200, "the server", SmtpServerView),),
        params=(ACCOUNT,),
        body=SmtpServer,
        problems=(404,),
    ),
)
@authenticated
async def put_smtp(request: web.Request, app: Application) -> web.StreamResponse:
    account = await owned_account(request, app)
    body = _body(SmtpServer, await request.read(), "Invalid SMTP server")
    assert isinstance(body, SmtpServer)
    await _check_server(request.app[SMTP_SETTINGS], body.host, body.port)
    await request.app[OUTBOX].set_smtp(
        account.id, app.id, body.host, body.port, body.tls_mode, body.username, body.password
    )
    return await _smtp_view(request, account.id)


@API.get(
    "/v1/accounts/{account_id}/smtp",
    Operation(
        "getSmtpServer",
        "sending",
        "The account's SMTP submission server",
        (Answer(200, "the server", SmtpServerView),),
        params=(ACCOUNT,),
        problems=(404,),
    ),
)
@authenticated
async def get_smtp(request: web.Request, app: Application) -> web.StreamResponse:
    return await _smtp_view(request, (await owned_account(request, app)).id)


@API.post(
    "/v1/accounts/{account_id}/messages/send",
    Operation(
        "sendMessage",
        "sending",
        "Send a message from the account through its SMTP server",
        (Answer(202, "stored and posted as message.accepted; the sender submits it", SendAccepted),),
        description="The message goes through the lifecycle accepted, queued, sending, sent, then"
        " delivered or undelivered when a delivery status notification arrives in a synced mailbox,"
        " or failed when the server refuses it for good; each step is a lifecycle event (webhooks"
        " message.*, the delta feed once the message is final). The same idempotency key sends one"
        " message (a repeat answers 202 with it); a different message under a used key is a 409."
        " Limits: at most 50 recipients, 10 attachments of 48 KiB together, within the 64 KiB body;"
        " an account sends send_burst_per_account messages at once and send_rate_per_account_s a"
        " second (429 with Retry-After beyond). The From address is the account's.",
        params=(ACCOUNT,),
        body=Outgoing,
        problems=(404, 409, 429, 503),
    ),
)
@authenticated
async def post_send(request: web.Request, app: Application) -> web.StreamResponse:
    account = await owned_account(request, app)
    body = _body(Outgoing, await request.read(), "Invalid message")
    assert isinstance(body, Outgoing)
    store = request.app[OUTBOX]
    sender = body.sender or Mailbox(email=account.email)
    if sender.email.lower() != account.email.lower():
        raise ApiError(422, "Sender not allowed", f"the From address must be the account's, {account.email}")
    if await store.smtp_public(account.id) is None:
        raise ApiError(
            409,
            "No SMTP server",
            f"account {account.id} has no SMTP server: PUT /v1/accounts/{account.id}/smtp",
        )
    header_key = request.headers.get("Idempotency-Key")
    if header_key is not None and body.idempotency_key is not None and header_key != body.idempotency_key:
        raise ApiError(422, "Two idempotency keys", "the Idempotency-Key header and the body's key differ")
    idempotency_key = body.idempotency_key or header_key
    if idempotency_key is not None and not 0 < len(idempotency_key.encode()) <= MAX_IDEMPOTENCY_KEY_BYTES:
        raise ApiError(
            422, "Invalid idempotency key", f"an idempotency key has 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"
        )
    key = send_message_key(account.id, idempotency_key)
    limiter = request.app[SEND_LIMITER]
    denied = limiter.acquire({account.id: 1})
    # A repeat of a message already taken is answered whatever the limit: it sends nothing.
    if denied is not None and (idempotency_key is None or await store.row(account.id, key) is None):
        raise ApiError(
            429,
            "Sending limit",
            f"account {account.id} may send {limiter.burst} messages at once and"
            f" {limiter.rate_per_s:g} a second",
            retry_after_s=max(1, int(denied.retry_after_s + 0.999)),
        )
    charged = denied is None
    request_model = SendRequest(
        account_id=account.id,
        message_key=key,
        sender=sender,
        message=body,
        message_id=rfc_message_id(key, sender.email),
        date=datetime.now(UTC),
    )
    try:
        stored = await store.put(request_model)
    except IdempotencyConflict:
        if charged:
            limiter.refund({account.id: 1})
        raise ApiError(
            409, "Idempotency key reused", f"the key {idempotency_key!r} already sent a different message"
        ) from None
    if stored is not request_model and charged:
        limiter.refund({account.id: 1})  # a repeat sends nothing
    try:
        await publish_inflight(
            request.app[PRODUCER],
            [send_event(stored, EventType.ACCEPTED, stored.date, with_content=True)],
            timeout_s=request.app[SETTINGS].gateway_produce_timeout_s,
        )
    except (KafkaError, TimeoutError) as exc:
        raise ApiError(
            503,
            "Service unavailable",
            f"Kafka did not acknowledge the message ({type(exc).__name__}); it is stored and will be"
            " sent: repeat the request with the same idempotency key to learn its id",
            retry_after_s=1,
        ) from None
    return web.json_response(
        SendAccepted(message_key=stored.message_key, message_id=stored.message_id).model_dump(), status=202
    )


async def _store(app: web.Application) -> AsyncIterator[None]:
    app[OUTBOX] = OutboxStore(app[ROUTER], SecretBox.from_settings())
    yield


def add_sending_routes(app: web.Application, smtp: SmtpSettings, send: SendSettings) -> None:
    """Add the routes and their store (a cleanup context after the gateway's router)."""
    app[SMTP_SETTINGS] = smtp
    app[SEND_SETTINGS] = send
    app[SEND_LIMITER] = KeyedTokenBuckets(
        send.send_rate_per_account_s,
        send.send_burst_per_account,
        max_keys=send.send_rate_tracked_accounts_max,
    )
    app.cleanup_ctx.append(_store)
    API.register(app)
