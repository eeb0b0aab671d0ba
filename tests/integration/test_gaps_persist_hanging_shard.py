"""persist and a hanging shard: a primary that stops answering (the connection stays open, no
byte comes back) costs one write timeout, opens the breaker and parks that cluster's records,
while the other cluster's records are written; once it answers again every parked record lands
once, with its change rows.

A proxy on a real socket stands in front of one cluster's primary, and the worker's router has a
map in which that cluster's primary is the proxy (the global schema's map is left alone). Runs a
:class:`PersistWorker` in this process on topics and groups of its own, with the helpers of
tests/integration/test_persist_poison.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Final, Self

import pytest
from aiokafka import TopicPartition

from libs.config import DatabaseSettings
from libs.events import PostflightRecord, decode_postflight
from libs.kafka import make_consumer, make_producer
from libs.shards import ShardMap, ShardRouter
from services.persist.worker import PersistSettings, PersistWorker
from tests.integration.test_persist_poison import (
    Env,
    _alive,
    env,
    publish,
    raw,
    record,
    stored,
)
from tests.polling import eventually

pytestmark = pytest.mark.integration

__all__ = ["env"]  # the fixture, shared with test_persist_poison

HOST: Final = "127.0.0.1"
# The lock wait stays below the write timeout, so only the hang can reach the timeout.
SETTINGS: Final = PersistSettings(
    persist_write_timeout_s=2.0, persist_lock_wait_timeout_s=1, persist_max_backoff_s=0.5
)


class HangingProxy:
    """A TCP proxy to ``upstream`` that forwards both ways until :meth:`hang`; then it holds
    every byte it reads, in both directions, and keeps every socket open (a server that stopped
    answering, not one that refuses). :meth:`forward` closes the connections it held and
    forwards the new ones, as a server that came back would."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.held_bytes = 0
        self._server: asyncio.Server | None = None
        self._forwarding = asyncio.Event()
        self._forwarding.set()
        self._generation = 0
        # each connection's handler -> its generation and its sockets (client side, server side)
        self._links: dict[asyncio.Task[None], tuple[int, list[asyncio.StreamWriter]]] = {}

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._drop(every=True)
        await asyncio.gather(*self._links, return_exceptions=True)

    def hang(self) -> None:
        self._forwarding.clear()

    def forward(self) -> None:
        self._drop(every=False)

    def _drop(self, *, every: bool) -> None:
        """Close the connections held over a hang (``every``: all of them) and forward again."""
        if every or not self._forwarding.is_set():
            self._generation += 1
        for generation, writers in self._links.values():
            if generation < self._generation:
                for writer in writers:
                    writer.close()
        self._forwarding.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        generation, writers = self._links[task] = (self._generation, [writer])
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            writers.append(up_writer)
            if generation != self._generation:
                return
            await asyncio.gather(
                self._pump(reader, up_writer, generation), self._pump(up_reader, writer, generation)
            )
        except OSError:
            pass
        finally:
            for w in writers:
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
            del self._links[task]

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, generation: int) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(1 << 16):
                if not self._forwarding.is_set():
                    self.held_bytes += len(data)
                    await self._forwarding.wait()
                if generation != self._generation:
                    break  # held over a hang: its peer has given up on it
                dst.write(data)
                await dst.drain()
        dst.close()  # one side closed: close the other, which ends the other pump


class ProxiedRouter(ShardRouter):
    """A router whose map names ``via`` as the primary of the cluster whose primary is ``primary``."""

    def __init__(self, settings: DatabaseSettings, *, primary: tuple[str, int], via: tuple[str, int]) -> None:
        super().__init__(settings)
        self._primary = primary
        self._via = via

    async def reload(self) -> bool:
        changed = await super().reload()
        if changed:
            self._map = self._through(self.shard_map)
        return changed

    def _through(self, shard_map: ShardMap) -> ShardMap:
        host, port = self._via
        clusters = {
            cid: dataclasses.replace(c, primary_host=host, primary_port=port)
            if c.primary == self._primary
            else c
            for cid, c in shard_map.clusters.items()
        }
        return dataclasses.replace(shard_map, clusters=clusters)


def on_shard(env: Env, shard: int) -> Env:
    """``env`` for a made-up account of its own on ``shard``."""
    return dataclasses.replace(env, shard=shard, account=shard << 48 | 1 << 44 | secrets.randbits(40))


def of(env: Env, records: list[PostflightRecord]) -> list[PostflightRecord]:
    return [r for r in records if r.account_id == env.account]


async def parked(env: Env) -> set[tuple[int, str]]:
    """(account, message_key) of every record on the worker's retry topic."""
    tp = TopicPartition(env.retry, 0)
    async with make_consumer(env.kafka, group_id=None) as consumer:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        found: set[tuple[int, str]] = set()
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for r in batch.get(tp, []):
                doc = decode_postflight(r.value or b"")
                found.add((doc.account_id, doc.message_key))
    return found


