"""Reading back what the pipeline wrote (rows and changes straight from MariaDB, postflight records
from Kafka), and waiting for it."""

from __future__ import annotations

import itertools
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from libs.config import KafkaSettings
from libs.events import decode_postflight
from libs.ids import shard_of
from libs.kafka import POSTFLIGHT, TOPICS, make_consumer
from libs.shards import ShardRouter


async def messages(router: ShardRouter, account_id: int) -> dict[str, dict[str, Any]]:
    shard = shard_of(account_id)
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT id, message_key, version, status, direction, subject, snippet, unread, starred,"
            " folder, deleted, redacted, body IS NULL"
            f" FROM {router.table(shard, 'messages')} WHERE account_id = %s",
            (account_id,),
        )
        rows = await cur.fetchall()
        await conn.commit()
    cols = ("id", "message_key", "version", "status", "direction", "subject", "snippet", "unread",
            "starred", "folder", "deleted", "redacted", "body_is_null")  # fmt: skip
    return {bytes(r[1]).decode(): dict(zip(cols, r, strict=True)) for r in rows}


async def changes(
    router: ShardRouter, account_id: int, object_type: str = "message"
) -> list[tuple[int, str, int]]:
    """(object_id, change_type, version) of the account's messages (or threads), in commit order."""
    shard = shard_of(account_id)
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT object_id, change_type, version FROM {router.table(shard, 'changes')}"
            " WHERE account_id = %s AND object_type = %s ORDER BY id",
            (account_id, object_type),
        )
        rows = await cur.fetchall()
        await conn.commit()
    return [(int(a), b, int(c)) for a, b, c in rows]


async def offsets_since(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], since_ms: int
) -> dict[TopicPartition, int]:
    """Each partition's first offset written at ``since_ms`` or later (its end if none is): where
    a test's records begin in a shared topic, which only grows."""
    # The end first: a record written between the two calls is then either found or after it
    # (read the other way round, the end could already be past it, and the record skipped).
    end = await consumer.end_offsets(tps)
    found = await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
    return {tp: end[tp] if found[tp] is None else found[tp].offset for tp in tps}


async def postflight_versions(
    settings: KafkaSettings, accounts: set[int], since_ms: int
) -> dict[tuple[int, str], list[int]]:
    """The versions of the committed postflight records of each message of ``accounts``, in the
    order they were written (a message's records share a partition), written from ``since_ms``
    on (the accounts' creation)."""
    versions: dict[tuple[int, str], list[int]] = {}
    consumer = make_consumer(settings, group_id=None)
    async with consumer:
        count = next(spec.partitions for spec in TOPICS if spec.name == POSTFLIGHT)
        partitions = [TopicPartition(POSTFLIGHT, p) for p in range(count)]
        consumer.assign(partitions)
        for tp, offset in (await offsets_since(consumer, partitions, since_ms)).items():
            consumer.seek(tp, offset)
        end = await consumer.end_offsets(partitions)
        while any([await consumer.position(tp) < end[tp] for tp in partitions]):
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for r in (r for rs in batch.values() for r in rs):
                prefix = (r.key or b"").split(b":", 1)[0]
                if not prefix.isdigit() or int(prefix) not in accounts:
                    continue  # other tests' records, some of them deliberately undecodable
                rec = decode_postflight(r.value or b"")
                if rec.account_id in accounts:
                    versions.setdefault((rec.account_id, rec.message_key), []).append(rec.version)
    return versions


def assert_exact_changes(got: list[tuple[int, str, int]], final: dict[int, tuple[int, bool]]) -> None:
    """The change log of an account is exact: per message, one ``created`` first, versions
    increasing, ending at the message's final version, ``deleted`` last if it was deleted.
    Versions written in one batch collapse into one change (the row went straight to the newest),
    so intermediate versions may be absent. A version repeats only when content lands after a
    newer content-less record (a parked record overtaken, e.g. during a shard move): the row's
    content version went up, not its version, and persist writes one ``updated`` change at the
    row's version (services.persist.writer); a replay can never repeat a change.

    ``final`` maps object id -> (final version, deleted).
    """
    per_object: dict[int, list[tuple[str, int]]] = {}
    for object_id, kind, version in got:
        per_object.setdefault(object_id, []).append((kind, version))
    assert set(per_object) == set(final), "changes for unexpected or missing messages"
    for object_id, entries in per_object.items():
        kinds = [k for k, _ in entries]
        versions = [v for _, v in entries]
        # A message created and deleted within one batch leaves just its tombstone.
        assert kinds[0] == "created" or kinds == ["deleted"], (object_id, entries)
        assert kinds.count("created") <= 1, (object_id, entries)
        assert versions == sorted(versions), f"reordered changes: {entries}"
        for (_, before), (kind, version) in itertools.pairwise(entries):
            assert version != before or kind == "updated", f"a repeated change: {entries}"
        assert all(versions.count(v) <= 2 for v in versions), f"a change repeated: {entries}"
        final_version, deleted = final[object_id]
        assert versions[-1] == final_version, (object_id, entries)
        assert (kinds[-1] == "deleted") == deleted, (object_id, entries)
