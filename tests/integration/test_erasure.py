"""Erasing an account against the real MariaDB and Kafka, with transform and persist running and
records of the account still in flight (libs.erasure); and the message retention job on a shard.

"Nothing is left" is checked from ``information_schema``: every table of the shard and of the
global schema with an ``account_id`` column, so a table added later (threads) is checked without a
change here; besides, the account's row, the webhook attempts of its deliveries, transform's states
in memory and in its changelog read back from the compacted topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import TopicPartition
from prometheus_client import REGISTRY

from libs.accounts import Account, Application, create_account, create_application
from libs.config import DatabaseSettings, KafkaSettings
from libs.crypto import SecretBox
from libs.db import connect, shard_schema
from libs.erasure import Erasure, erase_account, erasure_lock_name, erasure_of
from libs.events import (
    Direction,
    Event,
    EventType,
    MessageContent,
    MessageDoc,
    PostflightRecord,
    Status,
    encode,
    message_key_bytes,
)
from libs.imap_accounts import ImapAccountsSettings, SyncStore, UidEntry
from libs.kafka import TopicSpec, create_topics, make_consumer, make_producer
from libs.leader import take_lock
from libs.shards import ShardRouter
from services.gateway.retention import (
    MessageRetention,
    account_retention,
    application_retention,
    expire_messages,
    set_account_retention,
    set_application_retention,
)
from services.gateway.webhooks.settings import WebhookSettings
from services.gateway.webhooks.store import NewDelivery, WebhookStore
from services.persist.worker import PersistSettings, PersistWorker
from services.transform.worker import TransformWorker
from tests.e2e.checks import changes
from tests.e2e.gateway_helpers import record, seed
from tests.polling import eventually
from tests.scratch import app_name, group_name, topic_name

pytestmark = pytest.mark.integration

PARTITIONS = 3
COMPACTED = {"cleanup.policy": "compact"}
# Tables that keep an erased account's id on purpose: the job's state (global) and the shard's
# record that makes persist refuse the account's late records. Ids and times only.
KEPT_TABLES = {"global": {"account_erasures"}, "shard": {"erased_accounts"}}


@dataclass(frozen=True, slots=True)
class Topics:
    inflight: str
    postflight: str
    state: str
    erasures: str
    imap: str
    retry: str


@dataclass(slots=True)
class Pipeline:
    topics: Topics
    transform: TransformWorker
    tasks: list[asyncio.Task[None]]

    def check(self) -> None:
        for task in self.tasks:
            if task.done():
                task.result()
                raise AssertionError(f"{task.get_name()} stopped")


@contextlib.asynccontextmanager
async def pipeline(kafka: KafkaSettings, router: ShardRouter) -> AsyncIterator[Pipeline]:
    """transform and persist in this process, on topics of this test's own."""
    base = topic_name("erasure")
    t = Topics(*(f"{base}.{n}" for n in ("inflight", "postflight", "state", "erasures", "imap", "retry")))
    await create_topics(
        kafka,
        (
            TopicSpec(t.inflight, PARTITIONS),
            TopicSpec(t.postflight, PARTITIONS),
            TopicSpec(t.state, PARTITIONS, dict(COMPACTED)),
            TopicSpec(t.erasures, 1, dict(COMPACTED)),
            TopicSpec(t.imap, 1, dict(COMPACTED)),
            TopicSpec(t.retry, 1),
        ),
    )
    group = group_name("erasure")
    transform = TransformWorker(
        kafka,
        transactional_id=group,
        group_id=group,
        inflight_topic=t.inflight,
        postflight_topic=t.postflight,
        state_topic=t.state,
        erasures_topic=t.erasures,
        session_timeout_ms=6000,
        state_sweep_interval_s=0.2,
    )
    stopping = asyncio.Event()
    async with (
        transform,
        make_producer(kafka) as producer,
        make_consumer(kafka, t.postflight, group_id=f"{group}-persist") as consumer,
        make_consumer(kafka, t.retry, group_id=f"{group}-retry") as retry_consumer,
    ):
        persist = PersistWorker(
            router, producer, consumer, retry_consumer, retry_topic=t.retry, settings=PersistSettings()
        )
        tasks = [
            asyncio.create_task(transform.run(stopping), name="transform"),
            asyncio.create_task(persist.run(stopping), name="persist"),
        ]
        try:
            yield Pipeline(t, transform, tasks)
        finally:
            stopping.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)


