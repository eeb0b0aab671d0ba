"""`flightlog dlq list|replay` against the real flightlog.dlq topic."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from aiokafka import TopicPartition
from typer.testing import CliRunner

from cli.dlq import dlq_app, read_dead_letters, replay
from libs.accounts import create_account, create_application
from libs.config import DatabaseSettings, KafkaSettings
from libs.dlq import dead_letter
from libs.events import decode_event, message_key_bytes
from libs.kafka import INFLIGHT, TopicSpec, create_topics, make_consumer, make_producer
from libs.shards import ShardRouter
from tests.scratch import app_name, topic_name

pytestmark = pytest.mark.integration


async def record_at(
    settings: KafkaSettings, topic: str, partition: int, offset: int
) -> tuple[bytes | None, bytes]:
    tp = TopicPartition(topic, partition)
    async with make_consumer(settings, group_id=None) as consumer:
        consumer.assign([tp])
        await asyncio.sleep(0)  # aiokafka's group-less coordinator must start before stop() cancels it
        consumer.seek(tp, offset)
        batch = await consumer.getmany(tp, timeout_ms=10_000, max_records=1)
    (rec,) = batch[tp]
    assert rec.offset == offset and rec.value is not None
    return rec.key, rec.value


async def test_list_shows_entries(topics: None, kafka_settings: KafkaSettings) -> None:
    stage = f"test-{uuid.uuid4().hex[:8]}"
    async with make_producer(kafka_settings) as producer:
        fut = await dead_letter(
            producer,
            stage=stage,
            reason="unknown transition sent -> queued",
            key=b"k",
            value=b'{"hello": "dlq"}',
            source=("flightlog.inflight", 3, 42),
            application_id=7,
            account_id=1234,
        )
        meta = await fut
    entries = await read_dead_letters(kafka_settings, stage=stage)
    assert [e.dlq_offset for e in entries] == [meta.offset]
    assert entries[0].reason == "unknown transition sent -> queued"
    assert (entries[0].application_id, entries[0].account_id) == (7, 1234)

    result = await asyncio.to_thread(CliRunner().invoke, dlq_app, ["list", "--stage", stage, "--limit", "5"])
    assert result.exit_code == 0, result.output
    assert str(meta.offset) in result.output
    assert stage in result.output
    assert "flightlog.inflight[3]@42" in result.output
    assert "application 7  account 1234" in result.output
    assert "unknown transition sent -> queued" in result.output
    assert '{"hello": "dlq"}' in result.output
    assert "1 entries" in result.output


async def test_replay_puts_the_original_bytes_back_on_the_source_topic(
    topics: None, kafka_settings: KafkaSettings, router: ShardRouter
) -> None:
    app, _ = await create_application(router, app_name("dlq-bytes"))
    account = await create_account(router, app.id, "bytes@example.com")
    source = topic_name("dlq-replay")
    await create_topics(kafka_settings, (TopicSpec(source, 1),))
    # Not JSON: the account it is put back for is the one in its key.
    key, value = f"{account.id}:msg\x00".encode() + b"\xff", b"\x00\x01 not json \xfe"
    async with make_producer(kafka_settings) as producer:
        original = await (await producer.send(source, value=value, key=key))
        dlq = await (
            await dead_letter(
                producer,
                stage="transform",
                reason="cannot decode",
                key=key,
                value=value,
                source=(source, original.partition, original.offset),
            )
        )

    replayed = await replay(kafka_settings, offsets=[dlq.offset])
    assert len(replayed) == 1
    r = replayed[0]
    assert (r.dlq_offset, r.topic, r.skipped) == (dlq.offset, source, None)
    assert r.partition is not None and r.offset is not None and r.offset == original.offset + 1
    assert await record_at(kafka_settings, source, r.partition, r.offset) == (key, value)

    # The command line does the same and says what it did.
    result = await asyncio.to_thread(CliRunner().invoke, dlq_app, ["replay", "--offset", str(dlq.offset)])
    assert result.exit_code == 0, result.output
    assert f"replayed to {source}[0]@{original.offset + 2}" in result.output
    assert await record_at(kafka_settings, source, 0, original.offset + 2) == (key, value)


async def test_replay_of_ingest_entries_goes_to_inflight_only_when_valid(
    topics: None, kafka_settings: KafkaSettings, db_settings: DatabaseSettings, router: ShardRouter
) -> None:
    app, _ = await create_application(router, app_name("dlq"))
    account = await create_account(router, app.id, "dlq@example.com")
    key = f"replayed-{uuid.uuid4().hex}"
    fixed = {
        "account_id": str(account.id),
        "message_key": key,
        "type": "message.queued",
        "occurred_at": "2025-01-02T03:04:05Z",
    }
    still_bad = {**fixed, "type": "message.teleported"}
    gone = {**fixed, "account_id": str((1 << 48) + (1 << 40) + 7)}
    offsets = []
    async with make_producer(kafka_settings) as producer:
        for item in (fixed, still_bad, gone):
            meta = await (
                await dead_letter(
                    producer,
                    stage="ingest",
                    reason="x",
                    key=None,
                    value=orjson.dumps(item),
                    application_id=app.id,
                )
            )
            offsets.append(meta.offset)

    results = {r.dlq_offset: r for r in await replay(kafka_settings, db_settings, offsets=offsets)}
    ok, bad, missing = (results[o] for o in offsets)
    assert ok.skipped is None and ok.topic == INFLIGHT
    assert ok.partition is not None and ok.offset is not None
    got_key, got_value = await record_at(kafka_settings, INFLIGHT, ok.partition, ok.offset)
    assert got_key == message_key_bytes(account.id, key)
    event = decode_event(got_value)
    assert (event.account_id, event.message_key, event.event_id != "") == (account.id, key, True)
    assert event.received_at is not None
    assert bad.topic is None and bad.skipped is not None and "type" in bad.skipped
    assert missing.topic is None and missing.skipped == f"account {gone['account_id']} not found"


async def test_replay_puts_entries_back_only_for_accounts_of_their_application(
    topics: None, kafka_settings: KafkaSettings, db_settings: DatabaseSettings, router: ShardRouter
) -> None:
    """Two tenants: A posts an item naming B's account (refused at ingest, so on the DLQ with A);
    replay must not put it back for B. ``--application`` scopes a replay to one tenant's entries."""
    a, _ = await create_application(router, app_name("dlq-a"))
    b, _ = await create_application(router, app_name("dlq-b"))
    a_account = await create_account(router, a.id, "a@example.com")
    b_account = await create_account(router, b.id, "b@example.com")
    source = topic_name("dlq-owners")
    await create_topics(kafka_settings, (TopicSpec(source, 1),))

    def posted(account_id: int) -> bytes:
        return orjson.dumps(
            {
                "account_id": str(account_id),
                "message_key": f"k-{uuid.uuid4().hex}",
                "type": "message.queued",
                "occurred_at": "2025-01-02T03:04:05Z",
            }
        )

    b_event = posted(b_account.id)
    async with make_producer(kafka_settings) as producer:
        entries = {
            # A's refused item naming B's account, as ingest writes it (poster A, account B)
            "a_names_b": dict(
                stage="ingest",
                value=posted(b_account.id),
                key=None,
                application_id=a.id,
                account_id=b_account.id,
            ),
            # A's own item, refused for a reason that no longer holds
            "a_own": dict(
                stage="ingest",
                value=posted(a_account.id),
                key=None,
                application_id=a.id,
                account_id=a_account.id,
            ),
            # written before the application was recorded: its owner cannot be checked
            "unrecorded": dict(stage="ingest", value=posted(a_account.id), key=None),
            # transform's entry for B's account: the owner is B, the account's owner
            "b_transform": dict(
                stage="transform",
                value=b_event,
                key=f"{b_account.id}:m".encode(),
                account_id=b_account.id,
                source=(source, 0, 0),
            ),
            # a record whose value names B's account under a key of A's: refused
            "mismatch": dict(
                stage="transform",
                value=b_event,
                key=f"{a_account.id}:m".encode(),
                account_id=a_account.id,
                source=(source, 0, 1),
            ),
        }
        offsets = {}
        for name, fields in entries.items():
            meta = await (await dead_letter(producer, reason=name, **fields))  # type: ignore[arg-type]
            offsets[name] = meta.offset
    by_offset = {o: n for n, o in offsets.items()}

    # Scoped to B: only B's entries (by the recorded application, else the account's owner).
    only_b = await replay(kafka_settings, db_settings, offsets=offsets.values(), application=b.id)
    assert [by_offset[r.dlq_offset] for r in only_b] == ["b_transform"]
    assert only_b[0].skipped is None and only_b[0].topic == source
    assert only_b[0].partition is not None and only_b[0].offset is not None
    assert await record_at(kafka_settings, source, only_b[0].partition, only_b[0].offset) == (
        f"{b_account.id}:m".encode(),
        b_event,
    )

    # Scoped to A: A's entries; the one naming B's account is refused, A's own goes to inflight.
    only_a = {
        by_offset[r.dlq_offset]: r
        for r in await replay(kafka_settings, db_settings, offsets=offsets.values(), application=a.id)
    }
    assert sorted(only_a) == ["a_names_b", "a_own", "mismatch", "unrecorded"]
    assert only_a["a_own"].skipped is None and only_a["a_own"].topic == INFLIGHT
    assert only_a["a_names_b"].topic is None
    assert only_a["a_names_b"].skipped == (
        f"account {b_account.id} does not belong to application {a.id}, which posted the entry"
    )
    assert only_a["unrecorded"].topic is None and only_a["unrecorded"].skipped is not None
    assert "no application recorded" in only_a["unrecorded"].skipped
    assert only_a["mismatch"].topic is None and only_a["mismatch"].skipped is not None
    assert f"names account {b_account.id} but was recorded for account {a_account.id}" in (
        only_a["mismatch"].skipped
    )

    # The command line: every entry of A (a fresh application: only these), refusals reported.
    result = await asyncio.to_thread(
        CliRunner().invoke, dlq_app, ["replay", "--all", "--application", str(a.id)]
    )
    assert result.exit_code == 1, result.output
    assert "1 replayed, 3 not replayed" in result.output
    assert f"does not belong to application {a.id}" in result.output
    listed = await asyncio.to_thread(CliRunner().invoke, dlq_app, ["list", "--application", str(b.id)])
    assert listed.exit_code == 0, listed.output
    assert "1 entries" in listed.output and f"account {b_account.id}" in listed.output
