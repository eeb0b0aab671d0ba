"""The dead-letter topic: what a stage cannot process goes here with the original bytes and why.

A DLQ record keeps the original key and value untouched; the stage, reason and source position
travel in headers, so a replay can put the exact bytes back where they came from.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata

from libs.kafka import DLQ

__all__ = ["DeadLetter", "dead_letter", "parse_dead_letter"]

MAX_REASON_BYTES: Final = 2048

H_STAGE: Final = "flightlog-stage"
H_REASON: Final = "flightlog-reason"
H_TOPIC: Final = "flightlog-source-topic"
H_PARTITION: Final = "flightlog-source-partition"
H_OFFSET: Final = "flightlog-source-offset"
H_FAILED_AT: Final = "flightlog-failed-at"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    stage: str
    reason: str
    key: bytes | None
    value: bytes | None
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    failed_at: str | None = None
    dlq_offset: int | None = None


async def dead_letter(
    producer: AIOKafkaProducer,
    *,
    stage: str,
    reason: str,
    key: bytes | None,
    value: bytes | None,
    source: tuple[str, int, int] | None = None,
) -> asyncio.Future[RecordMetadata]:
    """Queue one record for the DLQ (inside the producer's transaction, if one is open)."""
    headers = [
        (H_STAGE, stage.encode()),
        (H_REASON, reason.encode()[:MAX_REASON_BYTES]),
        (H_FAILED_AT, datetime.now(UTC).isoformat().encode()),
    ]
    if source is not None:
        topic, partition, offset = source
        headers += [
            (H_TOPIC, topic.encode()),
            (H_PARTITION, str(partition).encode()),
            (H_OFFSET, str(offset).encode()),
        ]
    future: asyncio.Future[RecordMetadata] = await producer.send(DLQ, value=value, key=key, headers=headers)
    return future


def parse_dead_letter(
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...],
    offset: int | None = None,
) -> DeadLetter:
    h = {k: v.decode(errors="replace") for k, v in headers}
    return DeadLetter(
        stage=h.get(H_STAGE, "unknown"),
        reason=h.get(H_REASON, ""),
        key=key,
        value=value,
        source_topic=h.get(H_TOPIC),
        source_partition=int(h[H_PARTITION]) if H_PARTITION in h else None,
        source_offset=int(h[H_OFFSET]) if H_OFFSET in h else None,
        failed_at=h.get(H_FAILED_AT),
        dlq_offset=offset,
    )
