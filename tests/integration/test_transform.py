"""transform against the real Kafka: lifecycle, DLQ, restore from the changelog, crashes.

Every test gets its own topics, consumer group and transactional id, so a ``make dev`` transform
on the default topics does not interfere. DLQ records go to the shared DLQ topic and are told
apart by their source-topic header.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import REGISTRY

from cli.services import LocalService
from libs.config import KafkaSettings
from libs.dlq import DeadLetter, parse_dead_letter
from libs.events import (
    Event,
    EventType,
    MessageFlags,
    MessagePatch,
    Participant,
    PostflightRecord,
    Status,
    decode_event,
    decode_postflight,
    encode,
    message_key_bytes,
)
from libs.kafka import DLQ, make_consumer, make_producer
from libs.lifecycle import MessageState, apply
from libs.mime import MAX_RAW_BYTES
from services.transform.worker import TransformWorker
from tests.polling import eventually
from tests.scratch import group_name, transform_topics

pytestmark = pytest.mark.integration

PARTITIONS = 3
ACCOUNT = 3 << 48 | 42
T0 = datetime(2026, 3, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Env:
    kafka: KafkaSettings
    inflight: str
    postflight: str
    state: str
    group: str
    transactional_id: str
    dlq_start: int

    def worker(self, **overrides: Any) -> TransformWorker:
        options: dict[str, Any] = {
            "transactional_id": self.transactional_id,
            "group_id": self.group,
            "inflight_topic": self.inflight,
            "postflight_topic": self.postflight,
            "state_topic": self.state,
            "session_timeout_ms": 6000,
            **overrides,
        }
        return TransformWorker(self.kafka, **options)

    def process_env(self, instance: str) -> dict[str, str]:
        return {
            "FLIGHTLOG_INSTANCE_ID": instance,
            "FLIGHTLOG_TRANSFORM_GROUP_ID": self.group,
            "FLIGHTLOG_TRANSFORM_INFLIGHT_TOPIC": self.inflight,
            "FLIGHTLOG_TRANSFORM_POSTFLIGHT_TOPIC": self.postflight,
            "FLIGHTLOG_TRANSFORM_STATE_TOPIC": self.state,
            "FLIGHTLOG_TRANSFORM_SESSION_TIMEOUT_MS": "6000",
            "FLIGHTLOG_LOG_LEVEL": "INFO",
        }


async def _end_offsets(kafka: KafkaSettings, topic: str, partitions: int) -> dict[TopicPartition, int]:
    consumer = make_consumer(kafka, group_id=None)
    async with consumer:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        return dict(await consumer.end_offsets(tps))


async def make_env(kafka_settings: KafkaSettings, prefix: str) -> Env:
    """Topics, a consumer group and a transactional id of one test's own, named after ``prefix``."""
    group = group_name(prefix)
    inflight, postflight, state = await transform_topics(kafka_settings, prefix, PARTITIONS)
    dlq_end = await _end_offsets(kafka_settings, DLQ, 1)
    return Env(
        kafka_settings, inflight, postflight, state, group, group,
        dlq_end[TopicPartition(DLQ, 0)],
    )  # fmt: skip


@pytest.fixture
async def env(topics: None, kafka_settings: KafkaSettings) -> Env:
    return await make_env(kafka_settings, "transform")


_ids = iter(range(10**9))


def ev(type_: EventType, key: str, at: int = 0, *, event_id: str | None = None, **kw: Any) -> Event:
    return Event(
        event_id=event_id or f"ev-{next(_ids)}",
        account_id=ACCOUNT,
        message_key=key,
        type=type_,
        occurred_at=T0 + timedelta(seconds=at),
        **kw,
    )


async def produce(env: Env, events: list[Event | tuple[bytes, bytes]]) -> None:
    async with make_producer(env.kafka, linger_ms=20) as producer:
        futures = []
        for item in events:
            if isinstance(item, Event):
                key, value = message_key_bytes(item.account_id, item.message_key), encode(item)
            else:
                key, value = item
            futures.append(await producer.send(env.inflight, value, key=key))
        await asyncio.gather(*futures)


async def read_all(kafka: KafkaSettings, topic: str, partitions: int, start: int = 0) -> list[Any]:
    """Every committed record of ``topic`` (read_committed), up to the last stable offset."""
    consumer = make_consumer(kafka, group_id=None)
    async with consumer:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, start)
        ends = await consumer.end_offsets(tps)
        got: list[Any] = []
        pending = {tp for tp in tps if ends[tp] > start}
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=1000)
            for records in batch.values():
                got.extend(records)
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return got


