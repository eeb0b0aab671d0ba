"""persist against the real Kafka and MariaDB: poison records are isolated and dead-lettered.

Each test runs a :class:`PersistWorker` in this process on topics and consumer groups of its
own, so a ``make dev`` persist does not interfere. Dead letters go to the shared DLQ topic and
are told apart by their source-topic header. Accounts are made-up ids on a real shard (persist
does not look accounts up), with a random local part so no real account's rows are touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

from libs.config import KafkaSettings
from libs.dlq import DeadLetter, parse_dead_letter
from libs.events import MessageDoc, PostflightRecord, encode, message_key_bytes
from libs.kafka import DLQ, TopicSpec, create_topics, make_consumer, make_producer
from libs.shards import ShardRouter
from services.persist.worker import PersistSettings, PersistWorker
from services.persist.writer import write_shard
from tests.polling import eventually
from tests.scratch import group_name, topic_name

pytestmark = pytest.mark.integration

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Env:
    kafka: KafkaSettings
    router: ShardRouter
    postflight: str
    retry: str
    group: str
    dlq_start: int
    shard: int
    account: int


@pytest.fixture
async def env(topics: None, kafka_settings: KafkaSettings, router: ShardRouter) -> Env:
    base = topic_name("persist")
    postflight, retry = f"{base}.postflight", f"{base}.retry"
    await create_topics(kafka_settings, (TopicSpec(postflight, 1), TopicSpec(retry, 1)))
    async with make_consumer(kafka_settings, group_id=None) as consumer:
        tp = TopicPartition(DLQ, 0)
        dlq_start = (await consumer.end_offsets([tp]))[tp]
    shard = router.shard_map.shards[0]
    account = shard << 48 | 1 << 44 | secrets.randbits(40)
    return Env(kafka_settings, router, postflight, retry, group_name("persist"), dlq_start, shard, account)


def record(env: Env, key: str, version: int = 1, **doc: Any) -> PostflightRecord:
    fields: dict[str, Any] = {"status": "delivered", "direction": "outbound", "occurred_at": NOW, **doc}
    return PostflightRecord(
        account_id=env.account, message_key=key, version=version, message=MessageDoc(**fields)
    )


def raw(r: PostflightRecord) -> tuple[bytes, bytes]:
    return message_key_bytes(r.account_id, r.message_key), encode(r)


def patched(env: Env, r: PostflightRecord, *, key: str | None = None, **message: Any) -> tuple[bytes, bytes]:
    """``r`` as bytes with fields the models now refuse, as a record written before them would be."""
    doc = orjson.loads(encode(r))
    doc["message"].update(message)
    if key is not None:
        doc["message_key"] = key
    return message_key_bytes(env.account, doc["message_key"]), orjson.dumps(doc)


async def publish(env: Env, items: list[tuple[bytes, bytes]]) -> None:
    async with make_producer(env.kafka) as producer:
        futures = [await producer.send(env.postflight, value, key=key) for key, value in items]
        await asyncio.gather(*futures)


async def dead_letters(env: Env) -> list[DeadLetter]:
    async with make_consumer(env.kafka, group_id=None) as consumer:
        tp = TopicPartition(DLQ, 0)
        consumer.assign([tp])
        consumer.seek(tp, env.dlq_start)
        end = (await consumer.end_offsets([tp]))[tp]
        letters: list[DeadLetter] = []
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            letters += [parse_dead_letter(r.key, r.value, r.headers, r.offset) for r in batch.get(tp, [])]
    return [d for d in letters if d.source_topic in (env.postflight, env.retry)]


async def stored(env: Env) -> dict[str, int]:
    """message_key -> version of the test account's rows."""
    pool = await env.router.pool(env.shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT message_key, version FROM {env.router.table(env.shard, 'messages')}"
            " WHERE account_id = %s",
            (env.account,),
        )
        rows = await cur.fetchall()
        await conn.commit()
    return {bytes(k).decode(): int(v) for k, v in rows}


@contextlib.asynccontextmanager
async def running(env: Env, settings: PersistSettings) -> AsyncIterator[asyncio.Task[None]]:
    async with (
        make_producer(env.kafka) as producer,
        make_consumer(env.kafka, env.postflight, group_id=env.group) as consumer,
        make_consumer(env.kafka, env.retry, group_id=f"{env.group}-retry") as retry,
    ):
        worker = PersistWorker(
            env.router, producer, consumer, retry, retry_topic=env.retry, settings=settings
        )
        stopping = asyncio.Event()
        task = asyncio.create_task(worker.run(stopping), name="persist-test-worker")
        try:
            yield task
        finally:
            stopping.set()
            await asyncio.wait_for(task, 60)


def _alive(task: asyncio.Task[None], check: Callable[[], Awaitable[bool]]) -> Callable[[], Awaitable[bool]]:
    async def wrapped() -> bool:
        if task.done():
            task.result()  # a crashed worker fails the test with its own error
            raise AssertionError("the worker stopped")
        return await check()

    return wrapped


