"""The change notifier against the real MariaDB and Kafka: streams woken by the topic, by the
per-shard safety check when the topic says nothing, and a read that ran before its change was
visible read again.

The gateway runs in-process (:func:`libs.service.build_app`) with a changes topic of this run's,
on which the test publishes exactly what the change relay publishes (:func:`change_message`), and
a safety check far longer than the test: only the topic can wake its streams in time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import ClientResponse
from prometheus_client import REGISTRY

from libs.accounts import Account, create_account, create_application
from libs.config import KafkaSettings
from libs.ids import shard_of
from libs.kafka import TopicSpec, create_topics, make_producer
from libs.shards import ShardMap, ShardRouter
from services.gateway.notifier import ChangeNotifier
from services.gateway.resources import NOTIFIER
from services.gateway.service import DEFINITION as GATEWAY
from services.persist.relay import change_message
from tests.e2e.gateway_helpers import record, seed
from tests.integration.test_apps_in_process import served
from tests.scratch import app_name, topic_name

pytestmark = pytest.mark.integration

WAIT_S = 10.0  # a stream woken by the topic answers in milliseconds; the safety check is 300 s


@pytest.fixture
async def account(router: ShardRouter, shard_map: ShardMap, topics: None) -> tuple[str, Account]:
    app, key = await create_application(router, app_name("notifier"))
    return key, await create_account(router, app.id, "notifier@example.test", shard=shard_map.shards[0])


@pytest.fixture
async def changes_topic(kafka_settings: KafkaSettings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    topic = topic_name("changes")
    await create_topics(kafka_settings, (TopicSpec(topic, 3),))
    monkeypatch.setenv("FLIGHTLOG_GATEWAY_CHANGES_TOPIC", topic)
    monkeypatch.setenv("FLIGHTLOG_GATEWAY_DELTA_RECHECK_S", "300")
    yield topic


async def _relay(
    router: ShardRouter, kafka: KafkaSettings, topic: str, account_id: int, *, fake_id: int = 0
) -> int:
    """Publish the account's change rows as the relay would (or one announcing ``fake_id``, a
    change not committed yet); returns the highest id published."""
    shard = shard_of(account_id)
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT c.id, c.account_id, a.application_id, c.object_type, c.object_id, c.change_type,"
            f" c.version, UNIX_TIMESTAMP(c.created_at), c.status FROM {router.table(shard, 'changes')} c"
            f" LEFT JOIN {router.table(shard, 'accounts')} a ON a.id = c.account_id"
            " WHERE c.account_id = %s ORDER BY c.id",
            (account_id,),
        )
        rows: list[Any] = list(await cur.fetchall())
        await conn.commit()
    if fake_id:
        rows = [(fake_id, account_id, None, "message", fake_id, "created", 1, 0, None)]
    async with make_producer(kafka) as producer:
        for key, value in (change_message(shard, r) for r in rows):
            await producer.send_and_wait(topic, value, key=key)
    return int(rows[-1][0]) if rows else 0


async def _until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


async def _event(resp: ClientResponse) -> dict[str, str]:
    event: dict[str, str] = {}
    while True:
        line = (await resp.content.readline()).decode().rstrip("\n")
        if not line:
            if event:
                return event
            continue
        name, _, value = line.partition(": ")
        event[name] = value


def _reads() -> float:
    return REGISTRY.get_sample_value("flightlog_gateway_delta_reads_total") or 0.0


def _skipped() -> float:
    return REGISTRY.get_sample_value("flightlog_gateway_delta_reads_skipped_total") or 0.0


async def test_a_change_on_the_topic_wakes_the_streams_and_long_polls_of_its_account(
    router: ShardRouter, kafka_settings: KafkaSettings, account: tuple[str, Account], changes_topic: str
) -> None:
    key, acc = account
    auth = {"Authorization": f"Bearer {key}"}
    async with served(GATEWAY) as (client, ctx):
        await _until(lambda: ctx.app[NOTIFIER].feed_up)
        async with client.get(f"/v1/accounts/{acc.id}/delta/stream?heartbeat=60", headers=auth) as stream:
            assert (await _event(stream)) == {"retry": "2000"}
            poll = asyncio.ensure_future(client.get(f"/v1/accounts/{acc.id}/delta?timeout=30", headers=auth))
            await asyncio.sleep(0.5)  # the long-poll has read and waits
            await seed(router, [record(acc.id, "woken")])
            await _relay(router, kafka_settings, changes_topic, acc.id)
            async with asyncio.timeout(WAIT_S):
                event = await _event(stream)
                async with await poll as resp:
                    page = await resp.json()
        assert event["event"] == "delta" and '"message_key":"woken"' in event["data"]
        assert [d["object"]["message_key"] for d in page["deltas"]] == ["woken"]


async def test_a_read_that_ran_before_its_change_was_visible_reads_again(
    router: ShardRouter, kafka_settings: KafkaSettings, account: tuple[str, Account], changes_topic: str
) -> None:
    """The topic announces a change the stream's read cannot see yet (a replica a few ms behind;
    here: one not committed yet). The stream reads again shortly, without another notification."""
    key, acc = account
    auth = {"Authorization": f"Bearer {key}"}
    async with served(GATEWAY) as (client, ctx):
        await _until(lambda: ctx.app[NOTIFIER].feed_up)
        async with client.get(f"/v1/accounts/{acc.id}/delta/stream?heartbeat=60", headers=auth) as stream:
            assert (await _event(stream)) == {"retry": "2000"}
            reads = _reads()
            await _relay(router, kafka_settings, changes_topic, acc.id, fake_id=acc.id + 10**9)
            await _until(lambda: _reads() >= reads + 2, WAIT_S)  # woken, read nothing, read again
            await seed(router, [record(acc.id, "late")])  # nothing more on the topic
            async with asyncio.timeout(WAIT_S):
                event = await _event(stream)
        assert event["event"] == "delta" and '"message_key":"late"' in event["data"]


async def test_an_idle_long_poll_asking_again_at_its_shards_newest_change_waits_without_a_read(
    router: ShardRouter, kafka_settings: KafkaSettings, account: tuple[str, Account], changes_topic: str
) -> None:
    """A cursor at the shard's newest change (what an idle follower holds) needs no first read
    once a safety check has seen the shard since the feed came up; a later change still wakes
    the long-poll and is answered."""
    key, acc = account
    auth = {"Authorization": f"Bearer {key}"}
    async with served(GATEWAY) as (client, ctx):
        notifier: ChangeNotifier = ctx.app[NOTIFIER]
        await _until(lambda: notifier.feed_up)
        delta = f"/v1/accounts/{acc.id}/delta"

        async def cursor_now() -> str:
            async with client.get(delta, headers=auth) as resp:
                cursor: str = (await resp.json())["next_cursor"]  # at the shard's newest change
            return cursor

        cursor = await cursor_now()
        reads = _reads()
        async with client.get(f"{delta}?timeout=0.1&cursor={cursor}", headers=auth) as resp:
            assert resp.status == 200
        assert _reads() == reads + 1  # no safety check has read the shard yet: it reads

        await notifier.check_shards([shard_of(acc.id)])
        cursor = await cursor_now()  # taken after the check: at or past what it read
        reads, skipped = _reads(), _skipped()
        poll = asyncio.ensure_future(client.get(f"{delta}?timeout=30&cursor={cursor}", headers=auth))
        await _until(lambda: _skipped() == skipped + 1, WAIT_S)
        assert _reads() == reads

        await seed(router, [record(acc.id, "after-idle")])
        await _relay(router, kafka_settings, changes_topic, acc.id)
        async with asyncio.timeout(WAIT_S), await poll as resp:
            page = await resp.json()
        assert [d["object"]["message_key"] for d in page["deltas"]] == ["after-idle"]


async def _top(router: ShardRouter, shard: int) -> int:
    async with (await router.pool(shard, write=False)).acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT COALESCE(MAX(id), 0) FROM {router.table(shard, 'changes')}")
        (top,) = await cur.fetchone()
        await conn.commit()
    return int(top)


async def test_the_safety_check_wakes_a_shard_whose_changes_the_topic_did_not_bring(
    router: ShardRouter, account: tuple[str, Account]
) -> None:
    """No topic at all (a relay down, Kafka unreachable): a change committed by one check and not
    announced by the next wakes every stream of its shard; one the topic brought wakes none."""
    _, acc = account
    shard = shard_of(acc.id)
    async with ChangeNotifier(router, None, recheck_s=3600) as notifier:
        with notifier.subscribe(acc.id) as sub:
            await notifier.check_shards([shard])
            assert not sub.event.is_set()  # a first check only takes note
            await notifier.check_shards([shard])
            assert sub.event.is_set()  # what was committed at the first check never came
            sub.event.clear()
            await notifier.check_shards([shard])
            assert not sub.event.is_set()  # the shard's streams have read past all of that

            await seed(router, [record(acc.id, "unannounced")])
            await notifier.check_shards([shard])
            await notifier.check_shards([shard])
            assert sub.event.is_set()  # two checks at most after the commit
            sub.event.clear()

            # The topic brings everything committed (another account's change at the top): the
            # check finds nothing missing and wakes nobody.
            await notifier.check_shards([shard])
            notifier.notify(acc.id + 1, shard, await _top(router, shard))
            sub.event.clear()
            await notifier.check_shards([shard])
            assert not sub.event.is_set()
