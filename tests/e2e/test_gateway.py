"""The gateway's messages and API-key endpoints, limits and documents, against a real gateway process."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Final

import aiohttp
import pytest

from cli.services import management_address
from libs.shards import ShardRouter
from services.gateway.messages import MessageQuery, list_statement
from tests.e2e import checks
from tests.e2e.client import event, post_events
from tests.e2e.conftest import Pipeline
from tests.e2e.gateway_helpers import T0, bearer, gateway, message_ids, record, seed, varied
from tests.polling import eventually

__all__ = ["gateway"]

pytestmark = pytest.mark.e2e

PROBLEM = "application/problem+json"
ABOVE_ANY_OFFSET: Final = 2**62  # a version no inflight offset reaches


async def get(http: aiohttp.ClientSession, url: str, key: str, **params: str) -> tuple[int, Any, str]:
    async with http.get(url, headers=bearer(key), params=params) as resp:
        return resp.status, await resp.json(content_type=None), resp.content_type


async def all_pages(http: aiohttp.ClientSession, url: str, key: str, **params: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    token = None
    while True:
        extra: dict[str, str] = {"page_token": token} if token else {}
        status, body, _ = await get(http, url, key, **params, **extra)
        assert status == 200, body
        out += body["data"]
        token = body["next_page_token"]
        if token is None:
            return out


async def test_authentication_and_key_lifecycle(
    gateway: str, http: aiohttp.ClientSession, tenant_factory: Any
) -> None:
    tenant = await tenant_factory([1])
    url = f"{gateway}/v1/api-keys"
    async with http.get(url) as resp:
        assert resp.status == 401 and resp.content_type == PROBLEM
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    for header in ("Bearer flk_nope", "Basic abc", "Bearer " + "x" * 500, "Bearer "):
        async with http.get(url, headers={"Authorization": header}) as resp:
            assert resp.status == 401 and resp.content_type == PROBLEM

    status, keys, _ = await get(http, url, tenant.api_key)
    assert status == 200 and len(keys["data"]) == 1
    first = keys["data"][0]
    assert tenant.api_key.startswith(first["prefix"]) and first["revoked_at"] is None
    assert tenant.api_key not in str(keys)

    # The last active key cannot be revoked; with a second one it can, and is refused at once.
    async with http.delete(f"{url}/{first['id']}", headers=bearer(tenant.api_key)) as resp:
        assert resp.status == 409 and resp.content_type == PROBLEM
    async with http.post(url, headers=bearer(tenant.api_key)) as resp:
        assert resp.status == 201
        created = await resp.json()
    second = created["api_key"]
    assert second.startswith(created["prefix"]) and second != tenant.api_key
    status, keys, _ = await get(http, url, second)
    assert second not in str(keys) and len(keys["data"]) == 2
    async with http.delete(f"{url}/{first['id']}", headers=bearer(second)) as resp:
        assert resp.status == 200
        assert (await resp.json())["revoked_at"] is not None
    assert (await get(http, url, tenant.api_key))[0] == 401
    async with http.delete(f"{url}/{first['id']}", headers=bearer(second)) as resp:
        assert resp.status == 200  # revoking is idempotent
    async with http.delete(f"{url}/999999999", headers=bearer(second)) as resp:
        assert resp.status == 404 and resp.content_type == PROBLEM

    # Another application's key id is unknown to this one.
    other = await tenant_factory([2])
    status, other_keys, _ = await get(http, url, other.api_key)
    async with http.delete(f"{url}/{other_keys['data'][0]['id']}", headers=bearer(second)) as resp:
        assert resp.status == 404

    # The operator can add a key to an application that lost every key.
    admin = {"Authorization": "Bearer flightlog-dev-admin-key"}
    app_keys = f"{management_address(gateway)}/v1/admin/applications/{tenant.application.id}/api-keys"
    async with http.post(app_keys, headers=admin) as resp:
        assert resp.status == 201
        assert (await get(http, url, (await resp.json())["api_key"]))[0] == 200
    async with http.post(app_keys, headers=bearer(second)) as resp:
        assert resp.status == 401
    missing = f"{management_address(gateway)}/v1/admin/applications/99999999999/api-keys"
    async with http.post(missing, headers=admin) as resp:
        assert resp.status == 404


async def test_admin_paths(gateway: str, http: aiohttp.ClientSession) -> None:
    admin = {"Authorization": "Bearer flightlog-dev-admin-key"}
    public, gateway = gateway, management_address(gateway)
    async with http.post(f"{public}/v1/admin/applications", json={"name": "acme"}, headers=admin) as resp:
        assert resp.status == 404  # not on the public port
    async with http.post(f"{gateway}/v1/admin/applications", json={"name": "acme"}, headers=admin) as resp:
        assert resp.status == 201
        app = await resp.json()
    body = {"application_id": int(app["id"]), "email": "a@example.test", "shard": 3}
    async with http.post(f"{gateway}/v1/admin/accounts", json=body, headers=admin) as resp:
        assert resp.status == 201
        account = await resp.json()
    assert account["shard"] == 3 and int(account["id"]) >> 48 == 3
    status, listed, _ = await get(http, f"{public}/v1/accounts", app["api_key"])
    assert status == 200 and [a["id"] for a in listed["data"]] == [account["id"]]
    for bad, code in (({"name": ""}, 422), ({"nme": "x"}, 422), ("[", 400)):
        kwargs: dict[str, Any] = {"data": bad} if isinstance(bad, str) else {"json": bad}
        async with http.post(f"{gateway}/v1/admin/applications", headers=admin, **kwargs) as resp:
            assert resp.status == code and resp.content_type == PROBLEM
    bad_account = {**body, "application_id": 2**62}
    async with http.post(f"{gateway}/v1/admin/accounts", json=bad_account, headers=admin) as resp:
        assert resp.status == 422
    async with http.post(f"{gateway}/v1/admin/accounts", json={**body, "shard": 999}, headers=admin) as resp:
        assert resp.status == 422


async def test_accounts_list_and_get(gateway: str, http: aiohttp.ClientSession, tenant_factory: Any) -> None:
    tenant = await tenant_factory([1, 2, 2, 5, 16])
    expected = sorted(str(a.id) for a in tenant.accounts)
    got = await all_pages(http, f"{gateway}/v1/accounts", tenant.api_key, limit="2")
    assert [a["id"] for a in got] == sorted(expected, key=int)
    status, one, _ = await get(http, f"{gateway}/v1/accounts/{expected[0]}", tenant.api_key)
    assert (
        status == 200
        and one["email"] == tenant.accounts[[str(a.id) for a in tenant.accounts].index(expected[0])].email
    )
    status, _, ctype = await get(http, f"{gateway}/v1/accounts", tenant.api_key, page_token="garbage")
    assert status == 400 and ctype == PROBLEM


async def test_range_query_filters_and_pagination(
    gateway: str, http: aiohttp.ClientSession, tenant_factory: Any, router: ShardRouter
) -> None:
    tenant = await tenant_factory([4, 4])
    account, other = tenant.accounts
    records = varied(account.id, 60)
    await seed(router, records)
    url = f"{gateway}/v1/accounts/{account.id}/messages"
    key = tenant.api_key

    status, page, _ = await get(http, url, key)
    assert status == 200 and len(page["data"]) == 50 and page["next_page_token"]
    first = page["data"][0]
    assert (
        first["message_key"] == "m00059"
        and isinstance(first["id"], str)
        and first["account_id"] == str(account.id)
    )
    assert "body_text" not in first and first["to"] == ["r2@example.test", "all@example.test"]

    everything = await all_pages(http, url, key, limit="7")
    assert [m["message_key"] for m in everything] == [f"m{i:05d}" for i in reversed(range(60))]

    def keys_of(pred: Any) -> list[str]:
        return [f"m{i:05d}" for i in reversed(range(60)) if pred(i)]

    cases: list[tuple[dict[str, str], Any]] = [
        ({"status": "failed"}, lambda i: i % 3 == 0),
        ({"direction": "inbound"}, lambda i: i % 2 == 0),
        ({"channel": "sms"}, lambda i: i % 5 == 0),
        ({"from": "s1@example.test"}, lambda i: i % 4 == 1),
        ({"to": "r0@example.test"}, lambda i: i % 3 == 0),
        ({"folder": "archive"}, lambda i: i % 7 == 0),
        ({"unread": "false"}, lambda i: i % 2 == 1),
        ({"after": (T0 + timedelta(minutes=10)).isoformat()}, lambda i: i >= 10),
        ({"before": (T0 + timedelta(minutes=10)).isoformat().replace("+00:00", "Z")}, lambda i: i < 10),
        (
            {
                "after": "2026-11-01T10:20:00+01:00",
                "before": "2026-11-01T09:30:00Z",
                "unread": "true",
                "channel": "email",
            },
            lambda i: 20 <= i < 30 and i % 2 == 0 and i % 5 != 0,
        ),
    ]
    for params, pred in cases:
        got = await all_pages(http, url, key, limit="4", **params)
        assert [m["message_key"] for m in got] == keys_of(pred), params

    # A page token continues only its own query of its own account.
    status, page, _ = await get(http, url, key, limit="5", status="failed")
    token = page["next_page_token"]
    assert (await get(http, url, key, limit="9", status="failed", page_token=token))[0] == 200
    for params in ({"status": "delivered"}, {}, {"status": "failed", "unread": "true"}):
        status, body, ctype = await get(http, url, key, page_token=token, **params)
        assert status == 400 and ctype == PROBLEM and "another query" in body["detail"], params
    status, body, _ = await get(
        http, f"{gateway}/v1/accounts/{other.id}/messages", key, status="failed", page_token=token
    )
    assert status == 400 and "another account" in body["detail"]

    # Deleted messages are left out of ranges.
    await seed(
        router, [record(account.id, "m00059", 2, deleted=True, occurred_at=T0 + timedelta(minutes=59))]
    )
    status, page, _ = await get(http, url, key, limit="1")
    assert page["data"][0]["message_key"] == "m00058"


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"}, {"limit": "201"}, {"limit": "x"}, {"limit": "1", "bogus": "1"}, {"status": "lost"},
        {"direction": "up"}, {"unread": "yes"}, {"before": "yesterday"}, {"after": "2026-11-01T09:00:00"},
        {"page_token": "!!!"}, {"from": "x" * 321}, {"folder": ""},
    ],
)  # fmt: skip
async def test_range_query_refuses_bad_parameters(
    gateway: str, http: aiohttp.ClientSession, tenant_factory: Any, params: dict[str, str]
) -> None:
    tenant = await tenant_factory([1])
    status, body, ctype = await get(
        http, f"{gateway}/v1/accounts/{tenant.accounts[0].id}/messages", tenant.api_key, **params
    )
    assert status == 400 and ctype == PROBLEM and body["status"] == 400 and body["detail"]


async def test_range_queries_are_index_range_scans(router: ShardRouter, tenant_factory: Any) -> None:
    tenant = await tenant_factory([6])
    account = tenant.accounts[0]
    await seed(router, varied(account.id, 300, prefix="x"))
    queries = [
        MessageQuery(account.id),
        MessageQuery(account.id, before=T0.replace(tzinfo=None) + timedelta(hours=2)),
        MessageQuery(account.id, after=T0.replace(tzinfo=None), status="failed", folder="inbox", unread=True),
        MessageQuery(
            account.id, sender="s1@example.test", to="r0@example.test", channel="sms", direction="inbound"
        ),
        MessageQuery(account.id, position=(T0.replace(tzinfo=None) + timedelta(minutes=100), 2**60)),
    ]
    pool = await router.pool(6, write=False)
    for q in queries:
        sql, args = list_statement(router, q)
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("EXPLAIN " + sql, args)
            names = [d[0] for d in cur.description]
            plan = [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
            await conn.commit()
        assert len(plan) == 1, plan
        assert plan[0]["key"] == "ix_messages_account_time", plan
        assert plan[0]["type"] in ("range", "ref"), plan
        assert "filesort" not in (plan[0]["Extra"] or ""), plan


async def pipeline_message(
    pipeline: Pipeline,
    http: aiohttp.ClientSession,
    router: ShardRouter,
    api_key: str,
    account_id: int,
    key: str,
) -> int:
    """An inbound message through ingest, transform and persist; its id once it is stored."""
    events = [
        event(account_id, key, "receiving", step=0, direction="inbound",
              content={"from": "sender@example.test", "subject": f"subject {key}",
                       "body_text": f"body of {key} " * 30}),
        event(account_id, key, "received", step=1, direction="inbound", flags={"folder": "inbox"}),
    ]  # fmt: skip
    status, body = await post_events(http, pipeline.url("ingest"), api_key, events)
    assert status == 202, body

    async def stored() -> bool:
        return key in await message_ids(router, account_id)

    await eventually(stored, 60, f"message {key} to be stored")
    return (await message_ids(router, account_id))[key]


async def test_get_patch_delete_through_the_pipeline(
    pipeline: Pipeline, http: aiohttp.ClientSession, tenant_factory: Any, router: ShardRouter
) -> None:
    tenant = await tenant_factory([7])
    account = tenant.accounts[0]
    message_id = await pipeline_message(pipeline, http, router, tenant.api_key, account.id, "p1")
    url = f"{pipeline.url('gateway')}/v1/messages/{message_id}"
    key = bearer(tenant.api_key)

    status, msg, _ = await get(http, url, tenant.api_key)
    assert status == 200 and msg["id"] == str(message_id) and msg["body_text"].startswith("body of p1")
    assert msg["unread"] is True and msg["folder"] == "inbox"
    created = msg["version"]

    async with http.patch(
        url, json={"unread": False, "labels": ["b", "c"], "folder": "done"}, headers=key
    ) as resp:
        assert resp.status == 200, await resp.text()
        patched = await resp.json()
    assert patched["version"] > created and patched["unread"] is False and patched["labels"] == ["b", "c"]
    assert patched["folder"] == "done" and patched["body_text"] == msg["body_text"]
    assert await checks.changes(router, account.id) == [
        (message_id, "created", created),
        (message_id, "updated", patched["version"]),
    ]

    async with http.patch(url, json={"unread": False}, headers=key) as resp:  # already so: at once
        assert resp.status == 200 and (await resp.json())["version"] == patched["version"]
    async with http.patch(url, json={"starred": True}, headers=key) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["version"] > patched["version"], body
        assert body["starred"] and body["folder"] == "done" and body["body_text"] == msg["body_text"]
    # the no-op went through the transform too, and changed nothing
    assert [c[2] for c in await checks.changes(router, account.id)] == [
        created, patched["version"], body["version"]
    ]  # fmt: skip

    for payload, code in (
        ({}, 422), ({"unread": None}, 422), ({"unread": "no"}, 422), ({"color": "red"}, 422),
        ({"labels": ["x"] * 51}, 422), ({"folder": "f" * 256}, 422), ([1], 422),
    ):  # fmt: skip
        async with http.patch(url, json=payload, headers=key) as resp:
            assert resp.status == code and resp.content_type == PROBLEM, payload
    async with http.patch(url, data="{", headers={**key, "Content-Type": "application/json"}) as resp:
        assert resp.status == 400
    async with http.patch(url, data="unread", headers={**key, "Content-Type": "text/plain"}) as resp:
        assert resp.status == 415
    async with http.patch(
        url, data=b"[" * (65 * 1024), headers={**key, "Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 413 and resp.content_type == PROBLEM

    async with http.delete(url, headers=key) as resp:
        assert resp.status == 200
        deleted = await resp.json()
    assert deleted == {
        "id": str(message_id), "account_id": str(account.id), "version": deleted["version"], "deleted": True
    }  # fmt: skip
    assert deleted["version"] > body["version"]
    row = (await checks.messages(router, account.id))["p1"]
    assert (
        row["deleted"] == 1 and row["subject"] is None and row["snippet"] is None and row["body_is_null"] == 1
    )
    assert row["version"] == deleted["version"]
    assert (await checks.changes(router, account.id))[-1] == (message_id, "deleted", deleted["version"])
    for method in ("GET", "PATCH", "DELETE"):
        async with http.request(method, url, json={"unread": True}, headers=key) as resp:
            assert resp.status == 404 and resp.content_type == PROBLEM, method


async def test_a_pipeline_update_after_a_patch_is_not_lost(
    pipeline: Pipeline, http: aiohttp.ClientSession, tenant_factory: Any, router: ShardRouter
) -> None:
    """A PATCH is an inflight event like any other, so the next real update (an IMAP flag change,
    a provider's event) comes after it on the message's partition, gets a higher version, and
    persist's guard keeps it."""
    tenant = await tenant_factory([7])
    account = tenant.accounts[0]
    message_id = await pipeline_message(pipeline, http, router, tenant.api_key, account.id, "later")
    url = f"{pipeline.url('gateway')}/v1/messages/{message_id}"
    created = (await checks.messages(router, account.id))["later"]["version"]
    async with http.patch(url, json={"unread": False}, headers=bearer(tenant.api_key)) as resp:
        assert resp.status == 200
        patched = int((await resp.json())["version"])
    assert patched > created

    update = event(account.id, "later", "updated", step=5, flags={"starred": True, "folder": "archive"})
    status, body = await post_events(http, pipeline.url("ingest"), tenant.api_key, [update])
    assert status == 202, body

    async def landed() -> bool:
        return int((await checks.messages(router, account.id))["later"]["version"]) > patched

    await eventually(landed, 30, "the update after the PATCH")
    status, msg, _ = await get(http, url, tenant.api_key)
    assert status == 200 and msg["version"] > patched
    assert msg["unread"] is False and msg["starred"] is True and msg["folder"] == "archive"
    assert [c[1:] for c in await checks.changes(router, account.id)] == [
        ("created", created), ("updated", patched), ("updated", msg["version"])
    ]  # fmt: skip


async def test_patch_and_delete_answer_202_until_the_pipeline_stores_them(
    pipeline: Pipeline, gateway: str, http: aiohttp.ClientSession, tenant_factory: Any, router: ShardRouter
) -> None:
    """A change whose new version is not stored within the wait is answered 202. This one never
    raises the version: the row was written straight by persist's writer at a version above any
    the transform gives (an inflight offset plus one), so the transform's patch of its flags loses
    to persist's version guard, and its deletion erases the row, as an erasure always does, at the
    row's own version. This gateway waits 0.2 s, then says accepted."""
    tenant = await tenant_factory([7])
    account = tenant.accounts[0]
    await seed(router, [record(account.id, "direct", ABOVE_ANY_OFFSET, folder="inbox")])
    message_id = (await message_ids(router, account.id))["direct"]
    url = f"{gateway}/v1/messages/{message_id}"
    for method, payload in (("PATCH", {"folder": "done"}), ("DELETE", None)):
        async with http.request(method, url, json=payload, headers=bearer(tenant.api_key)) as resp:
            assert resp.status == 202 and resp.content_type == "application/json", method
            body = await resp.json()
        assert body["id"] == str(message_id) and body["status"] == "accepted", body

    async def erased() -> bool:
        return bool((await checks.messages(router, account.id))["direct"]["deleted"])

    # The deletion comes after the PATCH on the message's partition: once it is stored, so is
    # whatever the PATCH did.
    await eventually(erased, 30, "the deletion to be stored")
    row = (await checks.messages(router, account.id))["direct"]
    assert row["version"] == ABOVE_ANY_OFFSET and row["folder"] == "inbox", row
    assert row["subject"] is None and row["body_is_null"] == 1, row


async def test_a_patch_reaches_a_row_the_transform_does_not_hold(
    pipeline: Pipeline, http: aiohttp.ClientSession, tenant_factory: Any, router: ShardRouter
) -> None:
    """A row written straight by persist's writer (as one the transform forgot after its grace
    period): a PATCH goes out as a patch record that persist applies to it, raising its version
    and keeping its content."""
    tenant = await tenant_factory([7])
    account = tenant.accounts[0]
    await seed(router, [record(account.id, "forgotten", folder="inbox")])
    message_id = (await message_ids(router, account.id))["forgotten"]
    url = f"{pipeline.url('gateway')}/v1/messages/{message_id}"
    status, msg, _ = await get(http, url, tenant.api_key)
    assert status == 200 and msg["folder"] == "inbox" and msg["body_text"].startswith("body of forgotten")
    async with http.patch(url, json={"folder": "done"}, headers=bearer(tenant.api_key)) as resp:
        assert resp.status == 200, await resp.text()
        patched = await resp.json()
    assert patched["folder"] == "done" and patched["version"] > msg["version"]
    changed = ("folder", "version", "updated_at")
    assert {k: v for k, v in patched.items() if k not in changed} == {
        k: v for k, v in msg.items() if k not in changed
    }
    assert await checks.changes(router, account.id) == [
        (message_id, "created", msg["version"]),
        (message_id, "updated", patched["version"]),
    ]


async def test_errors_and_limits_are_problem_documents(
    gateway: str, http: aiohttp.ClientSession, tenant_factory: Any
) -> None:
    tenant = await tenant_factory([1])
    key = bearer(tenant.api_key)
    async with http.get(f"{gateway}/v1/nothing-here", headers=key) as resp:
        assert resp.status == 404 and resp.content_type == PROBLEM
    async with http.put(f"{gateway}/v1/messages/1", headers=key) as resp:
        assert resp.status == 405 and resp.content_type == PROBLEM and "PATCH" in resp.headers["Allow"]
    async with http.get(f"{gateway}/v1/accounts", params={"page_token": "x" * 5000}, headers=key) as resp:
        assert resp.status == 414 and resp.content_type == PROBLEM
    for bad in ("abc", "0", "-1", "1" * 21, str(2**64)):
        async with http.get(f"{gateway}/v1/messages/{bad}", headers=key) as resp:
            assert resp.status == 404 and resp.content_type == PROBLEM, bad


async def test_openapi_and_docs_are_served(gateway: str, http: aiohttp.ClientSession) -> None:
    for path in ("/openapi.json", "/docs", "/metrics"):
        async with http.get(f"{gateway}{path}") as resp:
            assert resp.status == 404, path  # on the management port only
    gateway = management_address(gateway)
    async with http.get(f"{gateway}/openapi.json") as resp:
        spec = await resp.json()
        assert resp.status == 200 and spec["openapi"] == "3.1.0"
    async with http.get(f"{gateway}/docs") as resp:
        page = await resp.text()
        assert resp.status == 200 and resp.content_type == "text/html"
    assert len(spec["paths"]) >= 21
    for path in spec["paths"]:
        assert path in page
    assert "<script src" not in page and "https://" not in page
