"""persist against the real MariaDB: the threads table recomputed in the messages' transaction.

Drives :func:`write_shard` directly with made-up accounts on a real shard (random bits, so no
other test's rows are touched): a thread's aggregate follows its messages (new, read, deleted,
moved to another thread), a replayed batch changes nothing, and a thread's change row is written
only when its aggregate changed.
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from libs.events import MessageDoc, MessageFlags, MessagePatch, PostflightRecord
from libs.ids import shard_of
from libs.shards import ShardRouter
from services.persist.writer import write_shard
from tests.e2e.checks import changes

pytestmark = pytest.mark.integration

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def account(router: ShardRouter) -> int:
    shard = router.shard_map.shards[0]
    return shard << 48 | 1 << 45 | secrets.randbits(40)


def msg(
    account: int, key: str, version: int, *, thread: str | None, minute: int = 0, **doc: Any
) -> PostflightRecord:
    fields: dict[str, Any] = {
        "status": "received", "direction": "inbound", "occurred_at": T0 + timedelta(minutes=minute),
        "subject": f"subject of {key}", "sender": "ann@example.test", "thread_key": thread,
    }  # fmt: skip
    fields |= doc
    deleted = fields.pop("deleted", False)
    return PostflightRecord(
        account_id=account, message_key=key, version=version, deleted=deleted, message=MessageDoc(**fields)
    )


def read_patch(account: int, key: str, version: int) -> PostflightRecord:
    return PostflightRecord(
        account_id=account,
        message_key=key,
        version=version,
        content_version=0,
        message=MessageDoc(occurred_at=T0),
        patch=MessagePatch(flags=MessageFlags(unread=False)),
    )


async def write(router: ShardRouter, records: list[PostflightRecord]) -> None:
    await write_shard(router, shard_of(records[0].account_id), records)


async def threads(router: ShardRouter, account: int) -> dict[str, dict[str, Any]]:
    shard = shard_of(account)
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT thread_key, id, message_count, unread_count, last_message_at, subject, version"
            f" FROM {router.table(shard, 'threads')} WHERE account_id = %s",
            (account,),
        )
        rows = await cur.fetchall()
        await conn.commit()
    cols = ("id", "count", "unread", "last", "subject", "version")
    return {k: dict(zip(cols, rest, strict=True)) for k, *rest in rows}


async def thread_changes(router: ShardRouter, account: int) -> list[tuple[int, str, int]]:
    """(thread id, change type, version) of the account's threads, in commit order."""
    return await changes(router, account, "thread")


async def test_a_reply_chain_is_one_thread_and_a_replay_changes_nothing(
    router: ShardRouter, account: int
) -> None:
    batch = [
        msg(account, "root", 10, thread="t1", minute=0, subject="Lunch?"),
        msg(account, "reply", 11, thread="t1", minute=5, subject="Re: Lunch?", unread=False),
        msg(account, "again", 12, thread="t1", minute=9, subject="Re: Re: Lunch?"),
        msg(account, "alone", 13, thread="t2", minute=1),
        msg(account, "none", 14, thread=None, minute=2),
    ]
    await write(router, batch)
    got = await threads(router, account)
    assert set(got) == {"t1", "t2"}  # a message without a thread key is in none
    t1 = got["t1"]
    assert (t1["count"], t1["unread"], t1["subject"], t1["version"]) == (3, 2, "Lunch?", 1)
    assert t1["last"] == (T0 + timedelta(minutes=9)).replace(tzinfo=None)
    assert shard_of(t1["id"]) == shard_of(account)
    first = await thread_changes(router, account)
    assert sorted(first) == sorted([(t1["id"], "created", 1), (got["t2"]["id"], "created", 1)])

    await write(router, batch)  # redelivered: the same rows, no change
    await write(router, batch[:2])
    assert await threads(router, account) == got
    assert await thread_changes(router, account) == first