async def postflight(env: Env) -> list[PostflightRecord]:
    return [decode_postflight(r.value) for r in await read_all(env.kafka, env.postflight, PARTITIONS)]


async def dead_letters(env: Env) -> list[DeadLetter]:
    records = await read_all(env.kafka, DLQ, 1, env.dlq_start)
    letters = [parse_dead_letter(r.key, r.value, r.headers, r.offset) for r in records]
    return [d for d in letters if d.source_topic == env.inflight]


@contextlib.asynccontextmanager
async def running(worker: TransformWorker) -> AsyncIterator[TransformWorker]:
    stopping = asyncio.Event()
    async with worker:
        task = asyncio.create_task(worker.run(stopping), name="transform-test-worker")
        try:
            await eventually(
                _ready_and_assigned(worker, task), 60, "the worker to own every partition and restore"
            )
            yield worker
        finally:
            stopping.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 30)


def _consumed(env: Env) -> Callable[[], Awaitable[bool]]:
    """The positive marker after the events under test: the group's committed inflight offsets
    reach the topic's end. Outputs commit in the transaction of those offsets (read_committed), so
    from then on nothing more can follow from these events."""

    async def check() -> bool:
        ends = await _end_offsets(env.kafka, env.inflight, PARTITIONS)
        admin = AIOKafkaAdminClient(bootstrap_servers=env.kafka.kafka_bootstrap_servers)
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(env.group)
        finally:
            await admin.close()
        return all(end == 0 or (tp in committed and committed[tp].offset >= end) for tp, end in ends.items())

    return check


