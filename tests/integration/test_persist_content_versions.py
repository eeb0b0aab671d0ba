"""persist against the real MariaDB: content versions, sticky erasure and patch records.

transform drops a final message's content from its state, so a later record may carry flags
without content (``content_version`` 0), arrive before the record with the content, or be a
patch of a message transform no longer holds (libs.events.PostflightRecord). These tests drive
:func:`write_shard` directly, record by record or in one batch, as persist's worker does, and
one test runs the worker over Kafka. Accounts are made-up ids on a real shard with random bits,
so no other test's rows are touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from libs.config import DatabaseSettings, KafkaSettings
from libs.db import connect
from libs.db.migrate import load_migrations
from libs.events import MessageDoc, MessageFlags, MessagePatch, PostflightRecord, encode, message_key_bytes
from libs.kafka import TopicSpec, create_topics, make_consumer, make_producer
from libs.messages import decode_body
from libs.shards import ShardRouter
from services.persist.relay import read_statement
from services.persist.worker import PersistSettings, PersistWorker
from services.persist.writer import write_shard, write_shards
from tests.polling import eventually
from tests.scratch import group_name, topic_name

pytestmark = pytest.mark.integration

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
CONTENT: dict[str, Any] = {
    "channel": "email",
    "sender": "ann@example.test",
    "to": ["bob@example.test"],
    "cc": ["cy@example.test"],
    "subject": "the plan",
    "snippet": "meet at noon",
    "body_text": "meet at noon " * 40,  # long enough to be stored compressed
    "thread_key": "t-1",
    "size_bytes": 2048,
    "attachments": [{"filename": "plan.pdf", "content_type": "application/pdf", "size_bytes": 10}],
}
COLUMNS = (
    "version", "content_version", "status", "unread", "starred", "folder", "labels", "channel",
    "sender", "to_addrs", "cc_addrs", "subject", "snippet", "body", "body_encoding", "attachments",
    "thread_key", "size_bytes", "redacted", "deleted",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Env:
    router: ShardRouter
    shard: int
    account: int


@pytest.fixture
def env(router: ShardRouter) -> Env:
    shard = router.shard_map.shards[0]
    return Env(router, shard, shard << 48 | 1 << 45 | secrets.randbits(40))


def key() -> str:
    return f"m-{uuid.uuid4().hex[:12]}"


def full(
    env: Env, message_key: str, version: int, content_version: int | None = None, **doc: Any
) -> PostflightRecord:
    """A final message with its content (unless ``content_version`` is 0, a flags change)."""
    fields: dict[str, Any] = {"status": "delivered", "direction": "outbound", "occurred_at": NOW}
    fields |= CONTENT if content_version != 0 else {}
    fields |= doc
    deleted = fields.pop("deleted", False)
    return PostflightRecord(
        account_id=env.account,
        message_key=message_key,
        version=version,
        content_version=content_version,
        deleted=deleted,
        message=MessageDoc(**fields),
    )


def patch(env: Env, message_key: str, version: int, **fields: Any) -> PostflightRecord:
    """A change to a message transform no longer holds; its doc is a partial view, not written."""
    flags = fields.pop("flags", None)
    return PostflightRecord(
        account_id=env.account,
        message_key=message_key,
        version=version,
        content_version=0,
        message=MessageDoc(occurred_at=NOW, starred=True, subject="never written"),
        patch=MessagePatch(flags=MessageFlags(**flags) if flags is not None else None, **fields),
    )


async def stored(env: Env, message_key: str) -> dict[str, Any] | None:
    pool = await env.router.pool(env.shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT {', '.join(COLUMNS)} FROM {env.router.table(env.shard, 'messages')}"
            " WHERE account_id = %s AND message_key = %s",
            (env.account, message_key.encode()),
        )
        found = await cur.fetchone()
        await conn.commit()
    if found is None:
        return None
    got = dict(zip(COLUMNS, found, strict=True))
    for name in ("labels", "to_addrs", "cc_addrs", "attachments"):
        got[name] = orjson.loads(got[name]) if got[name] is not None else None
    got["body"] = decode_body(got["body"], got["body_encoding"])[0] if got["body"] is not None else None
    return got


async def _message_changes(env: Env) -> list[tuple[str, str, int, str | None]]:
    """(message key, change type, version, status) of the test account, in commit order."""
    pool = await env.router.pool(env.shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT m.message_key, c.change_type, c.version, c.status"
            f" FROM {env.router.table(env.shard, 'changes')} c"
            f" JOIN {env.router.table(env.shard, 'messages')} m ON m.id = c.object_id"
            " WHERE c.account_id = %s AND c.object_type = 'message' ORDER BY c.id",
            (env.account,),
        )
        rows = await cur.fetchall()
        await conn.commit()
    return [(bytes(k).decode(), t, int(v), s) for k, t, v, s in rows]


async def changes(env: Env) -> list[tuple[str, str, int]]:
    """(message key, change type, version) of the test account, in commit order."""
    return [(k, t, v) for k, t, v, _ in await _message_changes(env)]


async def write(env: Env, *records: PostflightRecord) -> int:
    """Write each record in a transaction of its own; returns the patches without a row."""
    without_row = 0
    for r in records:
        without_row += (await write_shard(env.router, env.shard, [r])).patches_without_row
    return without_row


def assert_content(row: dict[str, Any] | None) -> None:
    assert row is not None
    assert row["subject"] == CONTENT["subject"] and row["snippet"] == CONTENT["snippet"]
    assert row["body"] == CONTENT["body_text"] and row["body_encoding"] == 1
    assert row["sender"] == CONTENT["sender"] and row["channel"] == "email"
    assert row["to_addrs"] == CONTENT["to"] and row["cc_addrs"] == CONTENT["cc"]
    assert row["attachments"] is not None and row["attachments"][0]["filename"] == "plan.pdf"
    assert row["thread_key"] == "t-1" and row["size_bytes"] == 2048


def assert_erased(row: dict[str, Any] | None) -> None:
    assert row is not None
    assert row["subject"] is None and row["snippet"] is None and row["body"] is None
    assert row["attachments"] is None and row["body_encoding"] == 0


async def test_a_contentless_record_of_a_higher_version_keeps_the_content(env: Env) -> None:
    m = key()
    await write(env, full(env, m, 10), full(env, m, 20, content_version=0, starred=True, unread=False))
    row = await stored(env, m)
    assert_content(row)
    assert row is not None
    assert (row["version"], row["content_version"]) == (20, 10)
    assert row["starred"] == 1 and row["unread"] == 0
    assert await changes(env) == [(m, "created", 10), (m, "updated", 20)]


async def statuses(env: Env, message_key: str) -> list[tuple[str, str | None]]:
    """(change type, status) of one message's changes, in commit order."""
    return [(t, s) for k, t, _, s in await _message_changes(env) if k == message_key]


