"""The delta feed: cursors, long-poll, Server-Sent Events with resume, expiry and retention."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from libs.ids import shard_of
from libs.shards import ShardRouter
from services.gateway.constants import MAX_LONG_POLL_S
from services.gateway.retention import relay_position, trim_changes
from tests.e2e.conftest import Pipeline
from tests.e2e.gateway_helpers import bearer, gateway, message_ids, record, seed

__all__ = ["gateway"]

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

    # Nothing changes: the long-poll waits its timeout, then answers an empty page.
    started = time.monotonic()
    status, page = await delta(http, gateway, account.id, tenant.api_key, cursor=cursor, timeout="0.5")
    assert status == 200 and page["deltas"] == [] and time.monotonic() - started >= 0.45

    # A change while it waits: it answers with the change, not at its timeout (the longest there
    # is; the deadline below is shorter). How soon is a figure for ``flightlog bench``.
    sent = asyncio.Event()

    async def on_sent(*_: object) -> None:
        sent.set()

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(on_sent)
    async with aiohttp.ClientSession(trace_configs=[trace]) as traced:
        poll = asyncio.create_task(
            delta(traced, gateway, account.id, tenant.api_key, cursor=cursor, timeout=str(MAX_LONG_POLL_S))
        )
        await asyncio.wait_for(sent.wait(), 30)
        await seed(router, [record(account.id, "new")])
        status, page = await asyncio.wait_for(poll, MAX_LONG_POLL_S - 5)
    assert status == 200 and [d["object"]["message_key"] for d in page["deltas"]] == ["new"]


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


async def test_trim_removes_old_changes_and_keeps_young_ones(
    router: ShardRouter, tenant_factory: Any, pipeline: Pipeline
) -> None:
    """Changes older than the retention go and the mark says how far; younger ones stay. The
    pipeline's persist runs a change relay: a trim never passes what the relay has not published."""
    tenant = await tenant_factory([11])
    account = tenant.accounts[0].id
    shard = shard_of(account)
    changes = router.table(shard, "changes")
    await seed(router, [record(account, f"old{i}") for i in range(3)])
    old_ids = await _change_ids(router, account)
    await seed(router, [record(account, "young")])
    (young_id,) = [i for i in await _change_ids(router, account) if i not in old_ids]
    async with (await router.pool(shard)).acquire() as conn, conn.cursor() as cur:
        # Ids grow with time: every change up to the last old one is made a day old.
        await cur.execute(
            f"UPDATE {changes} SET created_at = created_at - INTERVAL 1 DAY WHERE id <= %s", (max(old_ids),)
        )
        await conn.commit()

    async def relayed() -> bool:
        return await relay_position(router, shard) >= young_id

    deadline = time.monotonic() + 60
    while not await relayed():
        assert time.monotonic() < deadline, f"no change relay published shard {shard}'s changes"
        await asyncio.sleep(0.2)

    mark = await trim_changes(router, shard, retention_s=3600)
    assert max(old_ids) <= mark < young_id
    assert await _change_ids(router, account) == [young_id]
    async with (await router.pool(shard)).acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT COUNT(*) FROM {changes} WHERE id <= %s", (mark,))
        (left,) = await cur.fetchone()
        await conn.commit()
    assert left == 0


async def _change_ids(router: ShardRouter, account_id: int) -> list[int]:
    shard = shard_of(account_id)
    async with (await router.pool(shard)).acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT id FROM {router.table(shard, 'changes')} WHERE account_id = %s ORDER BY id",
            (account_id,),
        )
        rows = await cur.fetchall()
        await conn.commit()
    return [int(r[0]) for r in rows]


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