def received(account: int, key: str) -> Event:
    return Event(
        event_id=f"ev-{uuid.uuid4().hex}",
        account_id=account,
        message_key=key,
        type=EventType.RECEIVED,
        occurred_at=datetime.now(UTC),
        content=MessageContent(subject=f"private {key}", body_text="only the account's"),
    )


def final(account: int, key: str) -> PostflightRecord:
    return PostflightRecord(
        account_id=account,
        message_key=key,
        version=10,
        content_version=10,
        message=MessageDoc(
            status=Status.RECEIVED, direction=Direction.INBOUND, occurred_at=datetime.now(UTC), subject="late"
        ),
    )


async def send_postflight(kafka: KafkaSettings, topic: str, records: list[PostflightRecord]) -> None:
    async with make_producer(kafka) as producer:
        sends = [
            await producer.send(topic, encode(r), key=message_key_bytes(r.account_id, r.message_key))
            for r in records
        ]
        await asyncio.gather(*sends)


async def send(kafka: KafkaSettings, topic: str, events: list[Event]) -> None:
    async with make_producer(kafka, linger_ms=5) as producer:
        sends = [
            await producer.send(topic, encode(e), key=message_key_bytes(e.account_id, e.message_key))
            for e in events
        ]
        await asyncio.gather(*sends)


async def rows_of(router: ShardRouter, account: Account) -> dict[str, int]:
    """Rows naming ``account`` in every table that has an ``account_id`` column (shard and global,
    found in information_schema), its ``accounts`` row, and the attempts of its webhook deliveries."""
    shard = account.id >> 48
    found: dict[str, int] = {}
    places: list[tuple[str, Any, str]] = [
        ("shard", await router.pool(shard), shard_schema(shard)),
        ("global", router.global_pool, router.global_schema),
    ]
    for kind, pool, schema in places:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT TABLE_NAME FROM information_schema.COLUMNS"
                " WHERE TABLE_SCHEMA = %s AND COLUMN_NAME = 'account_id'",
                (schema,),
            )
            tables = [str(r[0]) for r in await cur.fetchall()]
            assert tables, f"no table with account_id in {schema}"
            for table in tables:
                if table in KEPT_TABLES[kind]:
                    continue
                await cur.execute(
                    f"SELECT COUNT(*) FROM `{schema}`.`{table}` WHERE account_id = %s", (account.id,)
                )
                found[f"{kind}.{table}"] = int((await cur.fetchone())[0])
            await conn.commit()
    async with (await router.pool(shard)).acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT COUNT(*) FROM {router.table(shard, 'accounts')} WHERE id = %s", (account.id,)
        )
        found["shard.accounts"] = int((await cur.fetchone())[0])
        await conn.commit()
    return found


async def add_control_rows(router: ShardRouter, app: Application, account: Account) -> None:
    """What IMAP sync and webhooks keep of an account in the global schema and its shard."""
    store = SyncStore(router, SecretBox.from_settings())
    await store.insert_account(account.id, app.id, "imap.example.test", 993, "implicit", "user", "secret")
    folder = await store.add_folder(account.id, "INBOX", "inbox")
    await store.put_uids(
        account.id, folder.id, [UidEntry(i, f"imap:{folder.id}:m{i}", "") for i in range(1, 6)]
    )
    g = router.global_schema
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        for change in range(3):
            await cur.execute(
                f"INSERT INTO `{g}`.webhook_deliveries (endpoint_id, account_id, change_id, webhook_id,"
                " event_type, payload, event_at)"
                " VALUES (0, %s, %s, %s, 'message.created', '{}', UTC_TIMESTAMP(6))",
                (account.id, change, f"msg_{uuid.uuid4().hex}"),
            )
            await cur.execute(
                f"INSERT INTO `{g}`.webhook_attempts"
                " (delivery_id, endpoint_id, attempt, started_at, latency_ms)"
                " VALUES (%s, 0, 1, UTC_TIMESTAMP(6), 5)",
                (cur.lastrowid,),
            )
        await conn.commit()


async def attempts_of(router: ShardRouter, delivery_ids: list[int]) -> int:
    if not delivery_ids:
        return 0
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT COUNT(*) FROM `{router.global_schema}`.webhook_attempts"
            f" WHERE delivery_id IN ({', '.join(['%s'] * len(delivery_ids))})",
            delivery_ids,
        )
        (n,) = await cur.fetchone()
        await conn.commit()
    return int(n)