@contextlib.asynccontextmanager
async def data_error_for(env: Env, key: str) -> AsyncIterator[None]:
    """The server refuses ``key``'s row with error 1406 (data too long), as for data no model foresaw."""
    name = f"test_poison_{uuid.uuid4().hex[:12]}"
    schema_table = env.router.table(env.shard, "messages")
    trigger = f"{schema_table.split('.')[0]}.`{name}`"
    pool = await env.router.pool(env.shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"CREATE TRIGGER {trigger} BEFORE INSERT ON {schema_table} FOR EACH ROW"
            " IF NEW.message_key = %s THEN SIGNAL SQLSTATE '22001'"
            " SET MYSQL_ERRNO = 1406, MESSAGE_TEXT = 'Data too long for column ''subject'' at row 1';"
            " END IF",
            (key.encode(),),
        )
        await conn.commit()
    try:
        yield
    finally:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"DROP TRIGGER IF EXISTS {trigger}")
            await conn.commit()


async def test_unwritable_records_are_dead_lettered_and_the_rest_of_the_shard_is_written(env: Env) -> None:
    tag = uuid.uuid4().hex[:8]
    good = [record(env, f"good-{tag}-{i}", subject=f"good {i}") for i in range(12)]
    # The two poisons, as records written before the models refused them.
    year_10000 = patched(env, record(env, f"late-{tag}"), occurred_at="9999-12-31T23:00:00-05:00")
    long_key = patched(env, record(env, f"k-{tag}"), key="é" * 255)  # 510 bytes for VARBINARY(255)
    # Valid for the models, refused by the server: found by bisecting the shard's batch.
    refused = record(env, f"refused-{tag}", subject="the server refuses this one")
    items = [raw(g) for g in good[:4]] + [year_10000] + [raw(g) for g in good[4:8]]
    items += [long_key, raw(refused)] + [raw(g) for g in good[8:]]

    async with data_error_for(env, refused.message_key):
        await publish(env, items)
        settings = PersistSettings(persist_max_backoff_s=0.5)
        async with running(env, settings) as task:

            async def settled() -> bool:
                return len(await stored(env)) >= len(good) and len(await dead_letters(env)) >= 3

            await eventually(_alive(task, settled), 90, "the good rows and three dead letters")

    assert await stored(env) == {g.message_key: 1 for g in good}
    letters = {d.value: d for d in await dead_letters(env)}
    assert len(letters) == 3
    for key, value in (year_10000, long_key, raw(refused)):
        letter = letters[value]  # the original bytes, untouched
        assert letter.key == key
        assert letter.stage == "persist" and letter.source_topic == env.postflight
    assert "occurred_at" in letters[year_10000[1]].reason
    assert "outside the storable range" in letters[year_10000[1]].reason
    assert "message_key" in letters[long_key[1]].reason and "510 bytes" in letters[long_key[1]].reason
    refused_reason = letters[raw(refused)[1]].reason
    assert refused_reason.startswith("unwritable record: DataError") and "1406" in refused_reason


async def test_a_record_failing_on_its_own_goes_to_the_dlq_after_the_max_attempts(env: Env) -> None:
    tag = uuid.uuid4().hex[:8]
    stuck = record(env, f"stuck-{tag}", version=1)
    await write_shard(env.router, env.shard, [stuck])
    update = record(env, stuck.message_key, version=2, starred=True)
    good = [record(env, f"good-{tag}-{i}") for i in range(5)]

    # Another transaction holds the stuck row's lock for the whole test: every write of the
    # update waits for it and fails with the server's lock wait timeout (1205), a transient error.
    pool = await env.router.pool(env.shard)
    async with pool.acquire() as holder, holder.cursor() as cur:
        await cur.execute(
            f"SELECT id FROM {env.router.table(env.shard, 'messages')}"
            " WHERE account_id = %s AND message_key = %s FOR UPDATE",
            (env.account, stuck.message_key.encode()),
        )
        try:
            await publish(env, [raw(update)] + [raw(g) for g in good])
            settings = PersistSettings(
                persist_max_attempts=2,
                persist_lock_wait_timeout_s=1,
                persist_write_timeout_s=20,
                persist_max_backoff_s=0.5,
            )
            async with running(env, settings) as task:

                async def settled() -> bool:
                    return len(await stored(env)) == 1 + len(good) and bool(await dead_letters(env))

                await eventually(
                    _alive(task, settled), 90, "the good rows and the stuck update's dead letter"
                )
        finally:
            await holder.rollback()

    # The good records of the same batch were written, the stuck one only charged for its own failures.
    assert await stored(env) == {stuck.message_key: 1, **{g.message_key: 1 for g in good}}
    [letter] = await dead_letters(env)
    assert (letter.key, letter.value) == raw(update)
    assert letter.stage == "persist-retry" and letter.source_topic == env.retry
    assert letter.reason.startswith("gave up after 2 failed attempts")
    assert "1205" in letter.reason
