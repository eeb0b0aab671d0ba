"""The documents the webhook API answers with; see :mod:`services.gateway.schemas`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final

from pydantic import Field, WithJsonSchema

from libs.openapi import PublicId
from services.gateway.schemas import Doc, NonNegative
from services.gateway.webhooks.store import DELIVERY_STATES, EVENT_TYPES, ORDERINGS

__all__ = [
    "WEBHOOK_ORDERING_DOC",
    "Delivery",
    "DeliveryAttempt",
    "DeliveryDetail",
    "DeliveryPage",
    "Replayed",
    "Webhook",
    "WebhookList",
    "WebhookWithSecret",
]


def _one_of(values: tuple[str, ...], description: str | None = None) -> Any:
    schema: dict[str, Any] = {"type": "string", "enum": list(values)}
    if description is not None:
        schema["description"] = description
    return WithJsonSchema(schema)


WebhookEvent = Annotated[str, _one_of(EVENT_TYPES)]
WEBHOOK_ORDERING_DOC: Final = (
    "skip_refused (default): an event the receiver refuses with a 4xx (not 408, 429) a few times in"
    " a row is marked failed, replayable, and the account's later events go on; strict: it holds"
    " them back until the retry window ends, then the endpoint is disabled"
)
Ordering = Annotated[str, _one_of(ORDERINGS, WEBHOOK_ORDERING_DOC)]


class Webhook(Doc):
    id: PublicId
    url: str
    description: str
    event_types: list[WebhookEvent]
    account_ids: list[PublicId] | None
    ordering: Ordering
    enabled: bool
    disabled_reason: str | None
    disabled_at: datetime | None
    previous_secret_expires_at: datetime | None = Field(
        description="until then the secret before the last rotation signs too"
    )
    created_at: datetime
    updated_at: datetime


class WebhookWithSecret(Webhook):
    secret: str = Field(description="whsec_...: shown once, never again")


class WebhookList(Doc):
    data: list[Webhook]


class _DeliveryBase(Doc):
    id: PublicId
    endpoint_id: PublicId
    account_id: PublicId
    change_id: PublicId
    webhook_id: str = Field(description="the same on every attempt and replay of one event")
    event_type: WebhookEvent
    state: Annotated[str, _one_of(DELIVERY_STATES)]
    next_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    replay_of: PublicId | None
    created_at: datetime
    event_at: datetime
    finished_at: datetime | None


class Delivery(_DeliveryBase):
    attempts: NonNegative


class DeliveryPage(Doc):
    data: list[Delivery]
    next_before: PublicId | None = Field(description="pass as before for the next page")


class DeliveryAttempt(Doc):
    attempt: Annotated[int, Field(ge=1)]
    started_at: datetime
    latency_ms: NonNegative
    status_code: int | None
    error: str | None
    response_excerpt: str | None


class DeliveryDetail(_DeliveryBase):
    attempts: list[DeliveryAttempt]


class Replayed(Doc):
    replayed: NonNegative