async def delivery_ids(router: ShardRouter, account: Account) -> list[int]:
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT id FROM `{router.global_schema}`.webhook_deliveries WHERE account_id = %s", (account.id,)
        )
        ids = [int(r[0]) for r in await cur.fetchall()]
        await conn.commit()
    return ids


async def changelog(kafka: KafkaSettings, topic: str) -> dict[bytes, bytes | None]:
    """The compacted changelog read back from its start: the last value of every key (None for a
    tombstone)."""
    last: dict[bytes, bytes | None] = {}
    consumer = make_consumer(kafka, group_id=None)
    async with consumer:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            for records in (await consumer.getmany(*pending, timeout_ms=500)).values():
                for record in records:
                    assert record.key is not None
                    last[record.key] = record.value
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    return last


async def erase(router: ShardRouter, kafka: KafkaSettings, t: Topics, account: Account) -> Erasure:
    async with make_producer(kafka) as producer:
        imap = ImapAccountsSettings(imap_accounts_topic=t.imap)
        return await erase_account(
            router, producer, imap, account.id, account.application_id, erasures_topic=t.erasures
        )


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_an_erased_account_leaves_nothing_even_with_records_in_flight(
    router: ShardRouter, topics: None, kafka_settings: KafkaSettings
) -> None:
    app, _ = await create_application(router, app_name("erasure"))
    shard = router.shard_map.shards[0]
    account = await create_account(router, app.id, "erase-me@example.test", provider="imap", shard=shard)
    kept = await create_account(router, app.id, "keep-me@example.test", shard=shard)
    await add_control_rows(router, app, account)
    deliveries = await delivery_ids(router, account)
    assert len(deliveries) == 3 and await attempts_of(router, deliveries) == 3

    async with pipeline(kafka_settings, router) as p:
        keys = [f"m-{i}" for i in range(40)]
        await send(kafka_settings, p.topics.inflight, [received(account.id, k) for k in keys])
        await send(kafka_settings, p.topics.inflight, [received(kept.id, "kept-1")])

        async def stored() -> bool:
            p.check()
            return (await rows_of(router, account))["shard.messages"] == len(keys)

        await eventually(stored, 90, "the account's messages stored")
        assert all(p.transform.state_of(account.id, k) is not None for k in keys)

        dropped_before = sample("flightlog_transform_events_total", {"outcome": "erased"})
        # Records in flight while the erasure runs, and after it: none may bring anything back.
        during = asyncio.create_task(
            send(kafka_settings, p.topics.inflight, [received(account.id, f"late-{i}") for i in range(200)])
        )
        job = await erase(router, kafka_settings, p.topics, account)
        await during
        assert job.state == "done"
        assert job.erased["shard.accounts"] == 1
        assert job.erased["global.imap_accounts"] == 1
        assert job.erased["global.webhook_deliveries"] == 3
        assert job.erased["global.webhook_attempts"] == 3
        assert job.erased["shard.imap_uids"] == 5
        assert job.erased.get("shard.messages", 0) >= len(keys)
        await eventually(lambda: p.transform.is_erased(account.id), 60, "transform learning of the erasure")
        await send(kafka_settings, p.topics.inflight, [received(account.id, f"later-{i}") for i in range(20)])
        # Records transform emitted before it learnt of the erasure, reaching persist after it.
        refused_before = sample("flightlog_persist_erased_account_records_total")
        await send_postflight(
            kafka_settings, p.topics.postflight, [final(account.id, f"emitted-{i}") for i in range(10)]
        )

        async def forgotten() -> bool:
            p.check()
            dropped = sample("flightlog_transform_events_total", {"outcome": "erased"}) - dropped_before
            refused = sample("flightlog_persist_erased_account_records_total") - refused_before
            return (
                dropped >= 20
                and refused >= 10
                and not any(
                    p.transform.state_of(account.id, k) is not None
                    for k in [*keys, *(f"late-{i}" for i in range(200))]
                )
            )

        await eventually(forgotten, 90, "transform dropping the erased account's records and states")
        # persist has caught up with everything transform emitted
        await send(kafka_settings, p.topics.inflight, [received(kept.id, "kept-2")])

        async def kept_caught_up() -> bool:
            p.check()
            return (await rows_of(router, kept))["shard.messages"] == 2

        await eventually(kept_caught_up, 90, "the other account's later message stored")

    # The webhook dispatcher, reading a change of the account published before the erasure:
    store = WebhookStore(router, WebhookSettings().webhooks_secret_key)
    late = NewDelivery(
        0,
        account.id,
        random.getrandbits(62),
        "message.created",
        b"{}",
        datetime.now(UTC).replace(tzinfo=None),
    )
    await store.insert_deliveries([late, dataclasses.replace(late, account_id=kept.id)])
    (kept_delivery,) = await delivery_ids(router, kept)
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:  # endpoint 0: not swept
        await cur.execute(
            f"DELETE FROM `{router.global_schema}`.webhook_deliveries WHERE id = %s", (kept_delivery,)
        )
        await conn.commit()

    # An IMAP sync still running when the erasure stopped it:
    sync = SyncStore(router, SecretBox.from_settings())
    folder = await sync.add_folder(account.id, "Archive", None)
    await sync.put_uids(account.id, folder.id, [UidEntry(9, "imap:1:late", "")])

    left = await rows_of(router, account)
    assert left and not any(left.values()), f"rows of the erased account are left: {left}"
    assert await attempts_of(router, deliveries) == 0
    assert (await rows_of(router, kept))["shard.accounts"] == 1  # only the erased account went

    prefix = f"{account.id}:".encode()
    log = await changelog(kafka_settings, p.topics.state)
    theirs = {k: v for k, v in log.items() if k.startswith(prefix)}
    assert {message_key_bytes(account.id, k) for k in keys} <= set(theirs)
    assert not [k for k, v in theirs.items() if v is not None], "the changelog still holds states"
    assert any(k.startswith(f"{kept.id}:".encode()) and v is not None for k, v in log.items())

    again = await erase(router, kafka_settings, p.topics, account)
    assert again.state == "done" and again.erased == job.erased
    report = again.report()
    assert {t["topic"] for t in report["topics"]} >= {"flightlog.inflight", "flightlog.dlq"}


