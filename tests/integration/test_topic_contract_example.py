"""examples/postflight_consumer.py against the stack's Kafka: it reads postflight records that
transform's own code made from a scratch topic, ignores a field it does not know, and stops
without committing on a schema_version it does not know (docs/topics.md, "Compatibility")."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from libs.config import KafkaSettings
from libs.events import Event, EventType, encode
from libs.kafka import TopicSpec, create_topics, make_producer
from libs.lifecycle import MessageState, apply
from tests.scratch import group_name, topic_name

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "postflight_consumer.py"
ACCOUNT = 1 << 48 | 11
RUN_TIMEOUT_S = 90.0


def _records(count: int) -> list[bytes]:
    """Final postflight records of ``count`` messages, made by transform's lifecycle code."""
    out = []
    for n in range(count):
        state: MessageState | None = None
        for position, kind in enumerate((EventType.ACCEPTED, EventType.DELIVERED)):
            event = Event(
                event_id=f"e-{n}-{position}",
                account_id=ACCOUNT,
                message_key=f"m-{n}",
                type=kind,
                occurred_at=datetime(2026, 11, 30, tzinfo=UTC),
            )
            outcome = apply(state, event, position=position)
            state = outcome.state
            if outcome.record is not None:
                out.append(encode(outcome.record))
    assert len(out) == count
    return out


async def _run_example(
    kafka: KafkaSettings, topic: str, group: str, max_records: int
) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--bootstrap-servers",
        kafka.kafka_bootstrap_servers,
        "--topic",
        topic,
        "--group",
        group,
        "--start",
        "earliest",
        "--max-records",
        str(max_records),
        "--idle-timeout-s",
        "15",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_example_reads_postflight_by_the_contract(
    topics: None, kafka_settings: KafkaSettings
) -> None:
    topic = topic_name("contract")
    group = group_name("contract")
    await create_topics(kafka_settings, (TopicSpec(topic, 1),))
    records = _records(3)
    # A later release may add a field within schema_version 1: the consumer must read on.
    newer = orjson.dumps(orjson.loads(records[2]) | {"added_later": {"x": 1}})
    async with make_producer(kafka_settings) as producer:
        for value in (*records[:2], newer):
            await producer.send_and_wait(topic, value, key=b"k")

    status, out, err = await _run_example(kafka_settings, topic, group, max_records=3)
    assert status == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(r["offset"], r["message_key"], r["status"]) for r in lines] == [
        (0, "m-0", "delivered"),
        (1, "m-1", "delivered"),
        (2, "m-2", "delivered"),
    ]
    assert {r["account_id"] for r in lines} == {str(ACCOUNT)}

    # A version the consumer does not know stops it before that record, every time: never skipped.
    unknown = orjson.dumps(orjson.loads(records[0]) | {"schema_version": 2})
    async with make_producer(kafka_settings) as producer:
        await producer.send_and_wait(topic, unknown, key=b"k")
        await producer.send_and_wait(topic, records[1], key=b"k")
    for _ in range(2):
        status, out, err = await _run_example(kafka_settings, topic, group, max_records=10)
        assert status == 3, (out, err)
        assert out == ""  # resumed after the committed offsets: nothing read again
        assert f"{topic}[0]@3: schema_version 2 is not one this consumer knows" in err

    # A record breaking the contract (a version must be at least 1) is treated the same way.
    second = topic_name("contract")
    await create_topics(kafka_settings, (TopicSpec(second, 1),))
    broken = orjson.dumps(orjson.loads(records[1]) | {"version": 0})
    async with make_producer(kafka_settings) as producer:
        await producer.send_and_wait(second, records[0], key=b"k")
        await producer.send_and_wait(second, broken, key=b"k")
    status, out, err = await _run_example(kafka_settings, second, group_name("contract"), max_records=10)
    assert status == 3, (out, err)
    assert [json.loads(line)["offset"] for line in out.splitlines()] == [0]
    assert f"{second}[0]@1: 1 schema error(s), first at version" in err
