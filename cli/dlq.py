"""``flightlog dlq``: read the dead-letter topic and replay entries to where they came from.

The Kafka work is in plain async functions (:func:`read_dead_letters`, :func:`replay`) that the
tests call directly; the typer commands only parse options and print.

A replay re-produces the original key and value, byte for byte, to the source topic named in the
entry's headers. Entries from ingest have no source topic: they were HTTP items, never on Kafka.
Such an entry goes to ``flightlog.inflight`` only if it now makes a valid event (normalised the
way ingest does it) for an account that exists; otherwise the reason is reported and nothing is
produced.

Ownership: an entry is replayed only for an account its application owns. The application is the
one recorded with the entry (ingest records the poster's), else the owner of the account the
entry names (transform and persist record the account of the record's key, which ingest checked
before the record reached Kafka). An entry whose event names an account of another application
(a tenant's refused item naming someone else's account), an ingest entry without a recorded
application (written before the header existed), and an entry that names no account are not
replayed; each is reported with the reason. ``--application N`` scopes ``list`` and ``replay`` to
the entries of one application.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Final

import orjson
import typer
from aiokafka import TopicPartition
from pydantic import ValidationError

from libs.accounts import AccountDirectory
from libs.config import DatabaseSettings, KafkaSettings
from libs.dlq import DeadLetter, account_in_key, account_named, parse_dead_letter
from libs.events import encode, message_key_bytes
from libs.kafka import DLQ, INFLIGHT, make_admin, make_consumer, make_producer
from libs.shards import ShardRouter
from services.ingest.constants import STAGE as INGEST_STAGE
from services.ingest.validation import normalise_item

__all__ = ["Owners", "Replayed", "dlq_app", "read_dead_letters", "replay", "topic_partitions"]

PREVIEW_BYTES: Final = 120
_IDLE_POLL_MS: Final = 1000
_MAX_IDLE_POLLS: Final = 5  # positions short of the end with nothing arriving: give up

dlq_app = typer.Typer(help="The dead-letter topic: list and replay entries.", no_args_is_help=True)


@dataclass(frozen=True, slots=True)
class Replayed:
    """What became of one DLQ entry: where it went (topic, partition, offset) or why it did not."""

    dlq_offset: int
    stage: str
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    skipped: str | None = None


async def topic_partitions(settings: KafkaSettings, topic: str) -> list[TopicPartition]:
    admin = make_admin(settings)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if described.get("error_code") or not described.get("partitions"):
        raise LookupError(f"topic {topic} does not exist")
    return sorted(TopicPartition(topic, p["partition"]) for p in described["partitions"])


async def read_dead_letters(
    settings: KafkaSettings,
    *,
    stage: str | None = None,
    offsets: Iterable[int] | None = None,
    limit: int | None = None,
    topic: str = DLQ,
) -> list[DeadLetter]:
    """The DLQ entries present now (up to the end offsets read at the start), oldest first.

    ``limit`` keeps the newest ``limit`` entries that match ``stage`` and ``offsets``.
    """
    wanted = set(offsets) if offsets is not None else None
    found: deque[DeadLetter] = deque(maxlen=limit)
    async with make_consumer(settings, group_id=None) as consumer:
        tps = await topic_partitions(settings, topic)
        consumer.assign(tps)
        await asyncio.sleep(0)  # aiokafka's group-less coordinator must start before stop() cancels it
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        idle_polls = 0
        while idle_polls < _MAX_IDLE_POLLS:
            pending = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
            if not pending:
                break
            batch = await consumer.getmany(*pending, timeout_ms=_IDLE_POLL_MS)
            idle_polls = 0 if any(batch.values()) else idle_polls + 1
            for tp, records in batch.items():
                for rec in records:
                    if rec.offset >= ends[tp]:
                        continue
                    entry = parse_dead_letter(rec.key, rec.value, list(rec.headers), rec.offset)
                    if (stage is None or entry.stage == stage) and (wanted is None or rec.offset in wanted):
                        found.append(entry)
    return list(found)


class Owners:
    """Who owns what, for the entries of one command: a shard router opened on first use."""

    def __init__(self, db: DatabaseSettings | None) -> None:
        self._db = db
        self._router: ShardRouter | None = None
        self._directory: AccountDirectory | None = None

    async def directory(self) -> AccountDirectory:
        if self._directory is None:
            self._router = ShardRouter(self._db or DatabaseSettings())
            await self._router.start()
            self._directory = AccountDirectory(self._router)
        return self._directory

    async def close(self) -> None:
        if self._router is not None:
            await self._router.stop()

    async def application_of(self, entry: DeadLetter) -> int | None:
        """The recorded application, else the owner of the recorded account, else the owner of
        the account the entry names."""
        if entry.application_id is not None:
            return entry.application_id
        account_id = entry.account_id if entry.account_id is not None else named_account(entry)
        if account_id is None:
            return None
        account = await (await self.directory()).account(account_id)
        return None if account is None else account.application_id

    async def refusal(self, entry: DeadLetter, account_id: int | None) -> str | None:
        """Why ``entry`` must not be put back for ``account_id``; None when it may."""
        if account_id is None:
            return "the entry names no account; its owner cannot be checked"
        if entry.account_id is not None and entry.account_id != account_id:
            return f"the entry names account {account_id} but was recorded for account {entry.account_id}"
        if entry.application_id is None and entry.stage == INGEST_STAGE:
            return "no application recorded with the entry; its owner cannot be checked"
        account = await (await self.directory()).account(account_id)
        if account is None:
            return f"account {account_id} not found"
        if entry.application_id is not None and account.application_id != entry.application_id:
            return (
                f"account {account_id} does not belong to application {entry.application_id},"
                " which posted the entry"
            )
        return None


def named_account(entry: DeadLetter) -> int | None:
    """The account a replay would put the entry back for: the ``account_id`` in its value (what
    the stage reads), else the account of its key, else the one recorded with it."""
    named = None
    if entry.value is not None and entry.value[:1] == b"{":
        try:
            named = account_named(orjson.loads(entry.value))
        except orjson.JSONDecodeError:
            pass
    if named is None:
        named = account_in_key(entry.key)
    return named if named is not None else entry.account_id


async def _ingest_entry_as_event(entry: DeadLetter, owners: Owners) -> tuple[bytes, bytes] | str:
    """The (key, value) an ingest entry makes now, or why it still cannot go to inflight."""
    if entry.value is None:
        return "the entry has no value"
    try:
        event = normalise_item(orjson.loads(entry.value), datetime.now(UTC))
    except orjson.JSONDecodeError as exc:
        return f"not JSON: {exc}"
    except ValidationError as exc:
        return "still not a valid event: " + "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(item)'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
    except ValueError as exc:
        return f"still not a valid event: {exc}"
    refused = await owners.refusal(entry, event.account_id)
    if refused is not None:
        return refused
    return message_key_bytes(event.account_id, event.message_key), encode(event)


async def entries_of(
    kafka: KafkaSettings,
    owners: Owners,
    *,
    stage: str | None = None,
    offsets: Iterable[int] | None = None,
    application: int | None = None,
    limit: int | None = None,
    topic: str = DLQ,
) -> list[DeadLetter]:
    """:func:`read_dead_letters`, then only the entries of ``application`` when one is given."""
    if application is None:
        return await read_dead_letters(kafka, stage=stage, offsets=offsets, limit=limit, topic=topic)
    entries = await read_dead_letters(kafka, stage=stage, offsets=offsets, topic=topic)
    mine = [e for e in entries if await owners.application_of(e) == application]
    return mine[-limit:] if limit is not None else mine


async def replay(
    kafka: KafkaSettings,
    db: DatabaseSettings | None = None,
    *,
    offsets: Iterable[int] | None = None,
    stage: str | None = None,
    application: int | None = None,
    topic: str = DLQ,
) -> list[Replayed]:
    """Replay the chosen entries (``offsets``, or every entry when None; only ``application``'s
    when given), oldest first; an entry whose owner does not check out is reported, not replayed."""
    owners = Owners(db)
    results: list[Replayed] = []
    try:
        entries = await entries_of(
            kafka, owners, stage=stage, offsets=offsets, application=application, topic=topic
        )
        async with make_producer(kafka) as producer:
            for entry in entries:
                assert entry.dlq_offset is not None
                if entry.source_topic is not None:
                    refused = await owners.refusal(entry, named_account(entry))
                    if refused is not None:
                        results.append(Replayed(entry.dlq_offset, entry.stage, skipped=refused))
                        continue
                    target, key, value = entry.source_topic, entry.key, entry.value
                elif entry.stage == INGEST_STAGE:
                    made = await _ingest_entry_as_event(entry, owners)
                    if isinstance(made, str):
                        results.append(Replayed(entry.dlq_offset, entry.stage, skipped=made))
                        continue
                    target, (key, value) = INFLIGHT, made
                else:
                    results.append(
                        Replayed(entry.dlq_offset, entry.stage, skipped="no source topic recorded")
                    )
                    continue
                meta = await (await producer.send(target, value=value, key=key))
                results.append(Replayed(entry.dlq_offset, entry.stage, target, meta.partition, meta.offset))
    finally:
        await owners.close()
    return results


def _preview(value: bytes | None) -> str:
    if value is None:
        return "(no value)"
    text = value[:PREVIEW_BYTES].decode(errors="replace")
    return text + ("..." if len(value) > PREVIEW_BYTES else "")


def format_entry(entry: DeadLetter) -> str:
    source = (
        f"{entry.source_topic}[{entry.source_partition}]@{entry.source_offset}"
        if entry.source_topic is not None
        else "-"
    )
    owner = (
        f"application {entry.application_id if entry.application_id is not None else '-'}"
        f"  account {entry.account_id if entry.account_id is not None else '-'}"
    )
    return (
        f"{entry.dlq_offset:>8}  {entry.stage:<10} {entry.failed_at or '-'}  {source}  {owner}\n"
        f"          reason: {entry.reason}\n"
        f"          value:  {_preview(entry.value)}"
    )


def format_replayed(r: Replayed) -> str:
    if r.skipped is not None:
        return f"{r.dlq_offset:>8}  {r.stage:<10} not replayed: {r.skipped}"
    return f"{r.dlq_offset:>8}  {r.stage:<10} replayed to {r.topic}[{r.partition}]@{r.offset}"


@dlq_app.command("list")
def list_command(
    limit: Annotated[int, typer.Option(min=1, help="Show the newest N matching entries.")] = 50,
    stage: Annotated[str | None, typer.Option(help="Only entries from this stage.")] = None,
    application: Annotated[int | None, typer.Option(min=1, help="Only this application's entries.")] = None,
) -> None:
    """Entries of flightlog.dlq: offset, stage, when, source position, application and account,
    reason, start of the value."""

    async def listed() -> list[DeadLetter]:
        owners = Owners(DatabaseSettings())
        try:
            return await entries_of(
                KafkaSettings(), owners, stage=stage, application=application, limit=limit
            )
        finally:
            await owners.close()

    entries = asyncio.run(listed())
    for entry in entries:
        typer.echo(format_entry(entry))
    typer.echo(f"{len(entries)} entries")


@dlq_app.command("replay")
def replay_command(
    offset: Annotated[list[int] | None, typer.Option(help="A DLQ offset to replay; repeat.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Replay every entry (with --stage: of it).")] = False,
    stage: Annotated[str | None, typer.Option(help="Only entries from this stage.")] = None,
    application: Annotated[
        int | None, typer.Option(min=1, help="Only this application's entries (with --all: all of them).")
    ] = None,
) -> None:
    """Re-produce entries' original key and value to their source topic, each only for an
    account its application owns (entries that fail the check are reported, not replayed)."""
    if bool(offset) == all_:
        raise typer.BadParameter("give either --offset (one or more) or --all")
    results = asyncio.run(
        replay(KafkaSettings(), DatabaseSettings(), offsets=offset, stage=stage, application=application)
    )
    for r in results:
        typer.echo(format_replayed(r))
    if offset:
        missing = sorted(set(offset) - {r.dlq_offset for r in results})
        for o in missing:
            scope = (f" in stage {stage}" if stage else "") + (
                f" of application {application}" if application else ""
            )
            typer.echo(f"{o:>8}  no such entry{scope}")
    done = sum(r.skipped is None for r in results)
    typer.echo(f"{done} replayed, {len(results) - done} not replayed")
    if len(results) - done:
        raise typer.Exit(1)
