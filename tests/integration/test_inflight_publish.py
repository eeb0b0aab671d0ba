"""libs.inflight.publish_records against a real broker: its batches land each record where
``producer.send`` puts the same key, in order, from many callers at once."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition

from libs.config import KafkaSettings
from libs.inflight import publish_records
from libs.kafka import TopicSpec, create_topics, make_consumer, make_producer
from tests.scratch import topic_name

pytestmark = pytest.mark.integration

PARTITIONS = 6  # flightlog.inflight's


async def _read_all(settings: KafkaSettings, topic: str, count: int) -> dict[int, list[tuple[bytes, bytes]]]:
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    out: dict[int, list[tuple[bytes, bytes]]] = {}
    async with make_consumer(settings, group_id=None) as consumer:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        got = 0
        while got < count:
            batch = await consumer.getmany(timeout_ms=10_000)
            assert batch, f"only {got} of {count} records arrived"
            for tp, records in batch.items():
                for r in records:
                    assert r.key is not None and r.value is not None
                    out.setdefault(tp.partition, []).append((r.key, r.value))
                    got += 1
    return out


async def test_batches_land_where_send_puts_the_key_in_order(
    topics: None, kafka_settings: KafkaSettings
) -> None:
    topic = topic_name("publish")
    await create_topics(kafka_settings, (TopicSpec(topic, PARTITIONS),))
    keys = [f"{(3 << 48) + a}:msg-{m}".encode() for a in range(7) for m in range(40)]
    calls = [[(k, b"batch-%d-%d" % (c, i)) for i, k in enumerate(keys[c::5])] for c in range(5)]
    async with make_producer(kafka_settings) as producer:
        await asyncio.gather(*(publish_records(producer, call, topic=topic, timeout_s=30) for call in calls))
        sent = [await producer.send(topic, b"send-" + k, key=k) for k in keys]
        await asyncio.gather(*sent)
    placed = await _read_all(kafka_settings, topic, 2 * len(keys))
    partition_of_key = {k: p for p, records in placed.items() for k, v in records if v.startswith(b"send-")}
    assert len(partition_of_key) == len(keys)
    for partition, records in placed.items():
        for key, _ in records:
            assert partition_of_key[key] == partition, key
    for call in calls:  # each caller's records keep their order on their partition
        for partition, records in placed.items():
            mine = [r for r in records if r in set(call)]
            assert mine == [r for r in call if partition_of_key[r[0]] == partition]