async def change_rows(env: Env) -> list[tuple[str, str, int]]:
    """(message_key, change_type, version) of the account's change rows, read past any proxy."""
    messages, changes = env.router.table(env.shard, "messages"), env.router.table(env.shard, "changes")
    pool = await env.router.pool(env.shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT m.message_key, c.change_type, c.version FROM {changes} c"
            f" JOIN {messages} m ON m.id = c.object_id"
            " WHERE c.account_id = %s AND c.object_type = 'message' ORDER BY c.id",
            (env.account,),
        )
        rows = await cur.fetchall()
        await conn.commit()
    return [(bytes(k).decode(), str(t), int(v)) for k, t, v in rows]


@contextlib.asynccontextmanager
async def running(env: Env, router: ShardRouter) -> AsyncIterator[tuple[PersistWorker, asyncio.Task[None]]]:
    async with (
        make_producer(env.kafka) as producer,
        make_consumer(env.kafka, env.postflight, group_id=env.group) as consumer,
        make_consumer(env.kafka, env.retry, group_id=f"{env.group}-retry") as retry,
    ):
        worker = PersistWorker(router, producer, consumer, retry, retry_topic=env.retry, settings=SETTINGS)
        stopping = asyncio.Event()
        task = asyncio.create_task(worker.run(stopping), name="persist-test-worker")
        try:
            yield worker, task
        finally:
            stopping.set()
            await asyncio.wait_for(task, 60)


async def test_a_hanging_shard_is_parked_and_lands_once_it_answers(
    env: Env, db_settings: DatabaseSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.persist.worker")
    shard_map = env.router.shard_map
    by_cluster: dict[int, int] = {}
    for shard in shard_map.shards:
        by_cluster.setdefault(shard_map.shard_cluster[shard], shard)
    assert len(by_cluster) >= 2, "the stack runs two clusters; this test needs both"
    hung_shard, other_shard = list(by_cluster.values())[:2]
    # Rows are read straight from the primaries (env.router), never through the proxy.
    hung, other = on_shard(env, hung_shard), on_shard(env, other_shard)
    tag = uuid.uuid4().hex[:8]
    before = [record(e, f"before-{tag}-{i}") for e in (hung, other) for i in range(4)]
    during = [record(e, f"during-{tag}-{i}") for e in (hung, other) for i in range(4)]
    update = record(hung, before[0].message_key, version=2, starred=True)

    async with (
        HangingProxy(shard_map.cluster_of(hung_shard).primary) as proxy,
        ProxiedRouter(db_settings, primary=proxy.upstream, via=proxy.address) as router,
    ):
        assert router.shard_map.cluster_of(hung_shard).primary == proxy.address
        assert router.shard_map.cluster_of(other_shard).primary != proxy.address
        async with running(env, router) as (worker, task):
            try:
                await publish(env, [raw(r) for r in before])

                async def written_before() -> bool:
                    return [len(await stored(e)) for e in (hung, other)] == [
                        len(of(e, before)) for e in (hung, other)
                    ]

                await eventually(_alive(task, written_before), 90, "the records of both clusters")

                proxy.hang()
                await publish(env, [raw(r) for r in [*during, update]])
                hung_keys = {(hung.account, r.message_key) for r in [*of(hung, during), update]}

                async def hung_parked_other_written() -> bool:
                    return (
                        hung_keys <= await parked(env)
                        and len(await stored(other)) == len(of(other, [*before, *during]))
                        and not worker.breaker.allows(hung_shard)
                    )

                await eventually(
                    _alive(task, hung_parked_other_written),
                    90,
                    "the hanging shard's records parked, its breaker open, the other cluster's written",
                )
                assert proxy.held_bytes > 0
                assert await stored(hung) == {r.message_key: 1 for r in of(hung, before)}
                assert any(
                    r.getMessage().startswith(f"shard {hung_shard} unavailable (TimeoutError)")
                    for r in caplog.records
                )

                proxy.forward()
                want = {r.message_key: 1 for r in of(hung, [*before, *during])} | {update.message_key: 2}

                async def landed() -> bool:
                    return await stored(hung) == want

                await eventually(_alive(task, landed), 90, "the parked records, once the shard answers")
            finally:
                proxy.forward()  # the worker stops, and the router closes, on a live server

    assert await stored(other) == {r.message_key: 1 for r in of(other, [*before, *during])}
    rows = await change_rows(hung)
    expected = {(r.message_key, "created", 1) for r in of(hung, [*before, *during])}
    expected.add((update.message_key, "updated", 2))
    assert sorted(rows) == sorted(expected)  # one row per change: no parked record landed twice
    assert len(await change_rows(other)) == len(of(other, [*before, *during]))
