"""A shard of the shared stack moves to the other cluster while lifecycle events stream into its
accounts through the running pipeline (ingest -> transform -> persist), and back again.

Ingest only writes to Kafka, so a client never sees the move: every batch is answered 202 (a
429 is waited out and retried, as a real client does; none is expected). Persist parks what it
cannot write while the shard is fenced (``ShardReadOnly``, or 1146 from a router still on the
old map) and writes it once the map names the new cluster. Afterwards every message is on the
new cluster with its final status, once, its change log exact, nothing dead-lettered; the new
cluster's replica holds the same rows. The shard then moves back and both moves are cleaned up,
in a ``finally``, so the shared stack ends with the placement it began with (at a higher map
version). The write pause the move reports is printed, not asserted (a bench figure).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiokafka import TopicPartition

from libs.config import KafkaSettings
from libs.db import connect, shard_schema
from libs.kafka import DLQ, make_consumer
from libs.shardops import ShardOpsSettings
from libs.shardops.move import MoveResult, cleanup_moved, move_shard, moved_schema
from libs.shardops.verify import verify_replica
from libs.shards import ShardMap, ShardRouter, load_shard_map, shard_sizes
from tests.e2e import checks
from tests.e2e.client import event
from tests.e2e.conftest import Pipeline
from tests.polling import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ACCOUNTS = 3
BATCH_PAUSE_S = 0.05  # between batches: a steady stream, not a flood
BATCHES_AFTER_MOVE = 30  # the stream goes on this long after the switch
UPDATE_LAG = 2  # a message is updated this many batches after its lifecycle was posted
SETTLE_TIMEOUT_S = 240.0  # generous: persist works through what it parked during the fence

CONTENT: dict[str, Any] = {
    "from": "sender@example.test",
    "to": ["rcpt@example.test"],
    "subject": "moving",
    "body_text": "a message written while its shard moves " * 5,
    "channel": "email",
}


def delivered(account: int, key: str) -> list[dict[str, Any]]:
    statuses = ("accepted", "queued", "sending", "sent", "delivered")
    events = [event(account, key, s, step=i, direction="outbound") for i, s in enumerate(statuses)]
    events[0]["content"] = CONTENT
    return events


def failed(account: int, key: str) -> list[dict[str, Any]]:
    statuses = ("accepted", "queued", "sending", "failed")
    return [event(account, key, s, step=i, direction="outbound") for i, s in enumerate(statuses)]


def received(account: int, key: str) -> list[dict[str, Any]]:
    return [
        event(account, key, "receiving", step=0, direction="inbound"),
        event(account, key, "received", step=1, direction="inbound", content=CONTENT),
    ]


def update(account: int, key: str) -> dict[str, Any]:
    return event(account, key, "updated", step=10, flags={"unread": False, "starred": True})


@dataclass
class Stream:
    """What the background client posted: each message's final status, which were updated."""

    accounts: list[int]
    api_key: str
    url: str
    final: dict[tuple[int, str], str] = field(default_factory=dict)
    updated: set[tuple[int, str]] = field(default_factory=set)
    batches: int = 0
    statuses: dict[int, int] = field(default_factory=dict)  # HTTP status -> batches
    refused: list[tuple[int, Any]] = field(default_factory=list)
    waited_429: int = 0
    moved: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, stop: asyncio.Event) -> None:
        pending: list[list[tuple[int, str]]] = []  # per batch: messages to update later
        after_move = 0
        async with aiohttp.ClientSession() as http:
            while not stop.is_set() and after_move < BATCHES_AFTER_MOVE:
                n = self.batches
                events: list[dict[str, Any]] = []
                finals: dict[tuple[int, str], str] = {}
                later: list[tuple[int, str]] = []
                for a in self.accounts:
                    for key, make, final in (
                        (f"out-{n}", delivered, "delivered"),
                        (f"bad-{n}", failed, "failed"),
                        (f"in-{n}", received, "received"),
                    ):
                        events += make(a, key)
                        finals[a, key] = final
                    later += [(a, f"in-{n}")] + ([(a, f"out-{n}")] if n % 2 else [])
                if len(pending) >= UPDATE_LAG:
                    due = pending.pop(0)
                    events += [update(a, key) for a, key in due]
                    self.updated.update(due)
                pending.append(later)
                self.final.update(finals)
                status, body = await self._post(http, events)
                self.batches += 1
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if status != 202:
                    self.refused.append((status, body))
                if self.moved.is_set():
                    after_move += 1
                await asyncio.sleep(BATCH_PAUSE_S)

    async def _post(self, http: aiohttp.ClientSession, events: list[dict[str, Any]]) -> tuple[int, Any]:
        """As ``post_events`` does (a 429 is waited out and retried), counting the 429s."""
        while True:
            async with http.post(
                f"{self.url}/v1/events",
                json={"events": events},
                headers={"Authorization": f"Bearer {self.api_key}"},
            ) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 429:
                    return resp.status, body
                self.waited_429 += 1
                retry_after = float(resp.headers.get("Retry-After", "1"))
            await asyncio.sleep(retry_after)


