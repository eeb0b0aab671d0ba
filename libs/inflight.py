"""Putting lifecycle events on ``flightlog.inflight``: the one way every producer of them does it.

Three places produce events (ingest's POST /v1/events, IMAP sync, the gateway's PATCH and DELETE
of a message) and all three need the same things: the message key as the Kafka key (so one
message's events stay in one partition, in order, for the transform), and an answer only once
Kafka has acknowledged every event (the producers are idempotent with ``acks=all``).

Records go out through aiokafka's batch API: one batch per partition per call, and one future
per batch, where :meth:`~aiokafka.AIOKafkaProducer.send` costs a partitioner call (pure-Python
murmur2), a future and its result per record. The partition is the one Kafka's default
partitioner gives the key (:func:`partition_for`), as ``send`` would choose it: the
transform's state of partition N is that of inflight partition N, so the mapping must not move.
:func:`partition_for` is the one place the project computes a key's partition (transform's
postflight and changelog records and the change relay use it too).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Final

import murmurhash2
from aiokafka import AIOKafkaProducer

from libs.events import Event, encode, message_key_bytes
from libs.kafka import INFLIGHT

__all__ = [
    "Record",
    "forget",
    "inflight_record",
    "partition_for",
    "publish_inflight",
    "publish_records",
]

Record = tuple[bytes, bytes]  # (Kafka key, value) of one inflight record


# Kafka's murmur2 seed (the Java client's Utils.murmur2, aiokafka's partitioner.murmur2).
MURMUR2_SEED: Final = 0x9747B28C


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (aiokafka's ``DefaultPartitioner``, the Java
    client's) gives ``key`` among ``partitions`` partitions numbered from 0.

    MurmurHash2 in C (the murmurhash2 package): 0.3 us a key where aiokafka's pure-Python murmur2
    took 11 us, which was 7 % of ingest's CPU behind an LRU cache of key hashes. The unit tests
    hold it to aiokafka's partitioner on every tail length and random keys."""
    return (murmurhash2.murmurhash2(key, MURMUR2_SEED) & 0x7FFFFFFF) % partitions


_SLOTS: Final[weakref.WeakKeyDictionary[AIOKafkaProducer, dict[tuple[str, int], asyncio.Lock]]] = (
    weakref.WeakKeyDictionary()
)


def _queue_slot(producer: AIOKafkaProducer, topic: str, partition: int) -> asyncio.Lock:
    """The right to queue batches for a partition on ``producer``, first come first served.

    aiokafka queues one batch per partition: ``send_batch`` waits until the queued one leaves
    with a request, and every caller waiting for that wakes up, one gets the slot and the rest
    wait again, each wait taking the whole time waited so far off the deadline
    (``MessageAccumulator.add_batch``, aiokafka 0.14): concurrent requests time out at once.
    Behind this lock only one caller at a time waits for the slot, once per batch.
    """
    slots = _SLOTS.get(producer)
    if slots is None:
        slots = _SLOTS[producer] = {}
    lock = slots.get((topic, partition))
    if lock is None:
        lock = slots[topic, partition] = asyncio.Lock()
    return lock


def forget(futures: Iterable[asyncio.Future[Any]]) -> None:
    """Collect the outcomes nobody waits for any more, so none is logged as never retrieved."""
    for fut in futures:
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())


async def publish_records(
    producer: AIOKafkaProducer,
    records: Sequence[Record],
    *,
    timeout_s: float | None = None,
    topic: str = INFLIGHT,
) -> None:
    """Send ``records`` (key, value) and return once Kafka has acknowledged every one of them.

    Records of one partition keep their order; the partition is the one ``send`` would choose.
    Raises :class:`aiokafka.errors.KafkaError`, or :class:`TimeoutError` after ``timeout_s``
    (None: wait as long as the producer does). Either way some records may have been written:
    each event carries its event id, and the transform drops an id it has seen, so sending the
    same events again is safe.
    """
    futures: list[asyncio.Future[Any]] = []
    try:
        # The sends are inside the deadline too: a batch waits while its partition's last one is
        # still in the producer's queue.
        async with asyncio.timeout(timeout_s):
            partitions = sorted(await producer.partitions_for(topic))
            count = len(partitions)
            by_partition: dict[int, list[Record]] = {}
            for record in records:
                by_partition.setdefault(partitions[partition_for(record[0], count)], []).append(record)
            for partition, of_partition in by_partition.items():
                async with _queue_slot(producer, topic, partition):
                    batch = producer.create_batch()
                    for key, value in of_partition:
                        # None: the batch is full (never for the first record of a batch).
                        while batch.append(key=key, value=value, timestamp=None) is None:
                            futures.append(await producer.send_batch(batch, topic, partition=partition))
                            batch = producer.create_batch()
                    # Closed, the batch goes with the producer's next request instead of lingering
                    # for records no one else will add.
                    batch.close()
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
            await asyncio.gather(*futures)
    except BaseException:
        forget(futures)
        raise


def inflight_record(event: Event) -> Record:
    """The (key, value) that puts ``event`` on inflight."""
    return message_key_bytes(event.account_id, event.message_key), encode(event)


async def publish_inflight(
    producer: AIOKafkaProducer, events: Iterable[Event], *, timeout_s: float | None = None
) -> None:
    """Send ``events`` in order (:func:`publish_records`) and return once Kafka has acknowledged
    every one of them."""
    await publish_records(producer, [inflight_record(e) for e in events], timeout_s=timeout_s)