async def test_a_change_tells_the_status_it_moved_the_message_to(env: Env) -> None:
    m, late = key(), key()
    await write(
        env,
        full(env, m, 10, status="sent"),
        full(env, m, 20, content_version=0, status="sent", starred=True),  # a flag: the status stays
        full(env, m, 30, content_version=0, status="delivered"),
        full(env, m, 30, content_version=0, status="delivered"),  # a replay: no change at all
    )
    assert await statuses(env, m) == [("created", "sent"), ("updated", None), ("updated", "delivered")]
    # A lower version's status never lands, so it is never told either.
    await write(env, full(env, late, 30, status="undelivered"), full(env, late, 10, status="sent"))
    assert await statuses(env, late) == [("created", "undelivered")]


async def test_rows_of_one_message_in_one_batch_compare_with_the_row_before_the_batch(env: Env) -> None:
    """Each row of the upsert returns the state it found: a stored message's change compares with
    the row before the batch (its first row's), not with what the batch's earlier row wrote."""
    m = key()
    await write(env, full(env, m, 10, status="sent", thread_key="t-before"))
    # Two content versions of one message: two rows of the one statement (latest_per_message).
    await write_shard(
        env.router,
        env.shard,
        [
            full(env, m, 15, status="delivered", subject="first", thread_key="t-between"),
            full(env, m, 20, status="delivered", subject="second", thread_key="t-after"),
        ],
    )
    assert await statuses(env, m) == [("created", "sent"), ("updated", "delivered")]
    row = await stored(env, m)
    assert row is not None
    assert (row["version"], row["subject"], row["thread_key"]) == (20, "second", "t-after")