async def current_map(settings: ShardOpsSettings) -> ShardMap:
    async with connect(settings, settings.global_db_host, settings.global_db_port) as conn:
        return await load_shard_map(conn, settings.global_db_name)


async def rows_on(
    settings: ShardOpsSettings, address: tuple[str, int], shard: int, accounts: list[int]
) -> tuple[dict[tuple[int, str], dict[str, Any]], int]:
    """The accounts' messages on the server at ``address`` (not through the map), and how many
    rows there are in all (more than messages: a duplicate)."""
    marks = ", ".join(["%s"] * len(accounts))
    async with connect(settings, *address) as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT account_id, message_key, id, version, status, unread, starred"
            f" FROM `{shard_schema(shard)}`.messages WHERE account_id IN ({marks})",
            accounts,
        )
        rows = await cur.fetchall()
        await conn.commit()
    out = {
        (int(a), bytes(k).decode()): {
            "id": int(i),
            "version": int(v),
            "status": s,
            "unread": u,
            "starred": st,
        }
        for a, k, i, v, s, u, st in rows
    }
    return out, len(rows)


async def dead_letters(settings: KafkaSettings, accounts: list[int], since_ms: int) -> list[bytes]:
    """Keys of DLQ records written from ``since_ms`` on that name one of ``accounts``."""
    needles = [str(a).encode() for a in accounts]
    found: list[bytes] = []
    consumer = make_consumer(settings, group_id=None)
    async with consumer:
        tps = [TopicPartition(DLQ, 0)]
        consumer.assign(tps)
        for tp, offset in (await checks.offsets_since(consumer, tps, since_ms)).items():
            consumer.seek(tp, offset)
        end = await consumer.end_offsets(tps)
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for r in (r for rs in batch.values() for r in rs):
                blob = (r.key or b"") + b" " + (r.value or b"")
                if any(n in blob for n in needles):
                    found.append(r.key or b"")
    return found


async def restore(settings: ShardOpsSettings, shard: int, home: str) -> None:
    """Put ``shard`` back on cluster ``home`` and leave no copy behind, whatever state a failed
    test left it in (a failed move rolls itself back)."""
    m = await current_map(settings)
    if m.cluster_of(shard).name != home:
        print(f"cleanup: {await cleanup_moved(settings, shard)}")
        back = await move_shard(settings, shard, home, progress=print)
        print(f"moved back: pause {back.write_pause_s * 1000:.0f} ms")
    print(f"cleanup: {await cleanup_moved(settings, shard)}")


