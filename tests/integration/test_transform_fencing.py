"""transform against the real Kafka: a second instance with the same transactional id fences the first.

This is what makes the Kubernetes StatefulSet (stable pod names, hence stable transactional ids)
worth having: when transform-N comes back while its predecessor is hung rather than dead, the new
producer's InitProducerId bumps the id's epoch, and the zombie's next transaction is refused by
the broker, so whatever it was about to write never becomes visible to read_committed readers,
while the successor processes everything from the committed offsets exactly once: its output
equals that of one uninterrupted worker over the same inflight topic, nothing doubled or lost.

The first instance is driven batch by batch with ``process_once`` rather than ``run``, so the
test knows which transaction is "the next one after the takeover" and needs no timing: a commit
of that transaction is a failure at once, not a missed deadline. A control test runs the same
steps with a different id for the second instance and sees that transaction commit, so the
fencing test cannot pass for a reason other than the shared id.

Every test has its own topics, consumer group and transactional id (the ``env`` pattern of
test_transform.py), so a ``make dev`` transform on the default topics does not interfere.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from libs.config import KafkaSettings
from libs.events import Event, EventType, PostflightRecord
from libs.kafka import TopicSpec, create_topics, make_consumer
from services.transform.worker import TransformStopped, TransformWorker
from tests.integration.test_transform import PARTITIONS, Env, ev, postflight, produce
from tests.scratch import group_name, topic_name

pytestmark = pytest.mark.integration

FIRST_MESSAGES = 150  # lifecycles the first instance commits before the takeover
SECOND_MESSAGES = 150  # new lifecycles after it, besides an update of every first message
WAIT_S = 90.0  # an upper bound for each condition on a busy shared machine, not a measurement


@pytest.fixture
async def env(topics: None, kafka_settings: KafkaSettings) -> Env:
    base = topic_name("fencing")
    inflight, postflight_topic, state = (f"{base}.{n}" for n in ("inflight", "postflight", "state"))
    await create_topics(
        kafka_settings,
        (
            TopicSpec(inflight, PARTITIONS),
            TopicSpec(postflight_topic, PARTITIONS),
            TopicSpec(state, PARTITIONS, {"cleanup.policy": "compact"}),
            TopicSpec(f"{postflight_topic}.reference", PARTITIONS),
            TopicSpec(f"{state}.reference", PARTITIONS, {"cleanup.policy": "compact"}),
        ),
    )
    group = group_name("fencing")
    # No dead letters are expected; dlq_start only has to be a valid offset for Env.
    return Env(kafka_settings, inflight, postflight_topic, state, group, f"{group}-transform-0", 0)


def _reference(env: Env) -> Env:
    """The same inflight topic, processed by one worker of its own: what exactly once must give.

    Records are compared with it rather than with versions computed here, because a record's
    version is the lifecycle's business (it follows the inflight offset of the event that caused
    it); for one inflight topic it is the same in every run. They are compared by each message's
    last record: which earlier records of a message went out within a later one depends on where
    the batches were cut (libs.lifecycle.coalesced), but the last one is always there, so a lost
    last record shows, and a doubled one shows as the same (key, version) twice.
    """
    return replace(
        env,
        postflight=f"{env.postflight}.reference",
        state=f"{env.state}.reference",
        group=f"{env.group}-reference",
        transactional_id=f"{env.group}-reference",
    )


def _lifecycles(first: int, count: int) -> list[Event]:
    events: list[Event] = []
    for i in range(first, first + count):
        key = f"m-{i}"
        final = EventType.DELIVERED if i % 3 else EventType.FAILED
        events += [
            ev(EventType.ACCEPTED, key, 0, content={"subject": f"s{i}", "body_text": "x" * 100}),
            ev(EventType.SENT, key, 1),
            ev(final, key, 2),
        ]
    return events


def _updates(count: int) -> list[Event]:
    """A change to every message of the first batch: the successor needs their restored states."""
    return [ev(EventType.UPDATED, f"m-{i}", 3, flags={"starred": True}) for i in range(count)]


def _seen(records: list[PostflightRecord]) -> list[tuple[str, int]]:
    return [(r.message_key, r.version) for r in records]


async def _wait(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}: {check}")
        await asyncio.sleep(0.2)


async def _process(worker: TransformWorker, events: int) -> None:
    """Commit batches of a worker driven by hand until ``events`` events are committed."""
    done = 0
    deadline = time.monotonic() + WAIT_S
    while done < events:
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {events} events, {done} committed")
        done += await worker.process_once()  # waits up to its poll timeout when there is nothing


@dataclass(frozen=True, slots=True)
class Fenced:
    error: BaseException


@dataclass(frozen=True, slots=True)
class Committed:
    events: int


async def _next_transaction(worker: TransformWorker) -> Fenced | Committed:
    """The outcome of the worker's next transaction that holds records.

    process_once returns 0 while it has nothing to do (no records yet, partitions paused for a
    restore, a batch fetched across the rebalance and dropped); that is no transaction.
    """
    deadline = time.monotonic() + WAIT_S
    retried: list[KafkaError] = []
    while time.monotonic() < deadline:
        try:
            committed = await worker.process_once()
        except ProducerFenced as exc:  # refused on AddPartitionsToTxn, Produce or TxnOffsetCommit
            return Fenced(exc)
        except TransformStopped as exc:  # refused at EndTxn: the worker cannot know the outcome
            if isinstance(exc.__cause__, ProducerFenced):
                return Fenced(exc)
            raise
        except KafkaError as exc:  # aborted and rewound by the worker; run() would retry it too
            retried.append(exc)
            continue
        if committed:
            return Committed(committed)
    raise AssertionError(f"the worker ran no transaction with records; retried after {retried!r}")


def _running(worker: TransformWorker, task: asyncio.Task[None]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        if task.done():
            task.result()  # the successor failed: show why
        return worker.ready and worker.assigned_partitions == set(range(PARTITIONS))

    return check


async def _ends(kafka: KafkaSettings, topic: str, isolation_level: str) -> dict[TopicPartition, int]:
    consumer = make_consumer(kafka, group_id=None, isolation_level=isolation_level)
    async with consumer:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        return dict(await consumer.end_offsets(tps))


def _settled(env: Env) -> Callable[[], Awaitable[bool]]:
    """No transaction open on the postflight topic: every commit's markers are written.

    The coordinator writes them after it has answered EndTxn, so a commit that returned may not
    be readable yet; once the last stable offset is the log end, it is.
    """

    async def check() -> bool:
        committed = await _ends(env.kafka, env.postflight, "read_committed")
        return committed == await _ends(env.kafka, env.postflight, "read_uncommitted")

    return check


def _last(records: set[tuple[str, int]]) -> dict[str, int]:
    """Each message's last record's version."""
    last: dict[str, int] = {}
    for key, version in records:
        last[key] = max(last.get(key, 0), version)
    return last


async def _committed_once(env: Env) -> set[tuple[str, int]]:
    seen = _seen(await postflight(env))
    doubled = sorted({s for s in seen if seen.count(s) > 1})
    assert not doubled, f"duplicated postflight records in {env.postflight}: {doubled[:5]}"
    return set(seen)


class _PostflightIs:
    """The condition that ``env``'s postflight holds ``expected``; says what is missing if not."""

    def __init__(self, env: Env, expected: set[tuple[str, int]]) -> None:
        self.env, self.expected = env, _last(expected)
        self.missing = set(self.expected)

    async def __call__(self) -> bool:
        seen = _last(await _committed_once(self.env))
        beyond = sorted(k for k, v in seen.items() if v > self.expected.get(k, 0))
        assert not beyond, f"records no single worker writes: {beyond[:5]}"
        self.missing = {k for k, v in self.expected.items() if seen.get(k) != v}
        return not self.missing

    def __str__(self) -> str:
        return f"{len(self.missing)} messages without their last record, e.g. {sorted(self.missing)[:10]}"


