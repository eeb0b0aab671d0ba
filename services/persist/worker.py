"""persist's consumer loops: postflight into the shards, and parked records back into them.

A shard whose server is down or slow must neither stop the other shards nor lose anything. So a
batch is split by shard and the shards are written concurrently, each with a timeout; the records
of a shard that failed are *parked* on ``flightlog.persist-retry`` (acknowledged by Kafka) before
the batch's offsets are committed. The retry loop writes parked records when their backoff is
due and parks them again, with a longer backoff, while their shard is still failing. Writes are
version-guarded, so a parked record that lands after a newer one changes nothing: order does not
matter and parking is safe. A circuit breaker per shard parks records at once while the shard is
known to be failing, so the main loop does not pay a timeout per batch.

Offsets are committed only after the database commit (or the park) of every record they cover:
at-least-once, made exact by the version guard.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from prometheus_client import Counter, Histogram
from pydantic import ValidationError

from libs.dlq import dead_letter
from libs.events import PostflightRecord, decode_postflight
from libs.ids import ShardBitsMismatch, shard_of
from libs.kafka import PERSIST_RETRY
from libs.shards import ShardRouter, UnknownShard
from services.persist.writer import write_shard

__all__ = ["PersistWorker"]

logger = logging.getLogger(__name__)

H_ATTEMPT: Final = "flightlog-attempt"
H_NOT_BEFORE: Final = "flightlog-not-before"

RECORDS = Counter("flightlog_persist_records_total", "Postflight records handled", ["outcome"])
CHANGES = Counter("flightlog_persist_changes_total", "Rows written to shard change logs")
BATCH_SECONDS = Histogram("flightlog_persist_batch_seconds", "Time to write one consumed batch")
BODY_BYTES = Counter(
    "flightlog_persist_body_bytes_total", "Body bytes before and after compression", ["form"]
)


@dataclass(slots=True)
class Breaker:
    """Per-shard circuit breaker: open for ``open_s`` after a failure, then one probe."""

    open_s: float = 2.0
    _open_until: dict[int, float] = field(default_factory=dict)

    def allows(self, shard: int) -> bool:
        return time.monotonic() >= self._open_until.get(shard, 0.0)

    def failed(self, shard: int) -> None:
        self._open_until[shard] = time.monotonic() + self.open_s

    def succeeded(self, shard: int) -> None:
        self._open_until.pop(shard, None)


@dataclass(frozen=True, slots=True)
class _Item:
    record: PostflightRecord
    source: ConsumerRecord[bytes, bytes]
    attempt: int = 0


class PersistWorker:
    """Consumes ``postflight_topic`` (and ``retry_topic``) and writes into the shards.

    ``write_timeout_s`` bounds one shard's transaction; ``max_backoff_s`` caps the delay between
    retries of a parked record (it is retried forever: its shard will come back).
    """

    def __init__(
        self,
        router: ShardRouter,
        producer: AIOKafkaProducer,
        consumer: AIOKafkaConsumer,
        retry_consumer: AIOKafkaConsumer,
        *,
        retry_topic: str = PERSIST_RETRY,
        max_records: int = 2000,
        write_timeout_s: float = 10.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.router = router
        self.producer = producer
        self.consumer = consumer
        self.retry_consumer = retry_consumer
        self.retry_topic = retry_topic
        self.max_records = max_records
        self.write_timeout_s = write_timeout_s
        self.max_backoff_s = max_backoff_s
        self.breaker = Breaker()

    async def run(self, stopping: asyncio.Event) -> None:
        """Both loops until ``stopping`` is set; each finishes its batch before returning."""
        await asyncio.gather(self._main_loop(stopping), self._retry_loop(stopping))

    async def _main_loop(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            batch = await self.consumer.getmany(timeout_ms=200, max_records=self.max_records)
            records = [r for rs in batch.values() for r in rs]
            if not records:
                continue
            with BATCH_SECONDS.time():
                items = await self._decode(records, stage="persist")
                await self._write(items)
            await self.consumer.commit()

    async def _retry_loop(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            batch = await self.retry_consumer.getmany(timeout_ms=500, max_records=self.max_records)
            records = [r for rs in batch.values() for r in rs]
            if not records:
                continue
            due_at = max(_header_float(r, H_NOT_BEFORE) for r in records)
            delay = min(due_at - time.time(), self.max_backoff_s)
            if delay > 0:
                try:  # wait for the backoff, but not past a shutdown: the batch is simply re-read
                    await asyncio.wait_for(stopping.wait(), delay)
                    self._rewind(self.retry_consumer, records)
                    return
                except TimeoutError:
                    pass
            items = await self._decode(records, stage="persist-retry")
            await self._write(items, from_retry=True)
            await self.retry_consumer.commit()

    @staticmethod
    def _rewind(consumer: AIOKafkaConsumer, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        first: dict[tuple[str, int], int] = {}
        for r in records:
            first.setdefault((r.topic, r.partition), r.offset)
        for (topic, partition), offset in first.items():
            consumer.seek(TopicPartition(topic, partition), offset)

    async def _decode(self, records: Sequence[ConsumerRecord[bytes, bytes]], *, stage: str) -> list[_Item]:
        items, dead = [], []
        for r in records:
            try:
                record = decode_postflight(r.value or b"")
                shard = shard_of(record.account_id)
                self.router.shard_map.cluster_of(shard)
            except (ValidationError, ValueError, UnknownShard) as exc:
                reason = (
                    f"undecodable postflight record: {exc}" if not isinstance(exc, UnknownShard) else str(exc)
                )
                dead.append(
                    await dead_letter(
                        self.producer,
                        stage=stage,
                        reason=reason,
                        key=r.key,
                        value=r.value,
                        source=(r.topic, r.partition, r.offset),
                    )
                )
                RECORDS.labels("dead_letter").inc()
                continue
            items.append(_Item(record, r, int(_header_float(r, H_ATTEMPT))))
        if dead:
            await asyncio.gather(*dead)
        return items

    async def _write(self, items: Sequence[_Item], *, from_retry: bool = False) -> None:
        by_shard: dict[int, list[_Item]] = defaultdict(list)
        for item in items:
            by_shard[shard_of(item.record.account_id)].append(item)
        shards = list(by_shard)
        outcomes = await asyncio.gather(
            *(self._write_one(shard, by_shard[shard], probe=from_retry) for shard in shards)
        )
        parked = [
            item for shard, ok in zip(shards, outcomes, strict=True) if not ok for item in by_shard[shard]
        ]
        if parked:
            await self._park(parked)

    async def _write_one(self, shard: int, items: list[_Item], *, probe: bool) -> bool:
        if not probe and not self.breaker.allows(shard):
            return False
        try:
            result = await asyncio.wait_for(
                write_shard(self.router, shard, [i.record for i in items]), self.write_timeout_s
            )
        except ShardBitsMismatch as exc:
            # A counter without the shard's bits: refuse to write, keep the records for a retry
            # once an operator repairs it (`flightlog db migrate` re-asserts the counters).
            logger.error("shard %d refused a write: %s", shard, exc)
        except Exception as exc:
            logger.warning(
                "shard %d write failed (%s: %s); parking %d records",
                shard,
                type(exc).__name__,
                exc,
                len(items),
            )
        else:
            self.breaker.succeeded(shard)
            RECORDS.labels("written").inc(len(items))
            CHANGES.inc(result.changed)
            BODY_BYTES.labels("raw").inc(result.body_bytes_raw)
            BODY_BYTES.labels("stored").inc(result.body_bytes_stored)
            return True
        self.breaker.failed(shard)
        return False

    async def _park(self, items: Sequence[_Item]) -> None:
        futures = []
        for item in items:
            attempt = item.attempt + 1
            not_before = time.time() + min(0.5 * 2 ** (attempt - 1), self.max_backoff_s)
            futures.append(
                await self.producer.send(
                    self.retry_topic,
                    key=item.source.key,
                    value=item.source.value,
                    headers=[(H_ATTEMPT, str(attempt).encode()), (H_NOT_BEFORE, repr(not_before).encode())],
                )
            )
        await asyncio.gather(*futures)
        RECORDS.labels("parked").inc(len(items))


def _header_float(record: ConsumerRecord[bytes, bytes], name: str) -> float:
    for key, value in record.headers or ():
        if key == name:
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 0.0
