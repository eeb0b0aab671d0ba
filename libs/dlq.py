"""The dead-letter topic: what a stage cannot process goes here with the original bytes and why.

A DLQ record keeps the original key and value untouched; the stage, reason and source position
travel in headers, so a replay can put the exact bytes back where they came from.

Whose record it is travels in headers too: the application, where the stage knows it (ingest: the
application of the API key that posted the refused item), and the account the record names
(ingest: the item's ``account_id``; transform and persist: the account in the record's key, which
ingest checked before the record reached Kafka). ``flightlog dlq replay`` puts a record back
only for an account its application owns (``cli.dlq``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata

from libs.kafka import DLQ

__all__ = ["DeadLetter", "account_in_key", "account_named", "dead_letter", "parse_dead_letter"]

MAX_REASON_BYTES: Final = 2048

H_STAGE: Final = "flightlog-stage"
H_REASON: Final = "flightlog-reason"
H_TOPIC: Final = "flightlog-source-topic"
H_PARTITION: Final = "flightlog-source-partition"
H_OFFSET: Final = "flightlog-source-offset"
H_FAILED_AT: Final = "flightlog-failed-at"
H_APPLICATION: Final = "flightlog-application"
H_ACCOUNT: Final = "flightlog-account"
_MAX_ID: Final = 2**63  # ids are BIGINT; anything longer is not one of ours


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
    application_id: int | None = None
    account_id: int | None = None


def _id(value: Any) -> int | None:
    """A positive id from an int or a decimal string (as our JSON carries ids), else None."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _MAX_ID:
        return value
    return None


def account_in_key(key: bytes | None) -> int | None:
    """The account of a message's Kafka key (``<account id>:<message key>``), None if it names none."""
    if key is None:
        return None
    head, sep, _ = key[:24].partition(b":")
    return _id(head) if sep else None


def account_named(doc: Any) -> int | None:
    """The ``account_id`` of a JSON object (an event, an item, a postflight record), else None."""
    return _id(doc.get("account_id")) if isinstance(doc, dict) else None


async def dead_letter(
    producer: AIOKafkaProducer,
    *,
    stage: str,
    reason: str,
    key: bytes | None,
    value: bytes | None,
    source: tuple[str, int, int] | None = None,
    application_id: int | None = None,
    account_id: int | None = None,
) -> asyncio.Future[RecordMetadata]:
    """Queue one record for the DLQ (inside the producer's transaction, if one is open), with the
    application and the account it belongs to where the stage knows them."""
    headers = [
        (H_STAGE, stage.encode()),
        (H_REASON, reason.encode()[:MAX_REASON_BYTES]),
        (H_FAILED_AT, datetime.now(UTC).isoformat().encode()),
    ]
    if application_id is not None:
        headers.append((H_APPLICATION, str(application_id).encode()))
    if account_id is not None:
        headers.append((H_ACCOUNT, str(account_id).encode()))
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
        application_id=_id(h.get(H_APPLICATION)),
        account_id=_id(h.get(H_ACCOUNT)),
    )
