"""Malformed, too deeply nested and oversize JSON bodies: 400, 400 and 413 problem documents on
every endpoint that takes a body.

The gateway's endpoints come from its own /openapi.json (every operation with a request body), so
an endpoint added later is covered without touching this file; ingest's POST /v1/events is named.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any, Final
from urllib.request import urlopen

import aiohttp
import pytest

from cli.services import LocalService, management_address
from cli.stack import Stack
from libs.http import MAX_JSON_DEPTH, PROBLEM_CONTENT_TYPE
from libs.shards import ShardMap, ShardRouter
from services.gateway.admin import ADMIN_PREFIX
from services.gateway.constants import MAX_BODY_BYTES as GATEWAY_MAX_BODY_BYTES
from services.ingest.constants import MAX_BODY_BYTES as INGEST_MAX_BODY_BYTES
from tests.e2e.conftest import E2E_ENV, E2E_INSTANCE, E2E_PORT_OFFSET, Tenant
from tests.e2e.gateway_helpers import bearer, gateway

__all__ = ["gateway"]

pytestmark = pytest.mark.e2e

INGEST_PORT: Final = 8081 + E2E_PORT_OFFSET + 30
ADMIN_KEY: Final = "flightlog-dev-admin-key"
JSON: Final = {"Content-Type": "application/json"}


def nested(depth: int) -> bytes:
    """An object whose one member holds arrays: ``depth`` levels in all."""
    return b'{"x":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def bad_bodies(max_bytes: int) -> list[tuple[str, bytes, int, str]]:
    """(case, body, status, title) every JSON endpoint must answer."""
    return [
        ("truncated", b'{"a": ', 400, "Malformed JSON"),
        ("not JSON", b"{'a': 1}", 400, "Malformed JSON"),
        ("one level too deep", nested(MAX_JSON_DEPTH + 1), 400, "JSON nested too deeply"),
        # Past stdlib json's recursion limit and orjson's own depth limit.
        ("thousands deep", nested(5000), 400, "JSON nested too deeply"),
        ("over the size limit", b'{"x": "' + b"a" * max_bytes + b'"}', 413, "Content Too Large"),
    ]


async def assert_refused(
    http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str], max_bytes: int
) -> None:
    wrong = []
    for case, body, status, title in bad_bodies(max_bytes):
        data = io.BytesIO(body)  # aiohttp warns about a large body given as bytes
        async with http.request(method, url, data=data, headers={**headers, **JSON}) as resp:
            doc = await resp.json(content_type=None) if resp.content_type == PROBLEM_CONTENT_TYPE else None
            if resp.status != status or doc is None or doc["title"] != title:
                wrong.append((case, resp.status, resp.content_type, doc))
    # The limit itself is allowed: whatever the answer, it is not about the nesting.
    async with http.request(method, url, data=nested(MAX_JSON_DEPTH), headers={**headers, **JSON}) as resp:
        doc = await resp.json(content_type=None)
        if resp.status >= 500 or doc.get("title") == "JSON nested too deeply":
            wrong.append(("at the depth limit", resp.status, resp.content_type, doc))
    assert not wrong, f"{method} {url}: {wrong}"


@pytest.fixture
async def tenant(tenant_factory: Any, router: ShardRouter) -> Tenant:
    t: Tenant = await tenant_factory(router.shard_map.shards[:1])
    return t


def _operations(base_url: str) -> list[tuple[str, str]]:
    with urlopen(f"{management_address(base_url)}/openapi.json", timeout=5) as resp:
        spec: dict[str, Any] = json.load(resp)
    return [
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if isinstance(op, dict) and "requestBody" in op
    ]


async def test_every_gateway_json_endpoint_refuses_bad_bodies(
    gateway: str, http: aiohttp.ClientSession, tenant: Tenant
) -> None:
    operations = _operations(gateway)
    assert len(operations) >= 7, operations  # the document lists the body-taking operations
    account = tenant.accounts[0]
    ids = {"account_id": str(account.id), "application_id": str(tenant.application.id)}
    for method, path in operations:
        admin = path.startswith(ADMIN_PREFIX)  # on the management port
        base = management_address(gateway) if admin else gateway
        url = base + path.format_map({**ids, "message_id": "1", "id": "1", "delivery_id": "1"})
        key = ADMIN_KEY if admin else tenant.api_key
        await assert_refused(http, method, url, bearer(key), GATEWAY_MAX_BODY_BYTES)


@pytest.fixture(scope="module")
def ingest(stack: Stack, shard_map: ShardMap, topics: None) -> Iterator[str]:
    svc = LocalService(
        "ingest",
        INGEST_PORT,
        stack.settings.state_dir,
        env={**E2E_ENV, "FLIGHTLOG_IMAP_SYNC_ENABLED": "false"},
        instance=f"{E2E_INSTANCE}-json",
    )
    svc.start(wait_s=90)
    try:
        yield svc.address
    finally:
        svc.proc.stop(timeout_s=30)


async def test_ingest_refuses_bad_bodies(ingest: str, http: aiohttp.ClientSession, tenant: Tenant) -> None:
    await assert_refused(http, "POST", f"{ingest}/v1/events", bearer(tenant.api_key), INGEST_MAX_BODY_BYTES)
    # Deep inside a batch item: before the check, dead-lettering the item failed with a 500.
    account = str(tenant.accounts[0].id)
    item = b'{"account_id": "' + account.encode() + b'", "message_key": "k", "labels": ' + nested(600)
    body = b'{"events": [' + item + b"}]}"
    async with http.post(
        f"{ingest}/v1/events", data=body, headers={**bearer(tenant.api_key), **JSON}
    ) as resp:
        assert (
            resp.status == 400 and (await resp.json(content_type=None))["title"] == "JSON nested too deeply"
        )