async def _take_over(env: Env, second_id: str) -> Fenced | Committed:
    """A commits the first batch; B joins A's group with ``second_id``; A's next transaction.

    Returns that transaction's outcome once B alone has processed everything, checked against
    one uninterrupted worker's output: nothing doubled, nothing lost.
    """
    first = _lifecycles(0, FIRST_MESSAGES)
    second = _updates(FIRST_MESSAGES) + _lifecycles(FIRST_MESSAGES, SECOND_MESSAGES)
    await produce(env, list(first))

    async with env.worker() as a:
        await _process(a, len(first))
        await _wait(_settled(env), "A's first batch to be readable")
        before = await _committed_once(env)
        assert before, "A committed no postflight record"

        async with replace(env, transactional_id=second_id).worker() as b:
            # B's start initialised its transactional id before it joined the group: with A's id,
            # A's producer is now a zombie that the broker refuses.
            stopping = asyncio.Event()
            task = asyncio.create_task(b.run(stopping), name="transform-test-successor")
            try:
                await produce(env, list(second))
                outcome = await _next_transaction(a)
                # A leaves the group: B gets A's partitions and restarts them from the committed
                # offsets, the fenced batch included.
                await a.stop()
                async with _reference(env).worker() as reference:
                    await _process(reference, len(first) + len(second))
                await _wait(_settled(_reference(env)), "the reference records to be readable")
                expected = await _committed_once(_reference(env))
                assert all(v <= _last(expected).get(k, 0) for k, v in before)

                await _wait(_running(b, task), "B to own every partition, states restored")
                await _wait(_PostflightIs(env, expected), "B to write every remaining record")
            finally:
                stopping.set()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(task, 30)
    # Nothing arrives late: whatever the fenced transaction had sent stays aborted.
    await _wait(_settled(env), "the last commit to be readable")
    assert _last(await _committed_once(env)) == _last(expected)
    return outcome


async def test_a_second_instance_with_the_same_transactional_id_fences_the_first(env: Env) -> None:
    outcome = await _take_over(env, second_id=env.transactional_id)
    assert isinstance(outcome, Fenced), (
        f"A committed {outcome} after B initialised the same transactional id: not fenced"
    )


async def test_control_a_second_instance_with_another_id_does_not_fence_the_first(env: Env) -> None:
    """Without the shared id A's next transaction commits: what the fencing test tells apart.

    This is also why the id must be stable: a successor under a new id (a Deployment pod's new
    name) leaves its predecessor free to commit.
    """
    outcome = await _take_over(env, second_id=f"{env.group}-transform-1")
    assert isinstance(outcome, Committed) and outcome.events > 0, outcome
