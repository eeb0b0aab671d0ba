"""libs.inflight: the partition of a key is the one Kafka's default partitioner gives it, and
records go out in batches that keep each partition's order, however many callers send at once."""

from __future__ import annotations

import asyncio
import random

import pytest
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from cli.ingest_cpu import PARTITIONS, acknowledging_producer
from libs.events import message_key_bytes
from libs.inflight import partition_for, publish_records


def _kafkas(key: bytes, partitions: int) -> int:
    # As AIOKafkaProducer._partition calls it: every partition known, all of them available.
    known = list(set(range(partitions)))
    return int(DefaultPartitioner()(key, known, known))


def test_partition_matches_kafkas_partitioner_on_many_keys() -> None:
    rng = random.Random(16)
    keys = [rng.randbytes(rng.randrange(0, 300)) for _ in range(5_000)]
    keys += [message_key_bytes(rng.randrange(1, 2**63), f"msg-{rng.random()}") for _ in range(5_000)]
    keys += [b"", b"a", b"ab", b"abc", b"abcd", "é😀".encode()]
    for partitions in (1, 2, 3, 6, 7, 12, 64):
        for key in keys:
            assert partition_for(key, partitions) == _kafkas(key, partitions), (key, partitions)


@given(st.binary(max_size=512), st.integers(min_value=1, max_value=1000))
def test_partition_matches_kafkas_partitioner(key: bytes, partitions: int) -> None:
    assert partition_for(key, partitions) == _kafkas(key, partitions)


async def test_each_partition_keeps_its_order_across_batches() -> None:
    """Small batches force several per partition: every record arrives once, on the partition
    Kafka's partitioner gives its key, in the order sent."""
    records = [(b"key-%d" % (i % 37), b"value-%05d" % i) for i in range(2_000)]
    acked: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
    async with acknowledging_producer(acked, max_batch_size=1024) as producer:
        await publish_records(producer, records, topic="t")
    for partition, got in acked.items():
        assert got == [r for r in records if _kafkas(r[0], PARTITIONS) == partition]
    assert sum(map(len, acked.values())) == len(records)


async def test_a_record_larger_than_a_batch_goes_alone() -> None:
    big = (b"k", b"x" * 5_000)
    acked: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
    async with acknowledging_producer(acked, max_batch_size=1024) as producer:
        await publish_records(producer, [(b"k", b"small"), big, (b"k", b"after")], topic="t")
    assert acked[_kafkas(b"k", PARTITIONS)] == [(b"k", b"small"), big, (b"k", b"after")]


async def test_many_concurrent_callers_all_get_through() -> None:
    """aiokafka lets one batch per partition wait in its queue; callers queue behind one another
    instead of racing for that place until aiokafka's deadline runs out."""
    acked: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
    calls = [[(b"c%d-%d" % (c, i), b"v%d-%d" % (c, i)) for i in range(30)] for c in range(100)]
    async with acknowledging_producer(acked, round_trip_s=0.002, request_timeout_ms=1_000) as producer:
        await asyncio.gather(*(publish_records(producer, call, topic="t") for call in calls))
    assert sorted(r for got in acked.values() for r in got) == sorted(r for call in calls for r in call)
    for call in calls:  # one caller's records of one partition stay in its order
        for partition, got in acked.items():
            mine = [r for r in got if r in set(call)]
            assert mine == [r for r in call if _kafkas(r[0], PARTITIONS) == partition]


async def test_a_timeout_leaves_no_outcome_unretrieved() -> None:
    async with acknowledging_producer(round_trip_s=1.0) as producer:
        with pytest.raises(TimeoutError):
            await publish_records(producer, [(b"k", b"v")], topic="t", timeout_s=0.01)
