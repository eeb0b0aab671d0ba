"""POST /v1/events refuses up front what no shard could store, with a 422 that names the field."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from cli.services import LocalService
from cli.stack import Stack
from libs.accounts import create_account, create_application
from libs.shards import ShardMap, ShardRouter
from tests.e2e.conftest import E2E_ENV, E2E_INSTANCE, E2E_PORT_OFFSET
from tests.scratch import app_name

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ingest(stack: Stack, shard_map: ShardMap, topics: None) -> Iterator[LocalService]:
    # A port and instance of its own (test_ingest.py's ingest may be running beside it), without
    # IMAP sync: it would join the shared IMAP group and take accounts from `make dev`'s ingest.
    svc = LocalService(
        "ingest",
        8081 + E2E_PORT_OFFSET - 87,
        stack.settings.state_dir,
        env={**E2E_ENV, "FLIGHTLOG_IMAP_SYNC_ENABLED": "false"},
        instance=f"{E2E_INSTANCE}-test-limits",
    )
    svc.start()
    try:
        yield svc
    finally:
        svc.proc.stop(timeout_s=30)


@pytest.fixture
async def tenant(router: ShardRouter) -> tuple[str, int]:
    suffix = uuid.uuid4().hex[:8]
    app, key = await create_application(router, app_name("ingest-limits"))
    account = await create_account(router, app.id, f"limits-{suffix}@example.com")
    return key, account.id


@pytest.fixture
async def http(ingest: LocalService) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(ingest.address) as session:
        yield session


def item(account_id: int, **extra: Any) -> dict[str, Any]:
    return {
        "account_id": str(account_id),
        "message_key": f"limits-{uuid.uuid4().hex}",
        "type": "message.queued",
        "occurred_at": "2025-01-02T03:04:05Z",
        **extra,
    }


async def post(http: aiohttp.ClientSession, key: str, events: list[dict[str, Any]]) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post("/v1/events", json={"events": events}, headers=headers) as resp:
        body = await resp.json(content_type=None)
        if resp.status == 422:
            assert resp.content_type == "application/problem+json"
        return resp.status, body


@pytest.mark.parametrize(
    ("poison", "field", "says"),
    [
        ({"message_key": "é" * 255}, "message_key", "510 bytes"),  # VARBINARY(255)
        ({"occurred_at": "9999-12-31T23:00:00-05:00"}, "occurred_at", "outside the storable range"),
        ({"occurred_at": "0999-12-31T23:59:59Z"}, "occurred_at", "outside the storable range"),
        ({"content": {"size_bytes": 2**64}}, "content.size_bytes", ""),  # BIGINT UNSIGNED
    ],
)
async def test_an_unstorable_event_is_refused_naming_its_field(
    http: aiohttp.ClientSession, tenant: tuple[str, int], poison: dict[str, Any], field: str, says: str
) -> None:
    key, account = tenant
    status, body = await post(http, key, [item(account), item(account, **poison)])
    assert status == 422, body
    [error] = body["errors"]
    assert (error["index"], error["field"]) == (1, field)
    assert says in error["message"]


async def test_events_at_the_limits_are_accepted(
    http: aiohttp.ClientSession, tenant: tuple[str, int]
) -> None:
    key, account = tenant
    events = [
        item(account, message_key=f"{uuid.uuid4().hex}" + "é" * 111),  # 254 bytes
        item(account, occurred_at="1000-01-01T00:00:00Z"),
        item(account, occurred_at="9999-12-30T18:59:59.999999-05:00"),  # 23:59:59.999999 in UTC
    ]
    status, body = await post(http, key, events)
    assert status == 202, body
    assert body["accepted"] == 3
