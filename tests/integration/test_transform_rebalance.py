"""transform against the real Kafka: partitions move between two running instances with their states.

Worker A owns every partition and makes a batch of messages final. Worker B then joins the same
group (its own transactional id, as a second pod would have): the group rebalances, and B must
rebuild from the changelog the states of the partitions it takes over before it reads them. So a
duplicate final event is recognised by whichever worker owns its message (no second final
record), and a later update gets a record with a higher version, on both sides of the split.

Every test has its own topics, consumer group and transactional ids (``make_env`` of
test_transform.py), so a ``make dev`` transform on the default topics does not interfere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from libs.config import KafkaSettings
from libs.events import EventType, Status, message_key_bytes
from services.transform.worker import TransformWorker
from tests.integration.test_transform import (
    ACCOUNT,
    PARTITIONS,
    Env,
    by_message,
    ev,
    make_env,
    postflight,
    produce,
    read_all,
)
from tests.polling import eventually

pytestmark = pytest.mark.integration

MESSAGES = 12  # enough for every partition to hold some, whichever way the keys hash
WAIT_S = 60.0  # an upper bound for each condition on a busy shared machine, not a measurement


@pytest.fixture
async def env(topics: None, kafka_settings: KafkaSettings) -> Env:
    return await make_env(kafka_settings, "rebalance")


@contextlib.asynccontextmanager
async def running(worker: TransformWorker) -> AsyncIterator[asyncio.Task[None]]:
    """``worker`` running in the background; the caller waits for the assignment it expects."""
    stopping = asyncio.Event()
    async with worker:
        task = asyncio.create_task(worker.run(stopping), name=f"transform-{worker.transactional_id}")
        try:
            yield task
        finally:
            stopping.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 30)


def _split(
    a: TransformWorker, a_task: asyncio.Task[None], b: TransformWorker, b_task: asyncio.Task[None]
) -> Callable[[], Awaitable[bool]]:
    """Both ready, each owning some partitions, between them every partition once."""

    async def check() -> bool:
        for task in (a_task, b_task):
            if task.done():
                task.result()
        owned_a, owned_b = a.assigned_partitions, b.assigned_partitions
        return (
            a.ready
            and b.ready
            and bool(owned_a)
            and bool(owned_b)
            and not owned_a & owned_b
            and owned_a | owned_b == set(range(PARTITIONS))
        )

    return check


def _committed_to_end(env: Env) -> Callable[[], Awaitable[bool]]:
    """The group's committed inflight offsets reach the topic's end: outputs commit in the
    transaction of those offsets, so nothing more can follow from the events produced so far."""

    async def check() -> bool:
        ends = {tp: 0 for tp in (TopicPartition(env.inflight, p) for p in range(PARTITIONS))}
        for record in await read_all(env.kafka, env.inflight, PARTITIONS):
            tp = TopicPartition(env.inflight, record.partition)
            ends[tp] = max(ends[tp], record.offset + 1)
        admin = AIOKafkaAdminClient(bootstrap_servers=env.kafka.kafka_bootstrap_servers)
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(env.group)
        finally:
            await admin.close()
        return all(end == 0 or (tp in committed and committed[tp].offset >= end) for tp, end in ends.items())

    return check


def _records(env: Env, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        got = len(await postflight(env))
        assert got <= n, f"{got} postflight records, expected {n}"
        return got == n

    return check


async def test_partitions_move_with_their_states_to_a_second_instance(env: Env) -> None:
    keys = [f"m{i}" for i in range(MESSAGES)]
    await produce(
        env, [e for k in keys for e in (ev(EventType.ACCEPTED, k, 0), ev(EventType.DELIVERED, k, 1))]
    )
    a = env.worker(transactional_id=f"{env.transactional_id}-a")
    b = env.worker(transactional_id=f"{env.transactional_id}-b")
    async with running(a) as a_task:

        async def a_owns_all() -> bool:
            if a_task.done():
                a_task.result()
            return a.ready and a.assigned_partitions == set(range(PARTITIONS))

        await eventually(a_owns_all, WAIT_S, "worker A to own every partition")
        await eventually(_records(env, MESSAGES), WAIT_S, f"{MESSAGES} final records from A")
        await eventually(_committed_to_end(env), WAIT_S, "A's batches committed")
        finals = {r.message_key: r for r in await postflight(env)}
        assert all(r.message.status is Status.DELIVERED for r in finals.values())

        async with running(b) as b_task:
            await eventually(_split(a, a_task, b, b_task), WAIT_S, "the partitions split between A and B")
            partition_of = {
                r.key: r.partition for r in await read_all(env.kafka, env.inflight, PARTITIONS) if r.key
            }
            moved = [k for k in keys if partition_of[message_key_bytes(ACCOUNT, k)] in b.assigned_partitions]
            kept = [k for k in keys if k not in moved]
            assert moved and kept, (moved, kept)
            for owner, own in ((b, moved), (a, kept)):
                for k in own:
                    state = owner.state_of(ACCOUNT, k)
                    assert state is not None and state.final, (owner.transactional_id, k, state)
                    assert state.version == finals[k].version, (k, state.version, finals[k].version)
            for k in moved:
                assert a.state_of(ACCOUNT, k) is None, f"A still holds the state of {k}, moved to B"

            await produce(
                env,
                [
                    e
                    for k in keys
                    for e in (
                        ev(EventType.DELIVERED, k, 2),  # the same final again: a duplicate
                        ev(EventType.UPDATED, k, 3, flags={"unread": True}),
                    )
                ],
            )
            await eventually(_records(env, 2 * MESSAGES), WAIT_S, "one update record per message")
            await eventually(_committed_to_end(env), WAIT_S, "the duplicates and updates committed")

    records = by_message(await postflight(env))
    assert sorted(records) == sorted(keys)
    for k in keys:
        assert len(records[k]) == 2, (k, records[k])  # a second final record: the duplicate got through
        final, update = records[k]
        assert final == finals[k], k
        assert update.version > final.version and update.message.unread is True, (k, update)
        assert update.message.status is Status.DELIVERED and update.patch is None, (k, update)
