"""POST /v1/events against a real ingest process, Kafka and MariaDB."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from cli.dlq import read_dead_letters, replay, topic_partitions
from cli.services import LocalService
from cli.stack import Stack
from libs.accounts import create_account, create_application
from libs.config import KafkaSettings
from libs.events import Event, decode_event, message_key_bytes
from libs.kafka import INFLIGHT, make_consumer
from libs.shards import ShardMap, ShardRouter
from tests.e2e.conftest import E2E_ENV, E2E_INSTANCE, E2E_PORT_OFFSET
from tests.scratch import app_name

pytestmark = pytest.mark.integration

RATE_PER_S = 100
BURST = 500


@pytest.fixture(scope="module")
def ingest(stack: Stack, shard_map: ShardMap, topics: None) -> Iterator[LocalService]:
    # A port and instance of its own, without IMAP sync: it would join the shared IMAP group and
    # take accounts from `make dev`'s ingest.
    svc = LocalService(
        "ingest",
        8081 + E2E_PORT_OFFSET - 90,
        stack.settings.state_dir,
        env={
            **E2E_ENV,
            "FLIGHTLOG_IMAP_SYNC_ENABLED": "false",
            "FLIGHTLOG_INGEST_RATE_PER_ACCOUNT_S": str(RATE_PER_S),
            "FLIGHTLOG_INGEST_BURST_PER_ACCOUNT": str(BURST),
        },
        instance=f"{E2E_INSTANCE}-ingest-test",
    )
    svc.start()
    try:
        yield svc
    finally:
        svc.proc.stop(timeout_s=30)


@dataclass(frozen=True, slots=True)
class Tenant:
    api_key: str
    accounts: tuple[int, int]
    foreign_account: int  # belongs to another application
    application_id: int


@pytest.fixture
async def tenant(router: ShardRouter) -> Tenant:
    suffix = uuid.uuid4().hex[:8]
    app, key = await create_application(router, app_name("ingest"))
    a = await create_account(router, app.id, f"a-{suffix}@example.com")
    b = await create_account(router, app.id, f"b-{suffix}@example.com")
    other, _ = await create_application(router, app_name("ingest-other"))
    c = await create_account(router, other.id, f"c-{suffix}@example.com")
    return Tenant(key, (a.id, b.id), c.id, app.id)


@pytest.fixture
async def http(ingest: LocalService) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(ingest.address) as session:
        yield session


def item(account_id: int, message_key: str, type_: str = "message.queued", **extra: Any) -> dict[str, Any]:
    return {
        "account_id": str(account_id),
        "message_key": message_key,
        "type": type_,
        "occurred_at": "2025-01-02T03:04:05Z",
        **extra,
    }


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def inflight_ends(settings: KafkaSettings) -> dict[TopicPartition, int]:
    tps = await topic_partitions(settings, INFLIGHT)
    async with make_consumer(settings, group_id=None) as consumer:
        return dict(await consumer.end_offsets(tps))


async def read_inflight(
    settings: KafkaSettings, start: dict[TopicPartition, int], end: dict[TopicPartition, int]
) -> list[tuple[bytes | None, Event]]:
    """The committed records between two sets of offsets, in partition order."""
    out: list[tuple[bytes | None, Event]] = []
    async with make_consumer(settings, group_id=None) as consumer:
        consumer.assign(list(end))
        await asyncio.sleep(0)  # aiokafka's group-less coordinator must start before stop() cancels it
        for tp, offset in start.items():
            consumer.seek(tp, offset)
        for tp in end:
            while await consumer.position(tp) < end[tp]:
                batch = await consumer.getmany(tp, timeout_ms=5000)
                assert batch, f"{tp} stopped short of {end[tp]}"
                out += [(r.key, decode_event(r.value)) for r in batch[tp] if r.offset < end[tp] and r.value]
    return out


async def test_202_only_once_the_events_are_on_inflight(
    http: aiohttp.ClientSession, tenant: Tenant, kafka_settings: KafkaSettings
) -> None:
    a, b = tenant.accounts
    key = f"msg-{uuid.uuid4().hex}"
    batch = [
        item(a, key, "message.accepted", event_id=f"e1-{key}"),
        item(a, key, "message.queued"),  # no event_id: ingest makes one
        item(a, key, "message.sent", source="provider-x"),
        item(b, key, "message.received", direction="inbound"),
    ]
    before = await inflight_ends(kafka_settings)
    async with http.post("/v1/events", json={"events": batch}, headers=auth(tenant.api_key)) as resp:
        assert resp.status == 202, await resp.text()
        body = await resp.json()
    # Read at once, read_committed, up to the end offsets as they stand right after the answer.
    after = await inflight_ends(kafka_settings)
    assert body["accepted"] == 4
    ids = body["event_ids"]
    assert ids[0] == f"e1-{key}" and len(set(ids)) == 4 and all(ids)

    found = {ev.event_id: (k, ev) for k, ev in await read_inflight(kafka_settings, before, after)}
    assert set(ids) <= set(found)
    mine = [found[i] for i in ids]
    assert [k for k, _ in mine] == [message_key_bytes(a, key)] * 3 + [message_key_bytes(b, key)]
    events = [ev for _, ev in mine]
    assert all(ev.received_at is not None for ev in events)
    assert [ev.source for ev in events] == ["api", "api", "provider-x", "api"]
    # One message's events share a partition and keep their order there.
    ordered = [
        ev.event_id for _, ev in await read_inflight(kafka_settings, before, after) if ev.event_id in ids[:3]
    ]
    assert ordered == ids[:3]


async def test_401_without_a_valid_key(http: aiohttp.ClientSession, tenant: Tenant) -> None:
    batch = {"events": [item(tenant.accounts[0], "k")]}
    for headers in ({}, auth("flk_not-a-key"), {"Authorization": f"Basic {tenant.api_key}"}):
        async with http.post("/v1/events", json=batch, headers=headers) as resp:
            assert resp.status == 401
            assert resp.content_type == "application/problem+json"
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_413_for_a_body_or_batch_over_the_limits(http: aiohttp.ClientSession, tenant: Tenant) -> None:
    a = tenant.accounts[0]
    big = orjson.dumps({"events": [item(a, "k", content={"body_text": "x" * 400_000})] * 3})
    assert len(big) > 1024 * 1024
    headers = {**auth(tenant.api_key), "Content-Type": "application/json"}
    async with http.post("/v1/events", data=io.BytesIO(big), headers=headers) as resp:
        assert resp.status == 413
        assert resp.content_type == "application/problem+json"
    async with http.post(
        "/v1/events", json={"events": [item(a, "k")] * 501}, headers=auth(tenant.api_key)
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["max_events_per_request"] == 500


async def test_415_for_anything_but_json(http: aiohttp.ClientSession, tenant: Tenant) -> None:
    headers = {**auth(tenant.api_key), "Content-Type": "text/plain"}
    async with http.post("/v1/events", data=b'{"events": []}', headers=headers) as resp:
        assert resp.status == 415
        assert resp.content_type == "application/problem+json"


async def test_422_lists_every_bad_item_and_dead_letters_them(
    http: aiohttp.ClientSession, tenant: Tenant, kafka_settings: KafkaSettings
) -> None:
    a = tenant.accounts[0]
    key = f"bad-{uuid.uuid4().hex}"
    unknown = (1 << 48) + (1 << 40) + 12345  # on a real shard, never allocated
    batch = [
        item(a, key, event_id=f"good-{key}"),
        item(a, key, "message.teleported"),
        {k: v for k, v in item(a, key, event_id=f"nokey-{key}").items() if k != "message_key"},
        item(a, key, occurred_at="yesterday"),
        item(tenant.foreign_account, key),
        item(unknown, key),
    ]
    before = await inflight_ends(kafka_settings)
    async with http.post("/v1/events", json={"events": batch}, headers=auth(tenant.api_key)) as resp:
        assert resp.status == 422
        assert resp.content_type == "application/problem+json"
        body = await resp.json()
    after = await inflight_ends(kafka_settings)
    by_index = {e["index"]: e for e in body["errors"]}
    assert sorted(by_index) == [1, 2, 3, 4, 5]
    assert by_index[1]["field"] == "type"
    assert by_index[2]["field"] == "message_key" and "required" in by_index[2]["message"].lower()
    assert by_index[3]["field"] == "occurred_at"
    # Another application's account and a missing one are told apart by nothing.
    assert by_index[4] == {"index": 4, "field": "account_id", "message": "account not found"}
    assert by_index[5] == {"index": 5, "field": "account_id", "message": "account not found"}

    # Nothing of the batch was accepted, not even the good item.
    assert all(ev.event_id != f"good-{key}" for _, ev in await read_inflight(kafka_settings, before, after))

    # Every bad item is on the DLQ with its raw JSON and the reason; the good one is not.
    entries = [
        e
        for e in await read_dead_letters(kafka_settings, stage="ingest")
        if e.value and key.encode() in e.value
    ]
    assert len(entries) == 5
    values = [orjson.loads(e.value or b"") for e in entries]
    for i in range(1, 6):
        assert batch[i] in values
    assert batch[0] not in values
    reasons = {orjson.dumps(orjson.loads(e.value or b"")): e.reason for e in entries}
    assert "type" in reasons[orjson.dumps(batch[1])]
    assert "account not found" in reasons[orjson.dumps(batch[4])]
    assert "occurred_at" in reasons[orjson.dumps(batch[3])]
    # Each carries the poster's application and the account it names.
    assert {e.application_id for e in entries} == {tenant.application_id}
    by_item = {orjson.dumps(orjson.loads(e.value or b"")): e for e in entries}
    assert by_item[orjson.dumps(batch[4])].account_id == tenant.foreign_account
    assert by_item[orjson.dumps(batch[1])].account_id == a

    # A replay does not put the item naming another application's account back for it.
    foreign = by_item[orjson.dumps(batch[4])]
    assert foreign.dlq_offset is not None
    (refused,) = await replay(kafka_settings, offsets=[foreign.dlq_offset], stage="ingest")
    assert refused.topic is None
    assert refused.skipped == (
        f"account {tenant.foreign_account} does not belong to application {tenant.application_id},"
        " which posted the entry"
    )


async def test_429_when_one_account_floods_while_another_gets_through(
    http: aiohttp.ClientSession, tenant: Tenant
) -> None:
    a, b = tenant.accounts
    full = {"events": [item(a, f"flood-{i}") for i in range(BURST)]}
    async with http.post("/v1/events", json=full, headers=auth(tenant.api_key)) as resp:
        assert resp.status == 202, await resp.text()
    async with http.post("/v1/events", json=full, headers=auth(tenant.api_key)) as resp:
        assert resp.status == 429
        assert resp.content_type == "application/problem+json"
        retry_after = int(resp.headers["Retry-After"])
        problem = await resp.json()
    assert 1 <= retry_after <= BURST // RATE_PER_S + 1
    assert problem["account_id"] == str(a)
    assert str(a) in problem["detail"]
    # A mixed batch is refused whole: b's budget is untouched by it...
    mixed = {"events": [item(b, "m-1")] + [item(a, f"m-{i}") for i in range(BURST // 2)]}
    async with http.post("/v1/events", json=mixed, headers=auth(tenant.api_key)) as resp:
        assert resp.status == 429
    # ...so b can still spend its full burst.
    other = {"events": [item(b, f"calm-{i}") for i in range(BURST)]}
    async with http.post("/v1/events", json=other, headers=auth(tenant.api_key)) as resp:
        assert resp.status == 202, await resp.text()


async def test_limits_are_published(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/events/limits") as resp:
        assert resp.status == 200
        limits = await resp.json()
    assert limits["max_events_per_request"] == 500
    assert limits["max_body_bytes"] == 1024 * 1024
    assert limits["content_type"] == "application/json"
    assert limits["rate_per_account_s"] == RATE_PER_S
    assert limits["burst_per_account"] == BURST
    assert limits["event"]["max_message_key_length"] == 255


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _metrics(
    http: aiohttp.ClientSession, ingest: LocalService
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with http.get(f"{ingest.management_address}/metrics") as resp:
        return _samples(await resp.text())


async def test_metrics_count_outcomes(
    http: aiohttp.ClientSession, ingest: LocalService, tenant: Tenant
) -> None:
    """Three accepted events, then a batch of one invalid and two good ones: the counters move by
    exactly those numbers, and each request is timed under its status."""
    a, _ = tenant.accounts
    before = await _metrics(http, ingest)
    good = {"events": [item(a, f"count-{i}") for i in range(3)]}
    async with http.post("/v1/events", json=good, headers=auth(tenant.api_key)) as resp:
        assert resp.status == 202, await resp.text()
    bad = {
        "events": [
            item(a, "count-ok-1"),
            item(a, "count-bad", type_="message.exploded"),
            item(a, "count-ok-2"),
        ]
    }
    async with http.post("/v1/events", json=bad, headers=auth(tenant.api_key)) as resp:
        assert resp.status == 422, await resp.text()
    after = await _metrics(http, ingest)

    def moved(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("flightlog_ingest_events_accepted_total") == 3
    assert moved("flightlog_ingest_events_rejected_total", reason="invalid") == 1
    assert moved("flightlog_ingest_events_rejected_total", reason="batch") == 2
    assert moved("flightlog_ingest_events_rejected_total", reason="rate_limited") == 0
    assert moved("flightlog_ingest_request_seconds_count", status="202") == 1
    assert moved("flightlog_ingest_request_seconds_count", status="422") == 1
