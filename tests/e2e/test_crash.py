"""kill -9 of transform and then persist in the middle of a 50,000-event run: 0 lost, 0 duplicated."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from libs.config import KafkaSettings
from libs.shards import ShardRouter
from tests.e2e import checks
from tests.e2e.client import outbound_events, post_events
from tests.e2e.conftest import Pipeline
from tests.polling import eventually

pytestmark = pytest.mark.e2e

MESSAGES = 10_000  # x 5 lifecycle events = 50,000 events
BATCH_MESSAGES = 100  # 500 events a request
POSTERS = 4


async def test_kill_transform_then_persist_mid_run(
    pipeline: Pipeline, router: ShardRouter, tenant_factory: Any, kafka_settings: KafkaSettings, stack: Any
) -> None:
    tenant = await tenant_factory(router.shard_map.shards)  # one account on every shard
    accounts = [acc.id for acc in tenant.accounts]
    batches = []
    for start in range(0, MESSAGES, BATCH_MESSAGES):
        events = []
        for n in range(start, start + BATCH_MESSAGES):
            events += outbound_events(accounts[n % len(accounts)], f"crash-{n}")
        batches.append(events)

    queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)
    posted = 0
    at_30, at_60 = asyncio.Event(), asyncio.Event()
    kills: dict[str, float] = {}

    async def crash(name: str) -> None:
        svc = pipeline.services[name]
        assert svc.proc.kill(), f"{name} was not running"
        kills[name] = time.monotonic()
        await asyncio.to_thread(svc.start, wait_s=90)

    async def poster(http: aiohttp.ClientSession) -> None:
        nonlocal posted
        while not queue.empty():
            events = queue.get_nowait()
            status, body = await post_events(http, pipeline.url("ingest"), tenant.api_key, events)
            assert status == 202, body
            posted += 1
            if posted >= len(batches) * 0.3:
                at_30.set()
            if posted >= len(batches) * 0.6:
                at_60.set()

    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        posters = [asyncio.create_task(poster(http)) for _ in range(POSTERS)]
        await at_30.wait()
        await crash("transform")
        await at_60.wait()
        await crash("persist")
        await asyncio.gather(*posters)
    posted_at = time.monotonic()

    async def all_landed() -> bool:
        total = 0
        for acc in accounts:
            total += sum(
                1 for r in (await checks.messages(router, acc)).values() if r["status"] == "delivered"
            )
        return total == MESSAGES

    await eventually(all_landed, 300, f"all {MESSAGES} messages to be queryable")
    finished = time.monotonic()

    # Transform is exactly-once: per message, two committed postflight records (stored when sent,
    # updated when delivered) of growing versions, or one when both fell in one transaction
    # (coalesced), despite the kill.
    versions = await checks.postflight_versions(kafka_settings, set(accounts), tenant.created_ms)
    assert len(versions) == MESSAGES
    wrong = {k: v for k, v in versions.items() if not 1 <= len(v) <= 2 or v != sorted(set(v))}
    assert not wrong, wrong
    # Rows: exactly the expected ones, each at its last record's version. Changes: exact (one, or
    # one a record when persist wrote them in separate batches).
    for acc in accounts:
        rows = await checks.messages(router, acc)
        assert len(rows) == MESSAGES // len(accounts) + (
            1 if accounts.index(acc) < MESSAGES % len(accounts) else 0
        )
        assert all(
            r["status"] == "delivered" and r["version"] == versions[acc, key][-1] for key, r in rows.items()
        )
        checks.assert_exact_changes(
            await checks.changes(router, acc), {r["id"]: (r["version"], False) for r in rows.values()}
        )

    total_events = MESSAGES * 5
    result = {
        "events": total_events,
        "post_seconds": round(posted_at - started, 2),
        "ingest_to_queryable_seconds": round(finished - started, 2),
        "events_per_second_end_to_end": round(total_events / (finished - started)),
        "kills": list(kills),
    }
    out = stack.settings.state_dir / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "crash-test.json").write_text(json.dumps(result, indent=2))
    print(result)