async def test_the_shards_of_one_server_are_written_in_one_transaction(router: ShardRouter) -> None:
    """write_shards: each shard's rows and change rows, as write_shard writes them one by one, and
    the change rows handed back for the relay (ids with the shard's bits, in id order)."""
    by_cluster: dict[int, list[int]] = {}
    for shard in router.shard_map.shards:
        by_cluster.setdefault(router.shard_map.cluster_of(shard).cluster_id, []).append(shard)
    shards = next(s for s in by_cluster.values() if len(s) >= 2)[:2]
    envs = [Env(router, shard, shard << 48 | 1 << 45 | secrets.randbits(40)) for shard in shards]
    keys = [key(), key()]
    results = await write_shards(
        router,
        {
            e.shard: [full(e, k, 10, status="sent"), full(e, k, 20, content_version=0)]
            for e, k in zip(envs, keys, strict=True)
        },
    )
    assert [r.shard for r in results] == sorted(shards)
    for e, k in zip(envs, keys, strict=True):
        row = await stored(e, k)
        assert_content(row)
        assert row is not None and (row["version"], row["content_version"]) == (20, 10)
        assert await statuses(e, k) == [("created", "delivered")]
        [result] = [r for r in results if r.shard == e.shard]
        messages = [c for c in result.committed if c.object_type == "message"]  # and its thread's
        assert [(c.account_id, c.change_type, c.version) for c in messages] == [(e.account, "created", 20)]
        assert all(c.id >> 48 == e.shard for c in result.committed)
        # what the relay publishes without reading is what its read would have given
        pool = await router.pool(e.shard)
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                read_statement(router, e.shard), (result.committed[0].id - 1, len(result.committed))
            )
            assert [tuple(r) for r in await cur.fetchall()] == [tuple(c) for c in result.committed]
            await conn.commit()


async def test_content_arriving_after_a_contentless_record_lands_with_a_change(env: Env) -> None:
    forward, reverse = key(), key()
    await write(
        env, full(env, forward, 10), full(env, forward, 20, content_version=0, starred=True, unread=False)
    )
    # The full record was parked (its shard failed) and lands after the flags change.
    await write(
        env, full(env, reverse, 20, content_version=0, starred=True, unread=False), full(env, reverse, 10)
    )
    row = await stored(env, reverse)
    assert_content(row)
    assert row == await stored(env, forward)
    assert row is not None and row["starred"] == 1 and row["unread"] == 0  # version 20's flags
    assert [c for c in await changes(env) if c[0] == reverse] == [
        (reverse, "created", 20),
        (reverse, "updated", 20),  # the late content: the row's version did not move, its content did
    ]
    # A replay of either changes nothing.
    await write(env, full(env, reverse, 10), full(env, reverse, 20, content_version=0, starred=True))
    assert len([c for c in await changes(env) if c[0] == reverse]) == 2


async def test_a_redaction_is_for_ever_whatever_the_order(env: Env) -> None:
    first, contentless, forgotten = key(), key(), key()
    # The redaction (content erased at version 20) arrives before the older full record.
    await write(env, full(env, first, 20, redacted=True, subject=None, body_text=None), full(env, first, 10))
    row = await stored(env, first)
    assert_erased(row)
    assert row is not None and row["redacted"] == 1 and (row["version"], row["content_version"]) == (20, 20)
    # Content of a lower content version changed nothing at all.
    assert [c for c in await changes(env) if c[0] == first] == [(first, "created", 20)]

    # A redaction without content (content version 0) cannot outrank any content: it still wins.
    await write(env, full(env, contentless, 20, content_version=0, redacted=True), full(env, contentless, 10))
    row = await stored(env, contentless)
    assert_erased(row)
    assert row is not None and row["redacted"] == 1 and row["sender"] == CONTENT["sender"]  # not erasable

    # Content that comes back later, newer (transform forgot the message and met it again),
    # does not undo the redaction either.
    await write(env, full(env, forgotten, 10), full(env, forgotten, 20, content_version=0, redacted=True))
    await write(env, full(env, forgotten, 30))
    row = await stored(env, forgotten)
    assert_erased(row)
    assert row is not None and row["redacted"] == 1 and (row["version"], row["content_version"]) == (30, 30)


