"""A real round trip through Kafka: produce, consume in a group, commit, resume after a restart."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from libs.config import KafkaSettings
from libs.kafka import (
    TOPICS,
    TopicMismatch,
    TopicSpec,
    create_topics,
    make_consumer,
    make_producer,
    partition_count,
)
from services.transform.worker import TransformWorker
from tests.scratch import topic_name, transform_topics

pytestmark = pytest.mark.integration


async def _consume(settings: KafkaSettings, topic: str, group: str, count: int) -> list[bytes]:
    consumer = make_consumer(settings, topic, group_id=group)
    async with consumer:
        got: list[bytes] = []
        while len(got) < count:
            batch = await consumer.getmany(timeout_ms=10_000, max_records=count - len(got))
            if not batch:
                raise AssertionError(f"only {len(got)} of {count} records arrived")
            for records in batch.values():
                got.extend(r.value for r in records if r.value is not None)
        await consumer.commit()
        # Nothing more than what was asked for is waiting.
        extra = await consumer.getmany(timeout_ms=500)
        assert not any(extra.values())
        return got


async def test_produce_consume_commit_resume(topics: None, kafka_settings: KafkaSettings) -> None:
    topic = topic_name("roundtrip")
    await create_topics(kafka_settings, (TopicSpec(topic, 3),))
    group = f"g-{topic}"

    async with make_producer(kafka_settings) as producer:
        for i in range(100):
            await producer.send(topic, f"first-{i}".encode(), key=f"k{i % 7}".encode())
        await producer.flush()
        first = await _consume(kafka_settings, topic, group, 100)
        assert sorted(first) == sorted(f"first-{i}".encode() for i in range(100))

        for i in range(50):
            await producer.send(topic, f"second-{i}".encode(), key=f"k{i % 7}".encode())
        await producer.flush()

    # A new consumer in the same group resumes at the committed offsets: only the second batch.
    second = await _consume(kafka_settings, topic, group, 50)
    assert sorted(second) == sorted(f"second-{i}".encode() for i in range(50))


async def test_order_is_kept_per_key(topics: None, kafka_settings: KafkaSettings) -> None:
    topic = topic_name("order")
    await create_topics(kafka_settings, (TopicSpec(topic, 3),))
    async with make_producer(kafka_settings) as producer:
        for i in range(60):
            await producer.send(topic, str(i).encode(), key=b"one-message")
        await producer.flush()
    got = await _consume(kafka_settings, topic, f"g-{topic}", 60)
    assert [int(v) for v in got] == list(range(60))


async def test_flightlog_topics_exist_with_their_configs(topics: None, kafka_settings: KafkaSettings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        described = {t["topic"]: t for t in await admin.describe_topics([s.name for s in TOPICS])}
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, s.name) for s in TOPICS]
        )
    finally:
        await admin.close()
    configs: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.to_object()["resources"]:
            entries = resource["config_entries"]
            configs[resource["resource_name"]] = {e["config_names"]: e["config_value"] for e in entries}
    for spec in TOPICS:
        assert spec.name in described, spec.name
        assert len(described[spec.name]["partitions"]) == spec.partitions
        assert spec.config, f"{spec.name} has no config of its own to check"
        wanted = dict(spec.config)
        assert {k: configs[spec.name].get(k) for k in wanted} == wanted, spec.name
    # Creating again changes nothing.
    assert await create_topics(kafka_settings) == []


async def test_transactions_hide_aborted_records(topics: None, kafka_settings: KafkaSettings) -> None:
    topic = topic_name("txn")
    await create_topics(kafka_settings, (TopicSpec(topic, 1),))
    producer = make_producer(kafka_settings, transactional_id=f"txn-{topic}")
    async with producer:
        async with producer.transaction():
            await producer.send(topic, b"committed")
        await producer.begin_transaction()
        await producer.send(topic, b"aborted")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(topic, b"committed-2")
    consumer = make_consumer(kafka_settings, group_id=None)
    async with consumer:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got: list[bytes] = []
        while len(got) < 2:
            batch = await consumer.getmany(tp, timeout_ms=10_000)
            assert batch, got
            got.extend(r.value for r in batch[tp] if r.value is not None)
    assert got == [b"committed", b"committed-2"]


async def test_an_existing_topic_that_differs_is_reported_and_left_alone(
    topics: None, kafka_settings: KafkaSettings
) -> None:
    first, second = topic_name("differs"), topic_name("same")
    await create_topics(kafka_settings, (TopicSpec(first, 2), TopicSpec(second, 1)))
    with pytest.raises(TopicMismatch, match=rf"{first} has 2 partitions, the settings ask 3") as raised:
        await create_topics(kafka_settings, (TopicSpec(first, 3), TopicSpec(second, 1)))
    assert second not in str(raised.value)
    assert await partition_count(kafka_settings, first) == 2


async def test_the_settings_are_checked_against_the_stack_topics(
    topics: None, kafka_settings: KafkaSettings
) -> None:
    """A production-sized setting against the local stack's 6-partition topics is refused, naming
    inflight and the changelog, before anything changes."""
    asking = kafka_settings.model_copy(update={"kafka_inflight_partitions": 48})
    with pytest.raises(TopicMismatch) as raised:
        await create_topics(asking)
    message = str(raised.value)
    assert "flightlog.inflight has 6 partitions, the settings ask 48" in message
    assert "flightlog.transform-state has 6 partitions, the settings ask 48" in message
    assert "flightlog.postflight" not in message
    assert await partition_count(kafka_settings, "flightlog.inflight") == 6


async def test_transform_refuses_a_changelog_that_does_not_match_inflight(
    topics: None, kafka_settings: KafkaSettings
) -> None:
    inflight, postflight, state = await transform_topics(kafka_settings, "mismatch", 3, state_partitions=2)
    base = inflight.removesuffix(".inflight")
    worker = TransformWorker(
        kafka_settings,
        transactional_id=f"{base}-txn",
        group_id=f"{base}-group",
        inflight_topic=inflight,
        postflight_topic=postflight,
        state_topic=state,
    )
    with pytest.raises(TopicMismatch, match=rf"{state} has 2 partitions but {inflight} has 3"):
        await worker.start()
    await worker.stop()
