"""The whole pipeline as processes: ingest -> inflight -> transform -> postflight -> persist -> MariaDB."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest
from aiokafka import TopicPartition

from libs.config import KafkaSettings
from libs.kafka import DLQ, make_consumer
from libs.shards import ShardRouter
from tests.e2e import checks
from tests.e2e.client import event, outbound_events, post_events
from tests.e2e.conftest import Pipeline
from tests.polling import eventually

pytestmark = pytest.mark.e2e


async def dlq_entries(
    settings: KafkaSettings, needle: bytes, count: int, since_ms: int, timeout_s: float = 30
) -> list[dict[str, bytes]]:
    """Headers of the DLQ records written from ``since_ms`` on whose value contains ``needle``
    (waits for ``count``)."""
    found: list[dict[str, bytes]] = []
    consumer = make_consumer(settings, group_id=None)
    async with consumer:
        tps = [TopicPartition(DLQ, 0)]
        consumer.assign(tps)
        for tp, offset in (await checks.offsets_since(consumer, tps, since_ms)).items():
            consumer.seek(tp, offset)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(found) < count and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            for r in (r for rs in batch.values() for r in rs):
                if r.value and needle in r.value:
                    found.append(dict(r.headers))
    return found


async def test_valid_duplicated_out_of_order_late_and_invalid_events(
    pipeline: Pipeline, router: ShardRouter, tenant_factory: Any, kafka_settings: KafkaSettings
) -> None:
    tenant = await tenant_factory([router.shard_map.shards[0], router.shard_map.shards[1]])
    a, b = (acc.id for acc in tenant.accounts)
    valid = outbound_events(a, "valid")
    dup = outbound_events(a, "dup")
    dup = [*dup, dict(dup[4]), dict(dup[2])]  # the same event ids again
    ooo = outbound_events(b, "ooo")
    ooo = [ooo[0], ooo[3], ooo[1], ooo[4], ooo[2]]  # sent before queued; sending after delivered (late)
    impossible = [
        event(b, "impossible", "accepted", step=0, direction="outbound"),
        event(b, "impossible", "failed", step=1, direction="outbound"),
        event(b, "impossible", "delivered", step=2, direction="outbound"),  # after failed: impossible
    ]
    inbound = [
        event(a, "in", "receiving", step=0, direction="inbound"),
        event(a, "in", "received", step=1, direction="inbound"),
    ]
    url = pipeline.url("ingest")
    async with aiohttp.ClientSession() as http:
        for batch in (valid, dup, ooo, impossible, inbound):
            status, body = await post_events(http, url, tenant.api_key, batch)
            assert status == 202, body
        # A late update after the final state: read and starred.
        status, body = await post_events(
            http,
            url,
            tenant.api_key,
            [
                event(a, "valid", "updated", step=10, flags={"unread": False, "starred": True}),
            ],
        )
        assert status == 202, body
        # Invalid items: the batch is refused as a whole with every bad item listed.
        refused_key = f"refused-{uuid.uuid4().hex}"
        status, body = await post_events(
            http,
            url,
            tenant.api_key,
            [
                event(a, refused_key, "teleported"),
                {**event(a, "bad-2", "accepted"), "occurred_at": "yesterday"},
                event(a, "fine", "accepted"),
            ],
        )
        assert status == 422, body
        assert {e["index"] for e in body["errors"]} == {0, 1}

    async def done() -> bool:
        ra, rb = await checks.messages(router, a), await checks.messages(router, b)
        return (
            ra.get("valid", {}).get("starred") == 1
            and set(ra) == {"valid", "dup", "in"}
            and set(rb) == {"ooo", "impossible"}
        )

    await eventually(done, 60, "the pipeline's rows")
    ra, rb = await checks.messages(router, a), await checks.messages(router, b)
    assert ra["valid"]["status"] == "delivered" and ra["valid"]["starred"] == 1 and ra["valid"]["unread"] == 0
    assert ra["dup"]["status"] == "delivered"
    assert ra["in"]["status"] == "received" and ra["in"]["direction"] == "inbound"
    assert rb["ooo"]["status"] == "delivered"
    assert rb["impossible"]["status"] == "failed"
    # One record when a message is stored (sent, or final), one when it is delivered, one for the
    # late update (duplicates, late and impossible events add none), fewer where records of one
    # message went out as one (coalesced in a transform transaction); each row is at the version
    # of its message's last record.
    versions = await checks.postflight_versions(kafka_settings, {a, b}, tenant.created_ms)
    rows = {(a, key): row for key, row in ra.items()} | {(b, key): row for key, row in rb.items()}
    assert set(versions) == set(rows)
    most = {(a, "valid"): 3, (a, "dup"): 2, (a, "in"): 1, (b, "ooo"): 2, (b, "impossible"): 1}
    assert all(1 <= len(v) <= most[key] for key, v in versions.items()), versions
    assert all(v == sorted(set(v)) for v in versions.values()), versions
    for key, row in rows.items():
        assert row["version"] == versions[key][-1], (key, row, versions[key])
    checks.assert_exact_changes(
        await checks.changes(router, a), {r["id"]: (r["version"], False) for r in ra.values()}
    )
    checks.assert_exact_changes(
        await checks.changes(router, b), {r["id"]: (r["version"], False) for r in rb.values()}
    )

    # The impossible transition is in the DLQ with its stage and reason; so are the refused items.
    transform_dead = await dlq_entries(
        kafka_settings, impossible[2]["event_id"].encode(), 1, tenant.created_ms
    )
    assert transform_dead and transform_dead[0]["flightlog-stage"] == b"transform"
    assert b"delivered" in transform_dead[0]["flightlog-reason"]
    ingest_dead = await dlq_entries(kafka_settings, refused_key.encode(), 1, tenant.created_ms)
    assert ingest_dead and ingest_dead[0]["flightlog-stage"] == b"ingest"
    assert ingest_dead[0]["flightlog-application"] == str(tenant.application.id).encode()
    assert ingest_dead[0]["flightlog-account"] == str(a).encode()