async def test_patches_set_newer_flags_only_and_need_a_row(env: Env) -> None:
    m, missing = key(), key()
    await write(env, full(env, m, 10))
    labels = {"unread": False, "starred": True, "folder": "Archive", "labels": ["work"]}
    assert await write(env, patch(env, m, 20, flags=labels)) == 0
    row = await stored(env, m)
    assert_content(row)  # a patch's doc is never written
    assert row is not None and row["version"] == 20 and row["content_version"] == 10
    assert (row["unread"], row["starred"], row["folder"], row["labels"]) == (0, 1, "Archive", ["work"])

    # An older patch, arriving late, does not override the newer flags.
    await write(env, patch(env, m, 15, flags={"starred": False, "folder": "Inbox"}))
    after = await stored(env, m)
    assert after == row

    # Only the flags given are set.
    await write(env, patch(env, m, 25, flags={"unread": True}))
    row = await stored(env, m)
    assert row is not None and (row["version"], row["unread"], row["starred"], row["folder"]) == (
        25,
        1,
        1,
        "Archive",
    )
    assert await changes(env) == [(m, "created", 10), (m, "updated", 20), (m, "updated", 25)]

    # A patch of a message persist has no row of changes nothing.
    assert await write(env, patch(env, missing, 30, flags={"starred": True}, redacted=True)) == 1
    assert await stored(env, missing) is None
    assert [c for c in await changes(env) if c[0] == missing] == []


async def test_an_erasing_patch_applies_whatever_the_versions(env: Env) -> None:
    deleted, redacted = key(), key()
    await write(env, full(env, deleted, 30), full(env, redacted, 30))
    await write(env, patch(env, deleted, 20, deleted=True, flags={"starred": True}))
    row = await stored(env, deleted)
    assert_erased(row)
    assert row is not None and row["deleted"] == 1 and row["redacted"] == 0
    assert row["starred"] == 0  # the flags of an older patch are not applied
    assert (row["version"], row["content_version"]) == (30, 30)

    await write(env, patch(env, redacted, 20, redacted=True))
    row = await stored(env, redacted)
    assert_erased(row)
    assert row is not None and row["redacted"] == 1 and row["deleted"] == 0 and row["version"] == 30

    # Erased once, erased for good: the same patch again, or content of any version, changes nothing.
    before = await changes(env)
    await write(env, patch(env, deleted, 20, deleted=True), full(env, deleted, 40, subject="back"))
    row = await stored(env, deleted)
    assert_erased(row)
    assert row is not None and row["deleted"] == 1 and row["version"] == 40
    assert await changes(env) == [
        *before,
        (deleted, "deleted", 40),  # the newer full record's flags: a change of a tombstone
    ]
    assert [c for c in before if c[0] == deleted] == [(deleted, "created", 30), (deleted, "deleted", 30)]
    assert [c for c in before if c[0] == redacted] == [(redacted, "created", 30), (redacted, "updated", 30)]


async def test_one_batch_keeps_content_a_later_record_lacks(env: Env) -> None:
    in_order, reversed_, partial, patched = key(), key(), key(), key()
    flags: dict[str, Any] = {"content_version": 0, "starred": True, "unread": False}
    await write_shard(
        env.router,
        env.shard,
        [
            full(env, in_order, 10),
            full(env, in_order, 20, **flags),
            full(env, reversed_, 20, **flags),
            full(env, reversed_, 10),
            # Content set in two steps: the later carries only what changed.
            full(env, partial, 10),
            full(
                env,
                partial,
                15,
                channel=None,
                sender=None,
                to=[],
                cc=[],
                subject="re: the plan",
                body_text=None,
                attachments=[],
            ),
            full(env, partial, 20, **flags),
            # A full record and a patch of the same message: one change row.
            full(env, patched, 10),
            patch(env, patched, 20, flags={"folder": "Archive"}),
        ],
    )
    for m in (in_order, reversed_):
        row = await stored(env, m)
        assert_content(row)
        assert row is not None and (row["version"], row["content_version"], row["starred"]) == (20, 10, 1)
    row = await stored(env, partial)
    assert row is not None and (row["version"], row["content_version"], row["starred"]) == (20, 15, 1)
    assert row["subject"] == "re: the plan" and row["body"] == CONTENT["body_text"]
    assert row["sender"] == CONTENT["sender"] and row["to_addrs"] == CONTENT["to"]
    row = await stored(env, patched)
    assert_content(row)
    assert row is not None and row["folder"] == "Archive" and row["version"] == 20
    assert sorted(await changes(env)) == sorted(
        [
            (in_order, "created", 20),
            (reversed_, "created", 20),
            (partial, "created", 20),
            (patched, "created", 20),
        ]
    )


