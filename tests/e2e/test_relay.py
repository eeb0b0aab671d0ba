"""The change relay: every committed change reaches flightlog.changes, keyed and in order per
account, past rolled-back id gaps, and nothing is lost when persist (which runs the relay) is
killed with SIGKILL mid-stream."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest

from libs.config import KafkaSettings, ServiceSettings
from libs.ids import shard_of
from libs.kafka import make_producer
from libs.shards import ShardRouter
from services.gateway.retention import relay_position
from services.persist.relay import ChangeRelay, RelaySettings
from tests.e2e.conftest import Pipeline
from tests.e2e.webhook_helpers import (
    change_ids,
    end_offsets,
    first_seen,
    read_changes,
    write_change,
)
from tests.polling import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture
async def relay(
    router: ShardRouter, topics: None, service_settings: ServiceSettings
) -> AsyncIterator[ChangeRelay]:
    """An in-process relay. If another relay (a running persist) holds the lock, this one waits as
    a standby and the other publishes: the tests check the topic, not who wrote to it."""
    async with (
        make_producer(service_settings) as producer,
        ChangeRelay(router, producer, RelaySettings()) as r,
    ):
        yield r


def assert_per_account(found: list[dict[str, Any]], expected: dict[int, list[int]]) -> None:
    for account, ids in expected.items():
        got = [int(m["change_id"]) for m in found if int(m["account_id"]) == account]
        assert first_seen(got) == ids, f"account {account}: lost or reordered changes"


async def test_relay_publishes_every_change_in_order(
    router: ShardRouter, relay: ChangeRelay, tenant_factory: Any, kafka_settings: KafkaSettings
) -> None:
    tenant = await tenant_factory(router.shard_map.shards[:4] * 2)  # two accounts on each of 4 shards
    start = await end_offsets(kafka_settings)
    for version in (1, 2, 3):
        await asyncio.gather(
            *(write_change(router, acc.id, f"m{n}", version) for acc in tenant.accounts for n in range(5))
        )
    expected = {acc.id: await change_ids(router, acc.id) for acc in tenant.accounts}
    assert all(len(ids) == 15 for ids in expected.values())
    found = await read_changes(kafka_settings, start, set(expected), 15 * len(expected), 60)
    assert_per_account(found, expected)
    sample = next(m for m in found if int(m["change_id"]) == expected[tenant.accounts[0].id][0])
    assert sample == {
        "schema_version": 1,
        "change_id": str(expected[tenant.accounts[0].id][0]),
        "shard": shard_of(tenant.accounts[0].id),
        "account_id": str(tenant.accounts[0].id),
        "application_id": str(tenant.application.id),
        "object_type": "message",
        "object_id": sample["object_id"],
        "change_type": "created",
        "version": 1,
        "created_at": sample["created_at"],
        "status": "delivered",  # the message's first change moved it to its status
    }


async def test_rolled_back_ids_do_not_stall_the_relay(
    router: ShardRouter, relay: ChangeRelay, tenant_factory: Any, kafka_settings: KafkaSettings
) -> None:
    tenant = await tenant_factory([router.shard_map.shards[0]])
    account = tenant.accounts[0].id
    shard = shard_of(account)
    start = await end_offsets(kafka_settings)
    await write_change(router, account, "before", 1)
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:  # burn ids: a gap in `changes`
        await cur.execute(
            f"INSERT INTO {router.table(shard, 'changes')} (account_id, object_type, object_id, change_type,"
            " version) VALUES (%s, 'message', 1, 'created', 1), (%s, 'message', 1, 'created', 1)",
            (account, account),
        )
        await conn.rollback()
    await write_change(router, account, "after", 1)
    expected = await change_ids(router, account)
    assert len(expected) == 2 and expected[1] - expected[0] > 1, "no gap was made"
    found = await read_changes(kafka_settings, start, {account}, 2, 30)
    assert_per_account(found, {account: expected})


def relay_active(pipeline: Pipeline) -> bool:
    with urllib.request.urlopen(f"{pipeline.management_url('persist')}/metrics", timeout=2) as resp:
        return b"flightlog_relay_active 1.0" in resp.read()


async def test_kill_persist_mid_stream_loses_no_change(
    pipeline: Pipeline, router: ShardRouter, tenant_factory: Any, kafka_settings: KafkaSettings
) -> None:
    """The relay in the persist process is the active one; SIGKILL it while changes stream in."""
    await eventually(lambda: relay_active(pipeline), 10, "persist's relay to be the active one")
    tenant = await tenant_factory(router.shard_map.shards)
    start = await end_offsets(kafka_settings)
    written = 0
    stop = asyncio.Event()

    async def writer() -> None:
        # keeps writing until the test has killed and restarted persist: the kill is mid-stream
        nonlocal written
        while not stop.is_set():
            n = written
            await asyncio.gather(
                *(write_change(router, acc.id, f"k{n % 7}", n // 7 + 1) for acc in tenant.accounts)
            )
            written += 1
            await asyncio.sleep(0.05)  # pacing

    async def some_relayed() -> bool:
        for acc in tenant.accounts:
            ids = await change_ids(router, acc.id)
            if ids and await relay_position(router, shard_of(acc.id)) >= ids[0]:
                return True
        return False

    task = asyncio.create_task(writer())
    try:
        await eventually(some_relayed, 60, "the relay to publish the first changes")
        svc = pipeline.services["persist"]
        assert svc.proc.kill(), "persist was not running"
        killed_at = written
        await asyncio.to_thread(svc.start, wait_s=90)
        await eventually(lambda: written >= killed_at + 5, 60, "changes written after the restart")
    finally:
        stop.set()
        await task
    rounds = written
    expected = {acc.id: await change_ids(router, acc.id) for acc in tenant.accounts}
    total = sum(len(v) for v in expected.values())
    assert total == rounds * len(tenant.accounts)
    found = await read_changes(kafka_settings, start, set(expected), total, 120)
    assert_per_account(found, expected)
