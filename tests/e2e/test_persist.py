"""persist against the real stack: version-guarded upserts, exact change rows, a shard going down."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import TopicPartition

from cli.stack import Stack
from libs.config import KafkaSettings
from libs.events import MessageDoc, PostflightRecord, encode, message_key_bytes
from libs.ids import shard_of
from libs.kafka import DLQ, POSTFLIGHT, make_consumer, make_producer
from libs.shards import ShardRouter
from tests.e2e import checks
from tests.e2e.checks import offsets_since
from tests.e2e.conftest import Pipeline
from tests.polling import eventually

pytestmark = pytest.mark.e2e

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def record(account_id: int, key: str, version: int, **doc: Any) -> PostflightRecord:
    fields: dict[str, Any] = {"status": "delivered", "direction": "outbound", "occurred_at": NOW, **doc}
    deleted = fields.pop("deleted", False)
    return PostflightRecord(
        account_id=account_id, message_key=key, version=version, deleted=deleted, message=MessageDoc(**fields)
    )


async def publish(settings: KafkaSettings, records: list[PostflightRecord]) -> None:
    async with make_producer(settings) as producer:
        futures = [
            await producer.send(POSTFLIGHT, encode(r), key=message_key_bytes(r.account_id, r.message_key))
            for r in records
        ]
        await asyncio.gather(*futures)


async def test_version_guard_and_changes(
    pipeline: Pipeline, router: ShardRouter, tenant_factory: Any, kafka_settings: KafkaSettings
) -> None:
    tenant = await tenant_factory([router.shard_map.shards[0]])
    acc = tenant.accounts[0].id
    body = "hello " * 200
    await publish(kafka_settings, [
        record(acc, "m1", 1, subject="first", body_text=body),
        record(acc, "m1", 1, subject="first"),  # replay: changes nothing
        record(acc, "m2", 2, subject="m2 v2", unread=False),
        record(acc, "m2", 1, subject="m2 v1"),  # older, late: changes nothing
        record(acc, "m1", 2, subject="first", starred=True, body_text=body),
        record(acc, "m3", 1, subject="gone soon", body_text="secret"),
        record(acc, "m3", 2, subject=None, deleted=True),
    ])  # fmt: skip

    async def done() -> bool:
        rows = await checks.messages(router, acc)
        return {k: r["version"] for k, r in rows.items()} == {"m1": 2, "m2": 2, "m3": 2}

    await eventually(done, 30, "three messages at their last version")
    rows = await checks.messages(router, acc)
    assert rows["m1"]["starred"] == 1 and rows["m1"]["subject"] == "first"
    assert rows["m2"]["subject"] == "m2 v2" and rows["m2"]["unread"] == 0
    assert rows["m3"]["deleted"] == 1 and rows["m3"]["body_is_null"] == 1 and rows["m3"]["subject"] is None
    assert all(shard_of(r["id"]) == shard_of(acc) for r in rows.values())

    ids = {k: r["id"] for k, r in rows.items()}
    got = await checks.changes(router, acc)
    checks.assert_exact_changes(got, {ids["m1"]: (2, False), ids["m2"]: (2, False), ids["m3"]: (2, True)})
    # m2's version 1 arrived after version 2 and left no trace.
    assert (ids["m2"], "created", 1) not in got


async def test_undecodable_record_goes_to_dlq(pipeline: Pipeline, kafka_settings: KafkaSettings) -> None:
    since_ms = int(datetime.now(UTC).timestamp() * 1000) - 1000
    marker = f"not json {datetime.now(UTC).timestamp()}".encode()
    async with make_producer(kafka_settings) as producer:
        await (await producer.send(POSTFLIGHT, marker, key=b"bad"))
    consumer = make_consumer(kafka_settings, group_id=None)
    async with consumer:
        tps = [TopicPartition(DLQ, 0)]
        consumer.assign(tps)
        for tp, offset in (await offsets_since(consumer, tps, since_ms)).items():
            consumer.seek(tp, offset)
        deadline = asyncio.get_running_loop().time() + 30
        while asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            for r in (r for rs in batch.values() for r in rs):
                if r.value == marker:
                    headers = dict(r.headers)
                    assert headers["flightlog-stage"] == b"persist"
                    assert b"undecodable" in headers["flightlog-reason"]
                    assert headers["flightlog-source-topic"] == POSTFLIGHT.encode()
                    return
    raise AssertionError("the bad record never reached the DLQ")


async def test_one_shard_server_down(
    pipeline: Pipeline, router: ShardRouter, stack: Stack, tenant_factory: Any, kafka_settings: KafkaSettings
) -> None:
    m = router.shard_map
    down_cluster = m.clusters[m.shard_cluster[m.shards[1]]]
    up_shard = next(s for s in m.shards if m.cluster_of(s).cluster_id != down_cluster.cluster_id)
    down_shard = next(s for s in m.shards if m.cluster_of(s).cluster_id == down_cluster.cluster_id)
    tenant = await tenant_factory([up_shard, down_shard])
    up_acc, down_acc = (a.id for a in tenant.accounts)
    server = next(s for s in stack.mariadb if s.port == down_cluster.primary_port)

    await asyncio.to_thread(server.down)
    try:
        await publish(
            kafka_settings, [record(acc, f"k{i}", 1) for i in range(200) for acc in (up_acc, down_acc)]
        )

        # The shard on the other server keeps receiving its rows while this one is down.
        async def up_done() -> bool:
            return len(await checks.messages(router, up_acc)) == 200

        await eventually(up_done, 60, "the healthy shard's 200 rows")
        await publish(kafka_settings, [record(up_acc, f"late{i}", 1) for i in range(50)])

        async def up_late() -> bool:
            return len(await checks.messages(router, up_acc)) == 250

        await eventually(up_late, 60, "rows that arrived while the other shard was down")
    finally:
        await asyncio.to_thread(server.up)

    async def down_done() -> bool:
        try:
            return len(await checks.messages(router, down_acc)) == 200
        except Exception:
            return False

    await eventually(down_done, 120, "the stopped shard to catch up")
    for acc in (down_acc, up_acc):
        rows = await checks.messages(router, acc)
        checks.assert_exact_changes(
            await checks.changes(router, acc), {r["id"]: (1, False) for r in rows.values()}
        )