async def test_read_state_and_new_messages_update_the_thread(router: ShardRouter, account: int) -> None:
    await write(router, [msg(account, "a", 10, thread="t"), msg(account, "b", 11, thread="t", minute=3)])
    tid = (await threads(router, account))["t"]["id"]
    await write(router, [read_patch(account, "a", 20)])
    t = (await threads(router, account))["t"]
    assert (t["count"], t["unread"], t["version"]) == (2, 1, 2)
    # A change the aggregate does not show (a star) changes the message, not the thread.
    star = msg(account, "b", 21, thread="t", minute=3, starred=True).model_copy(update={"content_version": 0})
    await write(router, [star])
    assert (await threads(router, account))["t"]["version"] == 2
    await write(router, [msg(account, "c", 30, thread="t", minute=1)])  # an earlier message, late
    t = (await threads(router, account))["t"]
    assert (t["count"], t["unread"], t["subject"], t["version"]) == (3, 2, "subject of a", 3)
    assert t["last"] == (T0 + timedelta(minutes=3)).replace(tzinfo=None)
    assert await thread_changes(router, account) == [(tid, "created", 1), (tid, "updated", 2),
                                                     (tid, "updated", 3)]  # fmt: skip


async def test_a_message_moving_threads_updates_both(router: ShardRouter, account: int) -> None:
    await write(
        router,
        [
            msg(account, "a", 10, thread="old"),
            msg(account, "b", 11, thread="old"),
            msg(account, "c", 12, thread="x"),
        ],
    )
    before = await threads(router, account)
    await write(router, [msg(account, "b", 20, thread="new")])  # newer content with another key
    after = await threads(router, account)
    assert (after["old"]["count"], after["old"]["version"]) == (1, 2)
    assert (after["new"]["count"], after["new"]["version"]) == (1, 1)
    assert after["x"] == before["x"]
    # The last message leaves: the thread is emptied, keeps its id and says so once.
    await write(router, [msg(account, "a", 21, thread="new")])
    after = await threads(router, account)
    assert (after["old"]["count"], after["old"]["last"], after["old"]["version"]) == (0, None, 3)
    assert after["old"]["id"] == before["old"]["id"]
    assert after["new"]["count"] == 2
    old_changes = [c for c in await thread_changes(router, account) if c[0] == before["old"]["id"]]
    assert old_changes == [(before["old"]["id"], "created", 1), (before["old"]["id"], "updated", 2),
                           (before["old"]["id"], "deleted", 3)]  # fmt: skip


async def test_deletion_counts_and_the_last_one_deletes_the_thread(router: ShardRouter, account: int) -> None:
    await write(router, [msg(account, "a", 10, thread="t"), msg(account, "b", 11, thread="t", minute=4)])
    tid = (await threads(router, account))["t"]["id"]
    await write(router, [msg(account, "b", 20, thread="t", minute=4, deleted=True)])
    t = (await threads(router, account))["t"]
    assert (t["count"], t["unread"], t["version"]) == (1, 1, 2)
    assert t["last"] == T0.replace(tzinfo=None)  # the deleted message's time no longer counts
    delete = PostflightRecord(
        account_id=account,
        message_key="a",
        version=30,
        content_version=0,
        message=MessageDoc(occurred_at=T0),
        patch=MessagePatch(deleted=True),
    )
    await write(router, [delete])
    await write(router, [delete])  # redelivered
    t = (await threads(router, account))["t"]
    assert (t["count"], t["unread"], t["subject"], t["version"]) == (0, 0, None, 3)
    assert await thread_changes(router, account) == [(tid, "created", 1), (tid, "updated", 2),
                                                     (tid, "deleted", 3)]  # fmt: skip
    # A message stored deleted from the start makes no thread to speak of.
    await write(router, [msg(account, "z", 40, thread="dead", deleted=True)])
    assert (await threads(router, account))["dead"]["count"] == 0
    assert [c for c in await thread_changes(router, account) if c[0] != tid] == []


async def test_concurrent_writers_of_one_thread_lose_no_message(router: ShardRouter, account: int) -> None:
    """Two transactions of one shard adding messages to one thread at once (persist's batches in
    flight, its retry consumer, another replica): each recomputes after the other committed."""
    for round_ in range(5):
        batches = [
            [msg(account, f"r{round_}-w{w}-{i}", 100 + i, thread="busy", minute=i) for i in range(20)]
            for w in range(2)
        ]
        await asyncio.gather(*(write(router, b) for b in batches))
        busy = (await threads(router, account))["busy"]
        assert (busy["count"], busy["unread"]) == (40 * (round_ + 1), 40 * (round_ + 1))