async def test_an_interrupted_erasure_is_finished_by_the_next_call(
    router: ShardRouter, topics: None, kafka_settings: KafkaSettings, db_settings: DatabaseSettings
) -> None:
    """The state a crash right after the account's row was deleted leaves: the job running, the
    row gone, everything else still there. A call while another runs the job answers its state;
    the next call finishes it and reports all of it."""
    app, _ = await create_application(router, app_name("erasure"))
    shard = router.shard_map.shards[-1]
    account = await create_account(router, app.id, "half@example.test", shard=shard)
    messages = router.table(shard, "messages")
    async with (await router.pool(shard)).acquire() as conn, conn.cursor() as cur:
        for i in range(2500):  # more than a batch of deletes
            await cur.execute(
                f"INSERT INTO {messages} (account_id, message_key, version, subject) VALUES (%s, %s, 1, 'x')",
                (account.id, f"m-{i}"),
            )
        await cur.execute(
            f"INSERT INTO {router.table(shard, 'erased_accounts')} (account_id) VALUES (%s)", (account.id,)
        )
        await cur.execute(f"DELETE FROM {router.table(shard, 'accounts')} WHERE id = %s", (account.id,))
        await conn.commit()
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"INSERT INTO `{router.global_schema}`.account_erasures (account_id, application_id, erased)"
            """ VALUES (%s, %s, '{"shard.accounts": 1}')""",
            (account.id, app.id),
        )
        await conn.commit()
    assert (job := await erasure_of(router, account.id)) is not None and job.state == "running"
    base = topic_name("erasure")
    t = Topics(*(f"{base}.{n}" for n in ("inflight", "postflight", "state", "erasures", "imap", "retry")))
    await create_topics(
        kafka_settings, (TopicSpec(t.erasures, 1, dict(COMPACTED)), TopicSpec(t.imap, 1, dict(COMPACTED)))
    )

    async with connect(db_settings, db_settings.global_db_host, db_settings.global_db_port) as other:
        assert await take_lock(other, erasure_lock_name(router, account.id))  # another call runs it
        busy = await erase(router, kafka_settings, t, account)
        assert busy.state == "running" and busy.erased == {"shard.accounts": 1}
    done = await erase(router, kafka_settings, t, account)
    assert done.state == "done" and done.finished_at is not None
    assert done.erased == {"shard.accounts": 1, "shard.messages": 2500}
    left = await rows_of(router, account)
    assert not any(left.values()), left


