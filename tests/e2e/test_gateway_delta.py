"""The delta feed: cursors, long-poll, Server-Sent Events with resume, expiry and retention."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from libs.ids import shard_of
from libs.shards import ShardRouter
from services.gateway.retention import trim_changes
from tests.e2e.gateway_helpers import bearer, gateway, http, message_ids, record, seed

__all__ = ["gateway", "http"]

pytestmark = pytest.mark.e2e

PROBLEM = "application/problem+json"


async def delta(
    http: aiohttp.ClientSession, gateway: str, account_id: int, key: str, **params: str
) -> tuple[int, Any]:
    async with http.get(
        f"{gateway}/v1/accounts/{account_id}/delta", params=params, headers=bearer(key)
    ) as resp:
        if resp.status >= 400:
            assert resp.content_type == PROBLEM
        return resp.status, await resp.json(content_type=None)


async def test_delta_pages_and_objects_as_they_are_now(
    gateway: str, http: aiohttp.ClientSession, tenant_factory: Any, router: ShardRouter
) -> None:
    tenant = await tenant_factory([8])
    account = tenant.accounts[0]
    await seed(router, [record(account.id, f"d{i}") for i in range(5)])
    await seed(
        router, [record(account.id, "d0", 2, subject="second"), record(account.id, "d1", 2, deleted=True)]
    )
    ids = await message_ids(router, account.id)

    status, page = await delta(http, gateway, account.id, tenant.api_key, limit="3")
    assert status == 200 and len(page["deltas"]) == 3 and page["has_more"] is True
    seen = page["deltas"]
    cursor = page["next_cursor"]
    while True:
        status, page = await delta(http, gateway, account.id, tenant.api_key, cursor=cursor, limit="3")
        seen += page["deltas"]
        cursor = page["next_cursor"]
        if not page["has_more"]:
            break
    kinds = [(d["object_id"], d["change_type"], d["version"]) for d in seen]
    assert kinds == [(str(ids[f"d{i}"]), "created", 1) for i in range(5)] + [
        (str(ids["d0"]), "updated", 2),
        (str(ids["d1"]), "deleted", 2),
    ]
    # Objects are as they are now: d0's creation already shows the second version, d1 is gone.
    assert seen[0]["object"]["subject"] == "second" and seen[0]["object"]["version"] == 2
    assert seen[1]["object"] is None and seen[-1]["object"] is None
    assert seen[3]["cursor"] != seen[4]["cursor"]

    # Resuming from a change's own cursor gives what followed it.
    status, page = await delta(http, gateway, account.id, tenant.api_key, cursor=seen[4]["cursor"])
    assert [d["change_type"] for d in page["deltas"]] == ["updated", "deleted"]

    # Nothing new: an empty page and a cursor that still works.
    status, page = await delta(http, gateway, account.id, tenant.api_key, cursor=cursor)
    assert status == 200 and page["deltas"] == [] and page["has_more"] is False
    await seed(router, [record(account.id, "d9")])
    status, page = await delta(http, gateway, account.id, tenant.api_key, cursor=page["next_cursor"])
    assert [(d["object_id"], d["change_type"]) for d in page["deltas"]] == [
        (str((await message_ids(router, account.id))["d9"]), "created")
    ]


async def test_latest_cursor_and_long_poll(
    gateway: str, http: aiohttp.ClientSession, tenant_factory: Any, router: ShardRouter
) -> None:
    tenant = await tenant_factory([9])
    account = tenant.accounts[0]
    await seed(router, [record(account.id, "old")])
    async with http.get(
        f"{gateway}/v1/accounts/{account.id}/delta/latest_cursor", headers=bearer(tenant.api_key)
    ) as resp:
        assert resp.status == 200
        cursor = (await resp.json())["cursor"]
    status, page = await delta(http, gateway, account.id, tenant.api_key, cursor=cursor)
    assert page["deltas"] == []

    started = time.monotonic()
    status, page = await delta(http, gateway, account.id, tenant.api_key, cursor=cursor, timeout="0.5")
    assert page["deltas"] == [] and 0.45 <= time.monotonic() - started < 3

    async def write_later() -> None:
        await asyncio.sleep(0.5)
        await seed(router, [record(account.id, "new")])

    writer = asyncio.create_task(write_later())
    started = time.monotonic()
    status, page = await delta(http, gateway, account.id, tenant.api_key, cursor=cursor, timeout="10")
    elapsed = time.monotonic() - started
    await writer
    assert status == 200 and [d["object"]["message_key"] for d in page["deltas"]] == ["new"]
    assert 0.4 <= elapsed < 3


async def test_bad_foreign_and_expired_cursors(
    gateway: str, http: aiohttp.ClientSession, tenant_factory: Any, router: ShardRouter
) -> None:
    tenant = await tenant_factory([10, 10])
    account, sibling = tenant.accounts
    await seed(router, [record(account.id, "c1"), record(sibling.id, "c1")])
    status, page = await delta(http, gateway, account.id, tenant.api_key)
    cursor = page["next_cursor"]
    for bad in ("nope", cursor[:-2], cursor + "A", "x" * 129):
        status, body = await delta(http, gateway, account.id, tenant.api_key, cursor=bad)
        assert status == 400 and "cursor" in body["detail"], bad
    status, body = await delta(http, gateway, sibling.id, tenant.api_key, cursor=cursor)
    assert status == 400 and "another account" in body["detail"]
    for params in ({"limit": "0"}, {"limit": "501"}, {"timeout": "31"}, {"timeout": "-1"}, {"since": "1"}):
        assert (await delta(http, gateway, account.id, tenant.api_key, **params))[0] == 400, params

    # Raise the shard's retention mark past the cursor (as a trim would): 410 with guidance.
    shard = shard_of(account.id)
    mark = router.table(shard, "changes_retention")
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT trimmed_through FROM {mark} WHERE id = 1")
        (before,) = await cur.fetchone()
        await cur.execute(f"SELECT MAX(id) FROM {router.table(shard, 'changes')}")
        (top,) = await cur.fetchone()
        await cur.execute(f"UPDATE {mark} SET trimmed_through = %s WHERE id = 1", (top + 1000,))
        await conn.commit()
    try:
        status, body = await delta(http, gateway, account.id, tenant.api_key, cursor=cursor)
        assert status == 410 and "latest_cursor" in body["detail"]
        async with http.get(
            f"{gateway}/v1/accounts/{account.id}/delta/stream",
            params={"cursor": cursor},
            headers=bearer(tenant.api_key),
        ) as resp:
            assert resp.status == 410
        async with http.get(
            f"{gateway}/v1/accounts/{account.id}/delta/latest_cursor", headers=bearer(tenant.api_key)
        ) as resp:
            fresh = (await resp.json())["cursor"]
        status, page = await delta(http, gateway, account.id, tenant.api_key, cursor=fresh)
        assert status == 200 and page["deltas"] == []
        # No cursor: from the oldest retained change, never a 410.
        assert (await delta(http, gateway, account.id, tenant.api_key))[0] == 200
    finally:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"UPDATE {mark} SET trimmed_through = %s WHERE id = 1", (before,))
            await conn.commit()


async def test_trim_keeps_young_changes(router: ShardRouter, tenant_factory: Any) -> None:
    tenant = await tenant_factory([11])
    await seed(router, [record(tenant.accounts[0].id, "t1")])
    shard = shard_of(tenant.accounts[0].id)
    async with (await router.pool(shard)).acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT COUNT(*) FROM {router.table(shard, 'changes')}")
        (count,) = await cur.fetchone()
        await conn.commit()
    mark = await trim_changes(router, shard, retention_s=10 * 365 * 24 * 3600)  # nothing here is that old
    async with (await router.pool(shard)).acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT COUNT(*), MIN(id) FROM {router.table(shard, 'changes')}")
        (after, lowest) = await cur.fetchone()
        await conn.commit()
    assert after == count and (lowest is None or mark < lowest)


async def read_events(resp: aiohttp.ClientResponse, n: int, timeout_s: float = 10) -> list[dict[str, str]]:
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    async with asyncio.timeout(timeout_s):
        while len(events) < n:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if not line:
                if current:
                    events.append(current)
                current = {}
                continue
            name, _, value = line.partition(": ")
            current[name] = value
    return events


async def test_sse_stream_heartbeats_and_resume(
    gateway: str, http: aiohttp.ClientSession, tenant_factory: Any, router: ShardRouter
) -> None:
    tenant = await tenant_factory([12])
    account = tenant.accounts[0]
    await seed(router, [record(account.id, "s0"), record(account.id, "s1")])
    url = f"{gateway}/v1/accounts/{account.id}/delta/stream"
    async with http.get(url, params={"heartbeat": "1"}, headers=bearer(tenant.api_key)) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        events = await read_events(resp, 3)
        assert events[0] == {"retry": "2000"}
        assert [e["event"] for e in events[1:]] == ["delta", "delta"]
        first_id = events[1]["id"]
        await seed(router, [record(account.id, "s2")])
        (live,) = await read_events(resp, 1)
        assert live["event"] == "delta" and '"message_key":"s2"' in live["data"]
        (beat,) = await read_events(resp, 1, timeout_s=5)
        assert beat["event"] == "heartbeat" and beat["id"]

    # Resume after the first event: the two that followed it, and nothing else.
    headers = {**bearer(tenant.api_key), "Last-Event-ID": first_id}
    async with http.get(url, params={"heartbeat": "1"}, headers=headers) as resp:
        events = await read_events(resp, 3)
    assert ['"s1"' in e["data"] for e in events[1:]] == [True, False]
    assert '"s2"' in events[2]["data"]

    # A heartbeat's id is a cursor too: resuming from it gives only what came after.
    await seed(router, [record(account.id, "s3")])
    headers = {**bearer(tenant.api_key), "Last-Event-ID": beat["id"]}
    async with http.get(url, headers=headers) as resp:
        events = await read_events(resp, 2)
    assert '"s3"' in events[1]["data"]

    async with http.get(url, headers={**bearer(tenant.api_key), "Last-Event-ID": "bogus"}) as resp:
        assert resp.status == 400 and resp.content_type == PROBLEM