async def test_a_shard_moves_between_the_clusters_while_events_stream_into_it(
    pipeline: Pipeline, router: ShardRouter, tenant_factory: Any, kafka_settings: KafkaSettings
) -> None:
    settings = ShardOpsSettings()
    start_map = await current_map(settings)
    assert len(start_map.clusters) == 2, "the shared stack has two clusters"
    assert not start_map.readonly, f"shards {sorted(start_map.readonly)} are moving already"
    # The largest shard that other tests do not pick: new accounts of concurrent runs go to the
    # smallest, and the pipeline tests use the first two.
    sizes = await shard_sizes(router)
    shard = max(start_map.shards[2:], key=lambda s: (sizes.get(s, 0), s))
    home = start_map.cluster_of(shard)
    away = next(c for c in start_map.clusters.values() if c.cluster_id != home.cluster_id)
    print(f"\nshard {shard}: {home.name} -> {away.name} and back (map version {start_map.version})")

    tenant = await tenant_factory([shard] * ACCOUNTS)
    accounts = [acc.id for acc in tenant.accounts]
    stream = Stream(accounts, tenant.api_key, pipeline.url("ingest"))
    stop = asyncio.Event()
    streaming = asyncio.create_task(stream.run(stop), name="event-stream")
    move: MoveResult | None = None
    try:
        # The pipeline is flowing into the shard before the move starts: the snapshot holds
        # some of the messages, the catch-up and the fenced round the rest.
        async def flowing() -> bool:
            assert not streaming.done(), streaming
            stored, _ = await rows_on(settings, home.primary, shard, accounts)
            return len(stored) >= 6 * ACCOUNTS

        await eventually(flowing, 120, "the first messages in the shard")
        batches_before = stream.batches
        print(f"move starts at {time.time():.3f}")
        move = await move_shard(settings, shard, away.name, progress=print)
        print(f"move ends at {time.time():.3f}")
        stream.moved.set()
        print(
            f"write pause (fence to published map): {move.write_pause_s * 1000:.0f} ms;"
            f" {batches_before} batches before the move, {stream.batches - batches_before} during it"
        )
        await streaming  # BATCHES_AFTER_MOVE more, then it ends by itself
        print(
            f"stream: {stream.batches} batches, {len(stream.final)} messages, {len(stream.updated)}"
            f" updates, answers {stream.statuses}, {stream.waited_429} 429s waited out"
        )
        assert move.verify is not None and move.verify.ok, move.verify.lines() if move.verify else None
        assert not stream.refused, stream.refused[:3]
        assert stream.statuses == {202: stream.batches}

        moved_map = await current_map(settings)
        assert moved_map.cluster_of(shard).cluster_id == away.cluster_id
        assert shard not in moved_map.readonly and moved_map.version == move.shard_map_version
        await router.reload()  # the test's own reads follow the map at once

        expected = {
            key: (status, key in stream.updated) for key, status in stream.final.items()
        }  # (account, message key) -> (final status, updated)

        async def all_there() -> bool:
            stored, _ = await rows_on(settings, away.primary, shard, accounts)
            return {
                k: (r["status"], r["starred"] == 1 and r["unread"] == 0) for k, r in stored.items()
            } == expected

        await eventually(all_there, SETTLE_TIMEOUT_S, "every message final on the new cluster")
        stored, count = await rows_on(settings, away.primary, shard, accounts)
        assert count == len(stored) == len(expected)  # one row per message: nothing duplicated

        # Each row is at its message's last postflight version; the change log is exact.
        versions = await checks.postflight_versions(kafka_settings, set(accounts), tenant.created_ms)
        assert set(versions) == set(expected)
        for key, row in stored.items():
            assert row["version"] == versions[key][-1], (key, row, versions[key])
            # stored when sent (delivered ones), then final, then updated (some)
            assert len(versions[key]) <= 3 and (len(versions[key]) <= 2 or key in stream.updated)
        for a in accounts:
            checks.assert_exact_changes(
                await checks.changes(router, a),
                {r["id"]: (r["version"], False) for (acc, _), r in stored.items() if acc == a},
            )
        dead = await dead_letters(kafka_settings, accounts, tenant.created_ms)
        assert not dead, f"{len(dead)} records dead-lettered: {dead[:5]}"

        # The old copy is fenced: no live table left on the old cluster, the copy renamed aside.
        admin = settings.admin()
        async with connect(admin, *home.primary) as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s",
                (shard_schema(shard),),
            )
            assert (await cur.fetchone())[0] == 0
            await cur.execute(f"SELECT COUNT(*) FROM `{moved_schema(shard)}`.messages")
            assert (await cur.fetchone())[0] > 0
            await conn.commit()
        # The new cluster's replica holds what its primary holds (the move's writes replicated).
        report = await verify_replica(settings, shard)
        print("\n".join(report.lines()))
        assert report.ok, report.lines()
        print(move.summary())
    finally:
        stop.set()
        with contextlib.suppress(BaseException):
            await streaming
        await restore(settings, shard, home.name)
        end_map = await current_map(settings)
        assert end_map.shard_cluster == start_map.shard_cluster and not end_map.readonly
        await router.reload()
        if move is not None:
            print(f"move pause: {move.write_pause_s * 1000:.0f} ms; map version now {end_map.version}")