async def test_the_retention_job_erases_old_messages_with_their_deleted_changes(router: ShardRouter) -> None:
    """Against the shard: the application's retention, an account's override (longer), an account
    without messages that old; batches smaller than the work, so several transactions."""
    app, _ = await create_application(router, app_name("retention"))
    shard = router.shard_map.shards[0]
    follows = await create_account(router, app.id, "follows@example.test", shard=shard)
    longer = await create_account(router, app.id, "longer@example.test", shard=shard)
    await set_application_retention(router, app.id, 2 * 86400)
    await set_account_retention(router, longer.id, 10 * 86400)
    assert await application_retention(router, app.id) == 2 * 86400
    assert await account_retention(router, longer.id) == 10 * 86400
    assert await account_retention(router, follows.id) is None
    messages = router.table(shard, "messages")
    ages_days = {"fresh": 0, "day": 1, "week": 7, "month": 30}
    async with (await router.pool(shard)).acquire() as conn, conn.cursor() as cur:
        for account in (follows, longer):
            for name, days in ages_days.items():
                for i in range(5):
                    await cur.execute(
                        f"INSERT INTO {messages} (account_id, message_key, version, subject, occurred_at)"
                        " VALUES (%s, %s, 7, 'x', UTC_TIMESTAMP(6) - INTERVAL %s DAY)",
                        (account.id, f"{name}-{i}", days),
                    )
        await conn.commit()
    erased_before = sample("flightlog_retention_erased_messages_total", {"shard": str(shard)})

    erased = await expire_messages(router, shard, MessageRetention(interval_s=60, batch_rows=3, pause_s=0))

    assert erased >= 15  # this test's; other applications' on the shared stack may add to it
    assert (
        sample("flightlog_retention_erased_messages_total", {"shard": str(shard)}) - erased_before == erased
    )
    async with (await router.pool(shard)).acquire() as conn, conn.cursor() as cur:
        left: dict[int, set[str]] = {}
        for account in (follows, longer):
            await cur.execute(f"SELECT message_key FROM {messages} WHERE account_id = %s", (account.id,))
            left[account.id] = {bytes(r[0]).decode().split("-")[0] for r in await cur.fetchall()}
        await cur.execute(
            f"SELECT account_id, change_type, version, COUNT(*) FROM {router.table(shard, 'changes')}"
            " WHERE account_id IN (%s, %s) GROUP BY account_id, change_type, version",
            (follows.id, longer.id),
        )
        counted = {(int(r[0]), r[1], int(r[2])): int(r[3]) for r in await cur.fetchall()}
        await conn.commit()
    assert left == {follows.id: {"fresh", "day"}, longer.id: {"fresh", "day", "week"}}
    assert counted == {(follows.id, "deleted", 8): 10, (longer.id, "deleted", 8): 5}
    # A second pass finds nothing more of them.
    await expire_messages(router, shard, MessageRetention(interval_s=60, batch_rows=3, pause_s=0))
    await set_application_retention(router, app.id, None)
    assert await application_retention(router, app.id) is None


async def test_the_retention_job_recomputes_the_threads_of_what_it_erases(router: ShardRouter) -> None:
    """A thread losing its old messages shrinks (an ``updated`` thread change), one losing all of
    them goes (``deleted``), in the transaction that erases them."""
    app, _ = await create_application(router, app_name("retention-threads"))
    shard = router.shard_map.shards[0]
    account = await create_account(router, app.id, "threads@example.test", shard=shard)
    await set_application_retention(router, app.id, 2 * 86400)
    now = datetime.now(UTC)
    month_ago = now - timedelta(days=30)
    await seed(
        router,
        [
            record(account.id, "mixed-old-1", thread_key="mixed", occurred_at=month_ago),
            record(account.id, "mixed-old-2", thread_key="mixed", occurred_at=month_ago),
            record(account.id, "mixed-new", thread_key="mixed", occurred_at=now),
            record(account.id, "gone-1", thread_key="gone", occurred_at=month_ago),
            record(account.id, "gone-2", thread_key="gone", occurred_at=month_ago),
        ],
    )

    async def threads() -> dict[str, int]:
        async with (await router.pool(shard)).acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT thread_key, message_count FROM {router.table(shard, 'threads')}"
                " WHERE account_id = %s",
                (account.id,),
            )
            found = {str(k): int(n) for k, n in await cur.fetchall()}
            await conn.commit()
        return found

    async def thread_changes() -> list[str]:
        return [kind for _, kind, _ in await changes(router, account.id, "thread")]

    assert await threads() == {"mixed": 3, "gone": 2}
    before = await thread_changes()

    await expire_messages(router, shard, MessageRetention(interval_s=60, batch_rows=10, pause_s=0))

    assert await threads() == {"mixed": 1, "gone": 0}
    assert sorted((await thread_changes())[len(before) :]) == ["deleted", "updated"]
    await set_application_retention(router, app.id, None)