@contextlib.asynccontextmanager
async def worker(kafka: KafkaSettings, env: Env) -> AsyncIterator[tuple[str, asyncio.Task[None]]]:
    """A persist worker of this test's own on topics and groups of its own."""
    base, group = topic_name("persist"), group_name("persist")
    postflight, retry = f"{base}.postflight", f"{base}.retry"
    await create_topics(kafka, (TopicSpec(postflight, 1), TopicSpec(retry, 1)))
    async with (
        make_producer(kafka) as producer,
        make_consumer(kafka, postflight, group_id=group) as consumer,
        make_consumer(kafka, retry, group_id=f"{group}-retry") as retry_consumer,
    ):
        persist = PersistWorker(
            env.router, producer, consumer, retry_consumer, retry_topic=retry, settings=PersistSettings()
        )
        stopping = asyncio.Event()
        task = asyncio.create_task(persist.run(stopping), name="persist-content-versions")
        try:
            yield postflight, task
        finally:
            stopping.set()
            await asyncio.wait_for(task, 60)


def patches_without_row() -> float:
    value = REGISTRY.get_sample_value("flightlog_persist_records_total", {"outcome": "patch_without_row"})
    return value or 0.0


async def test_the_worker_reads_content_versions_and_patches_from_postflight(
    env: Env, topics: None, kafka_settings: KafkaSettings
) -> None:
    m, missing = key(), key()
    records = [
        full(env, m, 20, content_version=0, starred=True),
        full(env, m, 10),
        patch(env, m, 30, flags={"folder": "Archive"}),
        patch(env, missing, 30, deleted=True),
    ]
    without_row = patches_without_row()
    async with worker(kafka_settings, env) as (postflight, task):
        async with make_producer(kafka_settings) as producer:
            for r in records:  # one at a time: the worker may take them in one batch or several
                await (
                    await producer.send(
                        postflight, encode(r), key=message_key_bytes(r.account_id, r.message_key)
                    )
                )

        async def settled() -> bool:
            if task.done():
                task.result()
                raise AssertionError("the worker stopped")
            row = await stored(env, m)
            done = row is not None and row["version"] == 30 and row["content_version"] == 10
            return done and patches_without_row() == without_row + 1

        await eventually(settled, 90, "the late content, the patch and the patch without a row")
    row = await stored(env, m)
    assert_content(row)
    assert row is not None and row["starred"] == 1 and row["folder"] == "Archive"
    assert await stored(env, missing) is None
    assert patches_without_row() == without_row + 1


@contextlib.asynccontextmanager
async def schema_before(env: Env, db_settings: DatabaseSettings, migration: str) -> AsyncIterator[Any]:
    """A cursor in a scratch shard schema holding every migration before ``migration``, and that
    migration for the test to run; the schema is dropped afterwards."""
    schema = f"flightlog_test_{uuid.uuid4().hex[:8]}"
    [added] = [m for m in load_migrations("shard") if m.name == migration]
    server = env.router.shard_map.cluster_of(env.shard).primary
    async with connect(db_settings, *server) as conn, conn.cursor() as cur:
        try:
            await cur.execute(f"CREATE DATABASE `{schema}`")
            await cur.execute(f"USE `{schema}`")
            for earlier in load_migrations("shard"):
                if earlier.version < added.version:
                    for statement in earlier.statements:
                        await cur.execute(statement)
            yield cur, added
        finally:
            await cur.execute(f"DROP DATABASE IF EXISTS `{schema}`")
            await conn.commit()


async def test_the_migration_gives_existing_rows_their_version_as_content_version(
    env: Env, db_settings: DatabaseSettings
) -> None:
    async with schema_before(env, db_settings, "content_version") as (cur, added):
        await cur.execute(
            "INSERT INTO messages (account_id, message_key, version, subject) VALUES (1, 'a', 7, 's')"
        )
        for statement in added.statements:
            await cur.execute(statement)
        await cur.execute("INSERT INTO messages (account_id, message_key, version) VALUES (1, 'b', 9)")
        await cur.execute("SELECT message_key, version, content_version FROM messages ORDER BY message_key")
        assert [(bytes(k), v, cv) for k, v, cv in await cur.fetchall()] == [(b"a", 7, 7), (b"b", 9, 0)]


