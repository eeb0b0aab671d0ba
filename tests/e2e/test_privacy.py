"""Erasure and retention through the gateway's API, against a real gateway process (what they do
to the data is tested in tests/integration/test_erasure.py)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from libs.shards import ShardRouter
from tests.e2e.gateway_helpers import bearer, gateway, message_ids, seed, varied

__all__ = ["gateway"]

pytestmark = pytest.mark.e2e

PROBLEM = "application/problem+json"


async def call(
    http: aiohttp.ClientSession, method: str, url: str, key: str, body: Any = None
) -> tuple[int, Any, str]:
    async with http.request(method, url, headers=bearer(key), json=body) as resp:
        return resp.status, await resp.json(content_type=None), resp.content_type


async def test_erasing_an_account_through_the_api(
    gateway: str, http: aiohttp.ClientSession, tenant_factory: Any, router: ShardRouter, topics: None
) -> None:
    owner, other = await tenant_factory([1, 4]), await tenant_factory([1])
    account = owner.accounts[0]
    await seed(router, varied(account.id, 12))
    assert len(await message_ids(router, account.id)) == 12
    url = f"{gateway}/v1/accounts/{account.id}"

    status, _, ctype = await call(http, "DELETE", url, other.api_key)
    assert status == 404 and ctype == PROBLEM  # another application's account: as if missing
    status, report, _ = await call(http, "DELETE", url, owner.api_key)
    assert status == 200, report
    assert report["account_id"] == str(account.id) and report["state"] == "done"
    assert report["erased"]["shard.accounts"] == 1 and report["erased"]["shard.messages"] == 12
    assert {t["topic"] for t in report["topics"]} == {
        "flightlog.inflight", "flightlog.postflight", "flightlog.changes", "flightlog.dlq",
        "flightlog.persist-retry",
    }  # fmt: skip
    assert await message_ids(router, account.id) == {}

    status, _, _ = await call(http, "GET", url, owner.api_key)
    assert status == 404
    status, again, _ = await call(http, "DELETE", url, owner.api_key)
    assert status == 200 and again == report  # idempotent: the same report
    status, _, _ = await call(http, "DELETE", url, other.api_key)
    assert status == 404
    status, _, _ = await call(http, "GET", f"{gateway}/v1/accounts/{owner.accounts[1].id}", owner.api_key)
    assert status == 200  # the application's other account is untouched


async def test_retention_of_an_application_and_an_account(
    gateway: str, http: aiohttp.ClientSession, tenant_factory: Any
) -> None:
    tenant, other = await tenant_factory([2]), await tenant_factory([2])
    account = tenant.accounts[0]
    app_url, account_url = f"{gateway}/v1/retention", f"{gateway}/v1/accounts/{account.id}/retention"

    assert await call(http, "GET", app_url, tenant.api_key) == (
        200,
        {"retention_s": None},
        "application/json",
    )
    status, view, _ = await call(http, "GET", account_url, tenant.api_key)
    assert status == 200 and view == {
        "account_id": str(account.id), "retention_s": None, "effective_retention_s": None
    }  # fmt: skip

    status, body, _ = await call(http, "PUT", app_url, tenant.api_key, {"retention_s": 30 * 86400})
    assert status == 200 and body == {"retention_s": 30 * 86400}
    status, view, _ = await call(http, "GET", account_url, tenant.api_key)
    assert view["retention_s"] is None and view["effective_retention_s"] == 30 * 86400
    status, view, _ = await call(http, "PUT", account_url, tenant.api_key, {"retention_s": 7200})
    assert status == 200 and view["retention_s"] == 7200 and view["effective_retention_s"] == 7200
    status, view, _ = await call(http, "PUT", account_url, tenant.api_key, {"retention_s": None})
    assert status == 200 and view["retention_s"] is None and view["effective_retention_s"] == 30 * 86400

    for bad in ({"retention_s": 10}, {"retention_s": "3600"}, {}, {"retention_s": 3600, "x": 1}):
        status, _, ctype = await call(http, "PUT", app_url, tenant.api_key, bad)
        assert status == 422 and ctype == PROBLEM, bad
    status, _, _ = await call(http, "PUT", account_url, other.api_key, {"retention_s": 7200})
    assert status == 404  # not its account
    status, _, _ = await call(http, "GET", account_url, other.api_key)
    assert status == 404