def _ready_and_assigned(worker: TransformWorker, task: asyncio.Task[None]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        if task.done():
            task.result()
        return worker.ready and worker.assigned_partitions == set(range(PARTITIONS))

    return check


def by_message(records: list[PostflightRecord]) -> dict[str, list[PostflightRecord]]:
    out: dict[str, list[PostflightRecord]] = {}
    for record in records:
        out.setdefault(record.message_key, []).append(record)
    return out


async def test_lifecycle_dedupe_order_updates_and_dlq(env: Env) -> None:
    content = {"from": "a@x.io", "to": ["b@y.io"], "subject": "Hello", "body_text": "Hi  there"}
    accepted = ev(EventType.ACCEPTED, "out-1", 0, content=content)
    delivered = ev(EventType.DELIVERED, "out-1", 4)
    queued = ev(EventType.QUEUED, "out-1", 1)
    sent = ev(EventType.SENT, "out-1", 3)
    events: list[Event | tuple[bytes, bytes]] = [
        # out-1: sent first (stored: a record without content), delivered (an update), then
        # duplicates and late events: one more update because the late accepted brings the content
        # the first records lacked. All of it is one transaction, in which a record without
        # content goes out within the message's record before it (coalesced).
        sent, delivered, delivered, accepted, queued, sent, ev(EventType.DELIVERED, "out-1", 5),
        ev(EventType.UPDATED, "out-1", 6, flags={"starred": True}),
        ev(EventType.UPDATED, "out-1", 7, flags={"starred": True}),  # no change: no record
        ev(EventType.REDACTED, "out-1", 8),
        # in-1: inbound, read before it was final (a patch, for a stored row transform may have
        # forgotten, then in the final record), then moved.
        ev(EventType.RECEIVING, "in-1", 0, content={"subject": "news"}),
        ev(EventType.UPDATED, "in-1", 1, flags={"unread": False}),
        ev(EventType.RECEIVED, "in-1", 2),
        ev(EventType.UPDATED, "in-1", 3, flags={"folder": "Archive"}),
        ev(EventType.DELETED, "in-1", 4),
        ev(EventType.UPDATED, "in-1", 5, flags={"unread": True}),  # after deletion: DLQ
        # bad-1: an impossible transition.
        ev(EventType.FAILED, "bad-1", 0, content={"error_code": "30003"}),
        ev(EventType.DELIVERED, "bad-1", 1),
        (b"junk", b"\xff not json"),
        (b"wrong-schema", b'{"schema_version": 1, "event_id": "x"}'),
    ]  # fmt: skip
    await produce(env, events)

    async with running(env.worker()):
        await eventually(lambda: _count(env, 7), 60, "7 postflight records")
        await eventually(lambda: _dlq_count(env, 4), 30, "4 dead letters")
        await eventually(_consumed(env), 30, "every event committed")
    assert len(await postflight(env)) == 7 and len(await dead_letters(env)) == 4

    records = by_message(await postflight(env))
    assert sorted(records) == ["bad-1", "in-1", "out-1"]
    # A record's version is its event's inflight offset plus one: growing, and the same on replay.
    offsets: dict[bytes, set[int]] = {}
    for r in await read_all(env.kafka, env.inflight, PARTITIONS):
        offsets.setdefault(r.key, set()).add(r.offset)
    for key, recs in records.items():
        versions = [r.version for r in recs]
        assert versions == sorted(set(versions))
        assert {v - 1 for v in versions} <= offsets[message_key_bytes(ACCOUNT, key)]
    # out-1: sent and delivered as one record (the content version is the sent record's: none
    # then), the late content and the star as one, the redaction.
    out = records["out-1"]
    assert len(out) == 3 and all(r.patch is None for r in out)
    assert out[0].message.status is Status.DELIVERED and out[0].message.subject is None
    assert out[0].content_version is not None and 0 < out[0].content_version < out[0].version
    filled = out[1].message
    assert filled.status is Status.DELIVERED and filled.subject == "Hello" and filled.snippet == "Hi there"
    assert filled.occurred_at == T0 and filled.final_at == T0 + timedelta(seconds=4) and filled.starred
    assert out[1].content_version is not None and out[0].version < out[1].content_version < out[1].version
    assert out[2].message.redacted and out[2].message.body_text is None

    # in-1: the patch (a patch goes out alone), received and moved as one record, the deletion.
    inbound = records["in-1"]
    assert len(inbound) == 3
    assert inbound[0].patch == MessagePatch(flags=MessageFlags(unread=False))
    assert inbound[1].message.unread is False and inbound[1].message.status is Status.RECEIVED
    assert inbound[1].message.folder == "Archive" and inbound[1].message.subject == "news"
    assert inbound[1].content_version is not None and inbound[1].content_version < inbound[1].version
    assert inbound[2].deleted and inbound[2].patch is None

    assert len(records["bad-1"]) == 1
    assert records["bad-1"][0].message.status is Status.FAILED

    letters = await dead_letters(env)
    assert all(d.stage == "transform" for d in letters)
    reasons = sorted(d.reason for d in letters)
    assert any("delivered after failed" in r for r in reasons), reasons
    assert any("message was deleted" in r for r in reasons), reasons
    assert sum("undecodable event" in r for r in reasons) == 2, reasons
    junk = next(d for d in letters if d.key == b"junk")
    assert junk.value == b"\xff not json" and junk.source_offset is not None
    # Whose each letter is, for a replay's owner check: the account of its key, none for keys
    # that name none.
    assert {d.account_id for d in letters if "undecodable event" in d.reason} == {None}
    assert {d.account_id for d in letters if "undecodable event" not in d.reason} == {ACCOUNT}

    # The changelog partition of a message is its inflight partition.
    inflight_partition = {
        r.key: r.partition for r in await read_all(env.kafka, env.inflight, PARTITIONS) if r.key
    }
    changelog = await read_all(env.kafka, env.state, PARTITIONS)
    assert changelog
    for record in changelog:
        assert record.partition == inflight_partition[record.key]
    last = {r.key: MessageState.model_validate_json(r.value) for r in changelog}
    assert last[message_key_bytes(ACCOUNT, "out-1")].version == out[-1].version
    # A final message's state keeps no content: persist has it.
    assert last[message_key_bytes(ACCOUNT, "out-1")].subject is None


async def test_raw_mime_is_expanded_and_a_message_too_large_to_record_goes_to_the_dlq(env: Env) -> None:
    head = b"Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\nFrom: a@x.io\r\nMessage-ID: <t@x>\r\n"
    small = head + (
        b"Reply-To: Ann <r@x.io>\r\nDate: Tue, 1 Jul 2025 10:00:00 +0200\r\nReferences: <p@x>\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n"
    )
    # Control characters are escaped six-fold in JSON: a legal raw message whose state cannot be
    # one Kafka record. The producer would refuse it on every retry; it must go to the DLQ.
    huge = head + b"Content-Type: text/plain\r\n\r\n" + b"\x01" * (MAX_RAW_BYTES - len(head) - 40)
    synced = [
        ev(EventType.SYNCED, key, 0, content={"raw_mime": base64.b64encode(raw).decode()}, source="imap")
        for key, raw in (("huge", huge), ("small", small))
    ]
    await produce(env, [*synced])
    async with running(env.worker()) as worker:
        await eventually(lambda: _count(env, 1), 60, "the small message's record")
        await eventually(lambda: _dlq_count(env, 1), 30, "the huge message's dead letter")
        assert worker.state_of(ACCOUNT, "huge") is None
    (record,) = await postflight(env)
    assert record.message_key == "small" and record.message.subject == "grüße"
    assert record.message.sender == Participant(email="a@x.io") and record.message.thread_key is not None
    assert record.message.size_bytes == len(small)
    assert record.message.reply_to == [Participant(name="Ann", email="r@x.io")]
    assert record.message.date == datetime(2025, 7, 1, 8, tzinfo=UTC)
    assert record.message.message_id == "<t@x>" and record.message.references == ["<p@x>"]
    (letter,) = await dead_letters(env)
    assert "message too large" in letter.reason and letter.value is not None
    assert letter.value == encode(synced[0])
    changelog = await read_all(env.kafka, env.state, PARTITIONS)
    assert [r.key for r in changelog] == [message_key_bytes(ACCOUNT, "small")]
    assert b"raw_mime" not in changelog[0].value


async def _count(env: Env, n: int) -> bool:
    got = len(await postflight(env))
    assert got <= n, f"{got} postflight records, expected {n}"
    return got == n


async def _dlq_count(env: Env, n: int) -> bool:
    return len(await dead_letters(env)) >= n


async def test_restart_restores_state_from_changelog(env: Env) -> None:
    await produce(env, [ev(EventType.ACCEPTED, "m", 0), ev(EventType.DELIVERED, "m", 1)])
    async with running(env.worker()):
        await eventually(lambda: _count(env, 1), 60, "the final record")

    # A new instance with the same group and transactional id knows the message is final.
    async with running(env.worker()) as worker:
        state = worker.state_of(ACCOUNT, "m")
        (final,) = await postflight(env)
        assert state is not None and state.final and state.version == final.version
        await produce(
            env,
            [
                ev(EventType.DELIVERED, "m", 2),  # the same final again: a duplicate
                ev(EventType.SENT, "m", 1),  # late
                ev(EventType.UPDATED, "m", 3, flags={"unread": True}),
            ],
        )
        await eventually(lambda: _count(env, 2), 60, "the update record")
        await eventually(_consumed(env), 30, "every event committed")
    records = await postflight(env)
    assert records[0] == final and records[1].version > final.version
    assert records[1].message.unread is True
    assert await dead_letters(env) == []


def _bulk_events(messages: int, seed: int) -> list[Event | tuple[bytes, bytes]]:
    rng = random.Random(seed)
    events: list[Event | tuple[bytes, bytes]] = []
    for i in range(messages):
        key = f"bulk-{i}"
        lifecycle = [
            ev(EventType.ACCEPTED, key, 0, content={"subject": f"s{i}", "body_text": "x" * 200}),
            ev(EventType.SENT, key, 1),
            ev(rng.choice([EventType.DELIVERED, EventType.FAILED]), key, 2),
        ]
        if rng.random() < 0.3:
            lifecycle.append(lifecycle[rng.randrange(3)])  # a duplicate
        rng.shuffle(lifecycle)
        events.extend(lifecycle)
    return events


async def _expected_records(env: Env) -> set[tuple[str, int]]:
    """What the pure lifecycle emits for the inflight topic as it is, in each partition's order and
    with each event's offset: (message key, version) of every record."""
    states: dict[str, MessageState | None] = {}
    expected: set[tuple[str, int]] = set()
    records = await read_all(env.kafka, env.inflight, PARTITIONS)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        event = decode_event(record.value)
        outcome = apply(states.get(event.message_key), event, position=record.offset)
        states[event.message_key] = outcome.state
        if outcome.record is not None:
            expected.add((event.message_key, outcome.record.version))
    return expected


def _assert_exactly_once(records: list[PostflightRecord], expected: set[tuple[str, int]]) -> None:
    """No record twice, none the lifecycle does not emit, and every message's last one. A record
    that went out within a later one of its transaction (coalesced, as the unit tests hold) is
    not there of its own: which ones did depends on where the batches were cut."""
    seen = [(r.message_key, r.version) for r in records]
    assert len(seen) == len(set(seen)), "duplicated postflight records"
    assert set(seen) <= expected, "records the lifecycle does not emit"
    last: dict[str, int] = {}
    for key, version in [*expected, *seen]:
        last[key] = max(last.get(key, 0), version)
    got: dict[str, int] = {}
    for key, version in seen:
        got[key] = max(got.get(key, 0), version)
    assert got == last, "a message's last record is missing"


async def test_cancel_mid_run_then_resume_has_no_duplicates(env: Env) -> None:
    messages = 10_000
    events = _bulk_events(messages, seed=1)
    await produce(env, events)
    expected = await _expected_records(env)
    total = len(expected)

    base = _committed_events()
    first = env.worker(max_batch_records=500)
    async with first:
        stopping = asyncio.Event()
        task = asyncio.create_task(first.run(stopping), name="transform-test-cancelled")
        await eventually(_some(env), 60, "the first postflight records")
        await asyncio.sleep(random.uniform(0, 0.05))  # land anywhere in a batch
        task.cancel()  # an open transaction is aborted; a commit under way is finished
        with contextlib.suppress(asyncio.CancelledError):
            await task
    done_before = len(await postflight(env))
    assert 0 < done_before < total

    remaining = len(events) - (_committed_events() - base)
    assert remaining > 0
    async with running(env.worker()):
        # The group's offsets, not the metric: a cancel that lands while a commit is finishing
        # commits the batch without counting it.
        await eventually(_consumed(env), 120, "every event committed")
    # The records commit with the offsets: all of them are there.
    _assert_exactly_once(await postflight(env), expected)


def _committed_events() -> float:
    return sum(
        REGISTRY.get_sample_value("flightlog_transform_events_total", {"outcome": o}) or 0.0
        for o in ("emitted", "applied", "ignored", "rejected", "undecodable", "error")
    )


def _some(env: Env) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(await postflight(env)) > 0

    return check


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.e2e
async def test_kill_9_mid_run_produces_no_duplicates(env: Env, tmp_path: Path) -> None:
    events = _bulk_events(20_000, seed=2)
    await produce(env, events)
    expected = await _expected_records(env)
    total = len(expected)
    instance = f"t-{uuid.uuid4().hex[:6]}"
    service = LocalService(
        "transform", _free_port(), tmp_path, env=env.process_env(instance), instance=f"-{instance}"
    )
    try:
        await asyncio.to_thread(service.start, wait_s=60)
        await eventually(_some(env), 60, "the first postflight records")
        await asyncio.to_thread(service.proc.kill)
        done_before = len(await postflight(env))
        assert done_before < total, "the kill came too late to test anything"

        # Same instance id, so the same transactional id: the new producer fences the dead one
        # and aborts its open transaction.
        await asyncio.to_thread(service.start, wait_s=60)
        await eventually(_consumed(env), 180, "every event committed")  # the records with them
    finally:
        await asyncio.to_thread(service.proc.stop, 40)
    _assert_exactly_once(await postflight(env), expected)


async def test_expired_states_are_tombstoned_and_a_forgotten_message_gets_patches(env: Env) -> None:
    # The sweep runs when called below (its interval is long), forgetting any final state at once.
    options = {"final_state_ttl_s": 0.0, "state_sweep_interval_s": 3600.0}
    await produce(env, [ev(EventType.RECEIVED, "old", 0, content={"subject": "kept by persist"}),
                        ev(EventType.ACCEPTED, "pending", 0)])  # fmt: skip
    async with running(env.worker(**options)) as worker:
        await eventually(lambda: _count(env, 1), 60, "the final record")
        assert await worker.sweep() == 1  # the final one; the pending one waits for its own TTL
        assert worker.state_of(ACCOUNT, "old") is None and worker.state_of(ACCOUNT, "pending") is not None
        (final,) = await postflight(env)

        await produce(env, [ev(EventType.UPDATED, "old", 1, flags={"unread": True}),
                            ev(EventType.DELETED, "old", 2)])  # fmt: skip
        await eventually(lambda: _count(env, 3), 60, "two patches")
    _, flags, deletion = await postflight(env)
    assert flags.patch == MessagePatch(flags=MessageFlags(unread=True)) and flags.version > final.version
    assert deletion.patch == MessagePatch(deleted=True) and deletion.version > flags.version
    assert await dead_letters(env) == []

    # The changelog holds the tombstone: a new instance restores only what is live.
    changelog = await read_all(env.kafka, env.state, PARTITIONS)
    old_key = message_key_bytes(ACCOUNT, "old")
    assert [r.value is None for r in changelog if r.key == old_key][:2] == [False, True]
    async with running(env.worker(**options)) as restored:
        assert restored.state_of(ACCOUNT, "pending") is not None
        forgotten_again = restored.state_of(ACCOUNT, "old")  # the patches' pending state, not final
        assert forgotten_again is not None and not forgotten_again.final and forgotten_again.deleted
