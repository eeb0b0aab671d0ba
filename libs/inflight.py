"""Putting lifecycle events on ``flightlog.inflight``: the one way every producer of them does it.

Three places produce events (ingest's POST /v1/events, IMAP sync, the gateway's PATCH and DELETE
of a message) and all three need the same things: the message key as the Kafka key (so one
message's events stay in one partition, in order, for the transform), and an answer only once
Kafka has acknowledged every event (the producers are idempotent with ``acks=all``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer

from libs.events import Event, encode, message_key_bytes
from libs.kafka import INFLIGHT

__all__ = ["forget", "publish_inflight"]


def forget(futures: Iterable[asyncio.Future[Any]]) -> None:
    """Collect the outcomes nobody waits for any more, so none is logged as never retrieved."""
    for fut in futures:
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())


async def publish_inflight(
    producer: AIOKafkaProducer, events: Iterable[Event], *, timeout_s: float | None = None
) -> None:
    """Send ``events`` in order and return once Kafka has acknowledged every one of them.

    Raises :class:`aiokafka.errors.KafkaError`, or :class:`TimeoutError` after ``timeout_s``
    (None: wait as long as the producer does). Either way some events may have been written:
    each carries its event id, and the transform drops an id it has seen, so sending the same
    events again is safe.
    """
    futures: list[asyncio.Future[Any]] = []
    try:
        # The sends are inside the deadline too: a send waits when the producer's buffer is full.
        async with asyncio.timeout(timeout_s):
            for event in events:
                key = message_key_bytes(event.account_id, event.message_key)
                futures.append(await producer.send(INFLIGHT, encode(event), key=key))
            await asyncio.gather(*futures)
    except BaseException:
        forget(futures)
        raise
