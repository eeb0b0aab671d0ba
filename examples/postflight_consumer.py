"""A downstream consumer of flightlog.postflight that checks every record against its contract.

Needs only aiokafka and jsonschema (``pip install aiokafka jsonschema``), not flightlog. It reads
in a consumer group of its own with ``read_committed`` (transform writes postflight in Kafka
transactions), and for each record, following docs/topics.md ("Compatibility"):

- a ``schema_version`` it does not know, or a record that fails docs/schemas/postflight.json,
  stops it with exit status 3 *without* committing that record's offset: it is never skipped, and
  the next run meets it again (fix the consumer, or set the record aside, then run again);
- fields it does not know are ignored (the schema allows them);
- a valid record is printed as one JSON line (where it was, and what it says) and its offset
  committed after the batch it came in.

::

    python examples/postflight_consumer.py --bootstrap-servers localhost:9092 --group my-reader

It stops after ``--max-records`` valid records, or when nothing arrived for ``--idle-timeout-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from jsonschema import Draft202012Validator

SCHEMA = Path(__file__).resolve().parent.parent / "docs" / "schemas" / "postflight.json"
KNOWN_VERSIONS = frozenset({1})  # the schema_version values this consumer reads
EXIT_UNREADABLE = 3


class Unreadable(Exception):
    """A record this consumer must not skip: an unknown version or a broken contract."""


def read(value: bytes | None, validator: Draft202012Validator) -> dict[str, Any]:
    """The record in ``value``, checked: version first, then the schema."""
    try:
        record = json.loads(value or b"")
    except ValueError as exc:
        raise Unreadable(f"not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise Unreadable("not a JSON object")
    version = record.get("schema_version")
    if version not in KNOWN_VERSIONS or isinstance(version, bool):
        raise Unreadable(
            f"schema_version {version!r} is not one this consumer knows {sorted(KNOWN_VERSIONS)}"
        )
    errors = sorted(validator.iter_errors(record), key=lambda e: list(e.path))
    if errors:
        where = ".".join(map(str, errors[0].path)) or "(record)"
        raise Unreadable(f"{len(errors)} schema error(s), first at {where}: {errors[0].message}")
    return record


async def consume(args: argparse.Namespace, schema: dict[str, Any]) -> int:
    validator = Draft202012Validator(schema)
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap_servers,
        group_id=args.group,
        enable_auto_commit=False,
        auto_offset_reset=args.start,
        isolation_level="read_committed",
    )
    await consumer.start()
    seen = 0
    try:
        while seen < args.max_records:
            batch = await consumer.getmany(timeout_ms=int(args.idle_timeout_s * 1000), max_records=100)
            if not batch:
                print(f"nothing arrived for {args.idle_timeout_s} s; {seen} record(s) read", file=sys.stderr)
                return 0
            done: dict[TopicPartition, OffsetAndMetadata] = {}
            try:
                for tp, messages in batch.items():
                    for message in messages:
                        if seen >= args.max_records:
                            break
                        try:
                            record = read(message.value, validator)
                        except Unreadable as exc:
                            print(f"{tp.topic}[{tp.partition}]@{message.offset}: {exc}", file=sys.stderr)
                            return EXIT_UNREADABLE
                        message_doc = record["message"]
                        line = {
                            "partition": tp.partition,
                            "offset": message.offset,
                            "account_id": record["account_id"],
                            "message_key": record["message_key"],
                            "version": record["version"],
                            "status": message_doc.get("status"),
                            "deleted": record["deleted"],
                        }
                        print(json.dumps(line), flush=True)
                        done[tp] = OffsetAndMetadata(message.offset + 1, "")
                        seen += 1
            finally:
                if done:  # what was read so far, never the record that stopped us
                    await consumer.commit(done)
        return 0
    finally:
        await consumer.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap-servers", default="localhost:9092")
    parser.add_argument("--topic", default="flightlog.postflight")
    parser.add_argument("--group", default="postflight-example", help="this consumer's own group")
    parser.add_argument(
        "--start", choices=("latest", "earliest"), default="latest", help="where a new group starts"
    )
    parser.add_argument("--schema", default=str(SCHEMA))
    parser.add_argument("--max-records", type=int, default=1000)
    parser.add_argument("--idle-timeout-s", type=float, default=30.0)
    args = parser.parse_args(argv)
    schema = json.loads(Path(args.schema).read_text())
    return asyncio.run(consume(args, schema))


if __name__ == "__main__":
    sys.exit(main())