async def fields(env: Env, message_key: str) -> dict[str, Any]:
    """The columns of migration 0012, decoded."""
    pool = await env.router.pool(env.shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT participants, sent_at, rfc_message_id, in_reply_to, reference_ids, attachments"
            f" FROM {env.router.table(env.shard, 'messages')} WHERE account_id = %s AND message_key = %s",
            (env.account, message_key.encode()),
        )
        found = await cur.fetchone()
        await conn.commit()
    assert found is not None
    participants, sent_at, message_id, in_reply_to, references, attachments = found
    return {
        "participants": orjson.loads(participants) if participants is not None else None,
        "sent_at": sent_at,
        "message_id": message_id,
        "in_reply_to": in_reply_to,
        "references": orjson.loads(references) if references is not None else None,
        "attachments": orjson.loads(attachments) if attachments is not None else None,
    }


ANN = {"name": "Ann Lee", "email": "ann@example.test"}
BOB = {"name": None, "email": "bob@example.test"}
CY = {"name": "Cy", "email": "cy@example.test"}


async def test_the_message_fields_are_stored(env: Env) -> None:
    m = key()
    digest = "ab" * 32
    await write(
        env,
        full(
            env, m, 10, sender=ANN, to=[BOB], bcc=[CY], reply_to=["Desk <desk@example.test>"],
            date=datetime(2025, 7, 1, 10, tzinfo=UTC), message_id="<m@x>", in_reply_to="<p@x>",
            references=["<r@x>", "<p@x>"],
            attachments=[{"filename": "a.pdf", "size_bytes": 3, "sha256": digest}],
        ),
    )  # fmt: skip
    row = await stored(env, m)
    assert row is not None and row["sender"] == "ann@example.test" and row["to_addrs"] == ["bob@example.test"]
    got = await fields(env, m)
    assert got["participants"] == {
        "from": [ANN], "to": [BOB], "bcc": [CY], "reply_to": [{"name": "Desk", "email": "desk@example.test"}],
        "cc": [{"name": None, "email": "cy@example.test"}],  # CONTENT's bare cc
    }  # fmt: skip
    assert got["sent_at"] == datetime(2025, 7, 1, 10)  # UTC, without a zone
    assert (got["message_id"], got["in_reply_to"], got["references"]) == (
        "<m@x>",
        "<p@x>",
        ["<r@x>", "<p@x>"],
    )
    assert got["attachments"][0]["sha256"] == digest


@pytest.mark.parametrize("late_first", [False, True])
async def test_participants_merge_per_role_whatever_the_order(env: Env, late_first: bool) -> None:
    # Content version 20 sets cc alone (a late event), version 10 the rest: each role ends with
    # the value of the highest content version that carried it, in either order of arrival.
    m = key()
    first = full(env, m, 10, sender=ANN, to=[BOB], cc=[{"email": "old@example.test"}])
    late = PostflightRecord(
        account_id=env.account, message_key=m, version=20, content_version=20,
        message=MessageDoc.model_validate({"status": "delivered", "occurred_at": NOW, "cc": [CY]}),
    )  # fmt: skip
    await write(env, *((late, first) if late_first else (first, late)))
    got = await fields(env, m)
    assert got["participants"] == {"from": [ANN], "to": [BOB], "cc": [CY]}
    row = await stored(env, m)
    assert row is not None and row["cc_addrs"] == ["cy@example.test"] and row["sender"] == ANN["email"]


async def test_migration_0012_is_instant_and_old_rows_read(env: Env, db_settings: DatabaseSettings) -> None:
    async with schema_before(env, db_settings, "message_headers") as (cur, added):
        await cur.execute(
            "INSERT INTO messages (account_id, message_key, version, sender, to_addrs)"
            " VALUES (1, 'a', 7, 'a@x', '[\"b@y\"]')"
        )
        for statement in added.statements:  # ALGORITHM=INSTANT: an error if it had to copy
            await cur.execute(statement)
        await cur.execute("SELECT participants, sent_at, rfc_message_id, reference_ids FROM messages")
        assert [tuple(r) for r in await cur.fetchall()] == [(None, None, None, None)]
