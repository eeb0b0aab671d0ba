"""A small ingest client for the end-to-end tests: batches, retries on 429 as a real client would."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

OUTBOUND = ("accepted", "queued", "sending", "sent", "delivered")
T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def event(
    account_id: int, key: str, status: str, *, step: int = 0, event_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "event_id": event_id or uuid.uuid4().hex,
        "account_id": str(account_id),
        "message_key": key,
        "type": f"message.{status}",
        "occurred_at": (T0 + timedelta(seconds=step)).isoformat(),
        **extra,
    }


def outbound_events(account_id: int, key: str) -> list[dict[str, Any]]:
    content: dict[str, Any] = {
        "from": "sender@example.test",
        "to": ["rcpt@example.test"],
        "subject": f"subject {key}",
        "body_text": f"body of {key} " * 20,
        "channel": "email",
    }
    events = []
    for i, status in enumerate(OUTBOUND):
        extra: dict[str, Any] = {"direction": "outbound"}
        if i == 0:
            extra["content"] = content
        events.append(event(account_id, key, status, step=i, **extra))
    return events


async def post_events(
    http: aiohttp.ClientSession, url: str, api_key: str, events: list[dict[str, Any]]
) -> tuple[int, dict[str, Any]]:
    """POST one batch; waits out 429s. Returns the final status and body."""
    while True:
        async with http.post(
            f"{url}/v1/events", json={"events": events}, headers={"Authorization": f"Bearer {api_key}"}
        ) as resp:
            body = await resp.json(content_type=None)
            if resp.status == 429:
                await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                continue
            return resp.status, body
