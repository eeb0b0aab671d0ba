"""The transform worker: inflight events through the lifecycle, exactly once, into postflight.

One batch is one Kafka transaction. It holds the changed message states (changelog topic,
partition N for inflight partition N), the postflight records, the DLQ records and the consumed
offsets, so either all of a batch's effects become visible (read_committed) or none do. The
batch is folded first and produced after, in one producer batch per topic partition
(``send_batch``): a future per partition instead of one per record, and only the last state of
each key in the batch goes to the changelog. A message's postflight records of one batch go out
as one where :func:`libs.lifecycle.coalesced` can make one of them (a message stored when sent
and delivered in the same batch: half the records for persist to decode and fold, measured at
6.4 us less of persist's CPU an event at 10,000 events/s).

The states of the assigned partitions live in memory and are rebuilt from the changelog when a
partition is assigned, in the background while the partition is paused (the rebalance listener
returns at once, so the member keeps its place in the group however long the changelog is).
A lock held from the end of ``getmany`` until the transaction ends keeps rebalances (whose
listener aiokafka awaits) out of the middle of a transaction, and a batch fetched across a
rebalance is dropped and its partitions that are still assigned are sought back to its first
record (aiokafka does not reset a partition kept across a rebalance), so it is read again.

Size: an event whose message would not fit one Kafka record (state or postflight larger than
:data:`MAX_RECORD_BYTES`, e.g. bodies parsed from raw MIME that grew in UTF-8) goes to the DLQ
and leaves the state as it was: the producer would refuse the record on every retry.

Hostile content: raw MIME is parsed in a process pool (:class:`ParsePool`) before the batch's
transaction begins, each message within a time limit; a batch whose parsing outlasts
``parse_batch_budget_s`` is cut at the first message not parsed yet, and the rest is read again.
So no message can hold the event loop (heartbeats, the transaction timeout) or its partition.

Bounded state: a final message's state holds no content (:mod:`libs.lifecycle`), and a sweep
every ``state_sweep_interval_s`` tombstones in the changelog, in a transaction of its own, the
states final for longer than ``final_state_ttl_s`` and those not final and untouched for longer
than ``pending_state_ttl_s``. Memory and the live part of the changelog are so bounded by the
rate of messages times those periods, not by every message ever seen. A later event of a
forgotten message is handled as :mod:`libs.lifecycle` says (versions from inflight offsets keep
growing, updates go out as patches persist applies to the stored row).

Errors: a Kafka error before the commit aborts the transaction, rewinds the batch's partitions
and restores the touched states, then the batch is retried after a back-off. A
:class:`aiokafka.errors.ProducerFenced` (another instance took over our transactional id), a
failed commit (its outcome is unknown) or a failed restore raise :class:`TransformStopped` or
the error itself: the worker ends, and its successor rebuilds from what Kafka committed.

Erased accounts (:mod:`libs.erasure`): the worker reads ``flightlog.erasures`` whole before it
joins its group, and again at every sweep. The states of an erased account's messages are
tombstoned in the changelog (at the sweep that learns of the erasure, and at the first sweep after a
restore that brought some back), and its records still in flight are dropped, counted as the
outcome ``erased``: not dead-lettered, which would keep what the erasure removes for the DLQ's
four weeks and offer it for replay. persist refuses them too (the account's row is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any, Final, NamedTuple

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError, ProducerFenced
from aiokafka.producer.message_accumulator import BatchBuilder
from prometheus_client import Counter, Gauge, Histogram

from libs.component import Component
from libs.config import KafkaSettings
from libs.dlq import account_in_key, dead_letter
from libs.event_structs import decode_inflight
from libs.events import Event, decode_event, json_bytes, message_key_bytes
from libs.inflight import partition_for
from libs.kafka import ERASURES, TopicMismatch, make_consumer, make_producer
from libs.lifecycle import (
    AnyEvent,
    MessageState,
    OutcomeKind,
    apply,
    coalesced,
    is_stored,
    postflight_value,
)
from services.transform.parsing import ParsePool
from services.transform.settings import TransformSettings

__all__ = ["MAX_RECORD_BYTES", "STAGE", "PartitionStates", "TransformStopped", "TransformWorker"]

logger = logging.getLogger(__name__)

STAGE: Final = "transform"
# Below the producer's max_request_size and the broker's message.max.bytes (both 1 MiB by
# default), with room for key, headers and what a flags-only event can add to a state unchecked.
MAX_RECORD_BYTES: Final = 1_000_000
# A postflight record at most this large is held until its message's next record in the batch,
# to go out with it as one (libs.lifecycle.coalesced): at most max_batch_records of them a batch.
HELD_RECORD_BYTES: Final = 64 * 1024
# A changelog record's header: "1" for a final message's state (it expires after the final TTL).
H_FINAL: Final = "flightlog-final"
MAX_EXPIRED_PER_SWEEP: Final = 20_000  # tombstones in one sweep's transaction

EVENTS = Counter("flightlog_transform_events_total", "Inflight events committed, by outcome", ["outcome"])
POSTFLIGHT_RECORDS = Counter("flightlog_transform_postflight_records_total", "Postflight records committed")
COALESCED_RECORDS = Counter(
    "flightlog_transform_postflight_coalesced_total",
    "Postflight records that went out within a later record of their message in the same transaction",
)
BATCH_SECONDS = Histogram(
    "flightlog_transform_batch_seconds",
    "From the end of the fetch to the transaction's commit",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
ABORTED = Counter("flightlog_transform_aborted_transactions_total", "Transactions aborted and retried")
RESTORE_SECONDS = Histogram("flightlog_transform_restore_seconds", "Rebuilding states from the changelog")
EXPIRED_STATES = Counter(
    "flightlog_transform_expired_states_total", "States tombstoned by the sweep", ["kind"]
)
ERASED_STATES = Counter(
    "flightlog_transform_erased_states_total", "States of erased accounts tombstoned in the changelog"
)
LIVE_STATES = Gauge("flightlog_transform_states", "Message states in memory, by kind", ["kind"])


def _retrieve_failures(sends: list[Awaitable[Any]]) -> None:
    """Mark the sends of an aborted transaction as seen: they fail with it (ProducerFenced, a
    broken connection), and asyncio would log each unread failure as a bug."""
    for send in sends:
        if isinstance(send, asyncio.Future):
            send.add_done_callback(lambda f: f.cancelled() or f.exception())


def _partition_of(key: bytes, partitions: list[int]) -> int:
    """The partition aiokafka's (and Java's) default partitioner gives ``key`` (``partitions``
    sorted)."""
    return partitions[partition_for(key, len(partitions))]


class _Outbox:
    """A transaction's records in one :class:`BatchBuilder` per topic partition, each sent with
    ``send_batch``: one future per batch instead of one per record, as ``send`` makes."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._builders: dict[tuple[str, int], BatchBuilder] = {}
        self.sends: list[Awaitable[Any]] = []

    async def add(
        self,
        topic: str,
        partition: int,
        key: bytes,
        value: bytes | None,  # None: a tombstone
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        builder = self._builders.get((topic, partition))
        if builder is None:
            builder = self._builders[(topic, partition)] = self._producer.create_batch()
        if builder.append(timestamp=None, key=key, value=value, headers=headers or []) is None:
            # full: send it and start another, which takes any one record
            await self._send(topic, partition, builder)
            builder = self._builders[(topic, partition)] = self._producer.create_batch()
            builder.append(timestamp=None, key=key, value=value, headers=headers or [])

    async def flush(self) -> None:
        builders, self._builders = self._builders, {}
        for (topic, partition), builder in builders.items():
            await self._send(topic, partition, builder)

    async def _send(self, topic: str, partition: int, builder: BatchBuilder) -> None:
        self.sends.append(await self._producer.send_batch(builder, topic, partition=partition))


class TransformStopped(RuntimeError):
    """The worker cannot go on in memory; a new one must rebuild its state from Kafka."""


_Snapshot = dict[tuple[int, bytes], MessageState | None]


class PartitionStates:
    """One partition's message states, keyed by message key.

    States restored from the changelog stay encoded until an event first needs them: a restore
    then costs one dict insert per record instead of a pydantic decode (222,875 states took
    12-16 s decoded). Most restored states (final messages) are never read again before the
    next rebalance. A stored message's state goes back to its changelog bytes once its batch
    is done (:meth:`hold_encoded`), for the same reason, and for the garbage collector: a
    state held as a model is four objects it scans in every full collection, a pause that grew
    with the states held (300,000 states: 440 ms), while bytes are not scanned at all.

    Each key is also in ``_final`` or ``_pending`` with the wall-clock time it was last written,
    oldest first (a write moves it to the end), so :meth:`expired` reads only what has expired.
    """

    __slots__ = ("_final", "_items", "_pending")

    def __init__(self) -> None:
        self._items: dict[bytes, MessageState | bytes] = {}
        self._final: dict[bytes, float] = {}
        self._pending: dict[bytes, float] = {}

    def get(self, key: bytes) -> MessageState | None:
        value = self._items.get(key)
        if isinstance(value, bytes):
            value = self._items[key] = MessageState.model_validate_json(value)
        return value

    def __getitem__(self, key: bytes) -> MessageState:
        state = self.get(key)
        if state is None:
            raise KeyError(key)
        return state

    def __setitem__(self, key: bytes, state: MessageState) -> None:
        self.put(key, state, final=state.final, at=time.time())

    def put(self, key: bytes, value: MessageState | bytes, *, final: bool, at: float) -> None:
        self._items[key] = value
        self._final.pop(key, None)
        self._pending.pop(key, None)
        (self._final if final else self._pending)[key] = at

    def hold_encoded(self, key: bytes, value: bytes) -> None:
        """Hold ``key``'s state as ``value``, its encoding, until an event needs it again."""
        self._items[key] = value

    def __contains__(self, key: bytes) -> bool:
        return key in self._items

    def is_final(self, key: bytes) -> bool:
        return key in self._final

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[bytes]:
        return list(self._items)

    def pop(self, key: bytes) -> None:
        self._items.pop(key, None)
        self._final.pop(key, None)
        self._pending.pop(key, None)

    def counts(self) -> tuple[int, int]:
        """(final, pending) states held."""
        return len(self._final), len(self._pending)

    def expired(self, *, final_before: float, pending_before: float, limit: int) -> list[bytes]:
        """Keys of final states last written before ``final_before`` and of other states before
        ``pending_before``, oldest first, at most ``limit``."""
        keys: list[bytes] = []
        for written, before in ((self._final, final_before), (self._pending, pending_before)):
            for key, at in written.items():
                if at >= before or len(keys) >= limit:
                    break
                keys.append(key)
        return keys


class _Emitted(NamedTuple):
    """A postflight record on its way out: its key, fields and value."""

    key: bytes
    fields: dict[str, Any]
    value: bytes


def _key_account(key: bytes) -> bytes:
    """The account part of a message's key (``b"<account id>"``), as erased accounts are kept."""
    return key.partition(b":")[0]


def _merged(kept: _Emitted, fresh: _Emitted) -> _Emitted | None:
    """``kept`` and then ``fresh`` as one record, when they can be. It is ``kept`` (held, so at
    most HELD_RECORD_BYTES) with ``fresh``'s status and flags (50 labels at most), far below
    MAX_RECORD_BYTES; the caller holds it or sends it by its size, as any record."""
    fields = coalesced(kept.fields, fresh.fields)
    return None if fields is None else _Emitted(fresh.key, fields, postflight_value(fields))


_COALESCED: Final = "coalesced"  # in _transact's counts: records that went out in a later one

# The keys whose state a batch changed, each with its changelog value when _handle encoded it.
_Dirty = dict[bytes, bytes | None]
_Batch = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
_Decoded = dict[tuple[TopicPartition, int], AnyEvent | str]  # by (partition, offset): event or why not


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: TransformWorker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._worker._on_assigned(assigned)


class TransformWorker(Component):
    """Consumes ``inflight_topic`` in ``group_id``, produces with ``transactional_id``.

    Parameters mirror :class:`TransformSettings`; ``TransformWorker.from_settings`` builds one
    from them. Use as ``async with worker: await worker.run(stopping)``.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        transactional_id: str,
        group_id: str,
        inflight_topic: str,
        postflight_topic: str,
        state_topic: str,
        max_batch_records: int = 1000,
        poll_timeout_ms: int = 100,
        fetch_min_bytes: int = 1,
        fetch_max_wait_ms: int = 500,
        session_timeout_ms: int = 10_000,
        transaction_timeout_ms: int = 60_000,
        error_backoff_s: float = 1.0,
        parse_workers: int = 1,
        parse_timeout_s: float = 2.0,
        parse_batch_budget_s: float = 20.0,
        parse_memory_limit_bytes: int = 1 << 30,
        final_state_ttl_s: float = 3600.0,
        pending_state_ttl_s: float = 7 * 86400.0,
        state_sweep_interval_s: float = 5.0,
        erasures_topic: str = ERASURES,
    ) -> None:
        self.kafka = kafka
        self.transactional_id = transactional_id
        self.group_id = group_id
        self.inflight_topic = inflight_topic
        self.postflight_topic = postflight_topic
        self.state_topic = state_topic
        self.max_batch_records = max_batch_records
        self.poll_timeout_ms = poll_timeout_ms
        self.error_backoff_s = error_backoff_s
        self.parse_batch_budget_s = parse_batch_budget_s
        self.final_state_ttl_s = final_state_ttl_s
        self.pending_state_ttl_s = pending_state_ttl_s
        self.state_sweep_interval_s = state_sweep_interval_s
        self.erasures_topic = erasures_topic
        self._erasures: AIOKafkaConsumer = make_consumer(kafka, group_id=None)
        # Erased accounts as their keys begin (b"<account id>", as message_key_bytes writes it):
        # every event is checked against them, and parsing each key's account cost 1.5 us.
        self._erased: set[bytes] = set()
        self._erase_due = False  # some state of an erased account may be held: look at the sweep
        self._parser = ParsePool(
            workers=parse_workers, timeout_s=parse_timeout_s, memory_limit_bytes=parse_memory_limit_bytes
        )
        self._next_sweep = time.monotonic() + state_sweep_interval_s
        self._producer: AIOKafkaProducer = make_producer(
            kafka, transactional_id=transactional_id, transaction_timeout_ms=transaction_timeout_ms
        )
        self._consumer: AIOKafkaConsumer = make_consumer(
            kafka, group_id=group_id, session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=min(3000, session_timeout_ms // 3),
            fetch_min_bytes=fetch_min_bytes, fetch_max_wait_ms=fetch_max_wait_ms,
        )  # fmt: skip
        self._states: dict[int, PartitionStates] = {}
        self._lock = asyncio.Lock()
        self._generation = 0
        self._restoring = False
        self._restore_task: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False
        self._fatal: BaseException | None = None

    @classmethod
    def from_settings(cls, s: TransformSettings) -> TransformWorker:
        return cls(
            s,
            transactional_id=s.transactional_id,
            group_id=s.transform_group_id,
            inflight_topic=s.transform_inflight_topic,
            postflight_topic=s.transform_postflight_topic,
            state_topic=s.transform_state_topic,
            max_batch_records=s.transform_max_batch_records,
            poll_timeout_ms=s.transform_poll_timeout_ms,
            fetch_min_bytes=s.transform_fetch_min_bytes,
            fetch_max_wait_ms=s.transform_fetch_max_wait_ms,
            session_timeout_ms=s.transform_session_timeout_ms,
            transaction_timeout_ms=s.transform_transaction_timeout_ms,
            error_backoff_s=s.transform_error_backoff_s,
            parse_workers=s.transform_parse_workers,
            parse_timeout_s=s.transform_parse_timeout_s,
            parse_batch_budget_s=s.transform_parse_batch_budget_s,
            parse_memory_limit_bytes=s.transform_parse_memory_limit_bytes,
            final_state_ttl_s=s.transform_final_state_ttl_s,
            pending_state_ttl_s=s.transform_pending_state_ttl_s,
            state_sweep_interval_s=s.transform_state_sweep_interval_s,
            erasures_topic=s.transform_erasures_topic,
        )

    @property
    def ready(self) -> bool:
        return self._started and not self._restoring and self._fatal is None

    @property
    def assigned_partitions(self) -> set[int]:
        return set(self._states)

    def state_of(self, account_id: int, message_key: str) -> MessageState | None:
        key = message_key_bytes(account_id, message_key)
        for states in self._states.values():
            if key in states:
                return states.get(key)
        return None

    def is_erased(self, account_id: int) -> bool:
        """Whether the worker has learnt of the account's erasure (and drops its records)."""
        return str(account_id).encode() in self._erased

    async def start(self) -> None:
        # The producer first: initialising the transactional id aborts whatever a dead
        # predecessor left open, so the changelog is stable before we restore from it.
        await self._producer.start()
        try:
            await self._check_partitions()
            await self._erasures.start()
            await self._read_erasures_from_start()
            self._parser.start()
            self._consumer.subscribe([self.inflight_topic], listener=_Listener(self))
            await self._consumer.start()
        except BaseException:
            self._parser.stop()
            await self._consumer.stop()  # closes its client even when it never started
            await self._erasures.stop()
            await self._producer.stop()
            raise
        self._started = True

    async def _check_partitions(self) -> None:
        """Refuse to start when the changelog's partition count is not inflight's: partition N of
        the changelog holds the states of inflight's partition N, so with another count states
        would be restored to the wrong partitions and messages processed without their state."""
        inflight = len(await self._producer.partitions_for(self.inflight_topic))
        state = len(await self._producer.partitions_for(self.state_topic))
        if inflight != state:
            raise TopicMismatch(
                f"{self.state_topic} has {state} partitions but {self.inflight_topic} has {inflight}:"
                " transform's changelog must match its input; give both the same count"
                " (docs/topics.md, growing partitions)"
            )

    async def stop(self) -> None:
        if self._stopped or not self._started:
            return
        self._stopped = True
        await self._cancel_restore()
        try:
            await self._consumer.stop()
        finally:
            self._parser.stop()
            await self._erasures.stop()
            await self._producer.stop()

    async def run(self, stopping: asyncio.Event) -> None:
        """Process batches until ``stopping`` is set; the batch in hand is committed first."""
        while not stopping.is_set():
            try:
                await self.process_once()
                if time.monotonic() >= self._next_sweep:
                    await self.sweep()
            except ProducerFenced:
                logger.error("transactional id %s was taken over: stopping", self.transactional_id)
                raise
            except KafkaError as exc:
                logger.warning("batch aborted (%r); retrying in %.1f s", exc, self.error_backoff_s)
                await asyncio.sleep(self.error_backoff_s)

    async def process_once(self) -> int:
        """Fetch one batch and process it in one transaction; returns the records committed."""
        if self._fatal is not None:
            raise self._fatal
        generation = self._generation
        batch = await self._consumer.getmany(
            timeout_ms=self.poll_timeout_ms, max_records=self.max_batch_records
        )
        if not batch:
            return 0
        decoded = await self._decode(batch)
        async with self._lock:
            if generation != self._generation or self._fatal is not None:
                self._read_again(batch)  # fetched across a rebalance
                return 0
            held = {tp: recs for tp, recs in batch.items() if recs and tp.partition in self._states}
            self._read_again({tp: recs for tp, recs in batch.items() if tp not in held})  # restoring
            batch = held
            if not batch:
                return 0
            started = time.perf_counter()
            counts = await self._transact(batch, decoded)
            BATCH_SECONDS.observe(time.perf_counter() - started)
        coalesced_records = counts.pop(_COALESCED, 0)
        for outcome, n in counts.items():
            EVENTS.labels(outcome).inc(n)
        POSTFLIGHT_RECORDS.inc(counts.get(OutcomeKind.EMITTED.value, 0) - coalesced_records)
        COALESCED_RECORDS.inc(coalesced_records)
        return sum(len(recs) for recs in batch.values())

    def _read_again(self, batch: _Batch) -> None:
        """Seek each still assigned partition back to the first record of ``batch`` left unprocessed:
        the consumer's position is past them, and a partition kept across a rebalance (or paused
        while its state is restored) is not reset to its committed offset."""
        assigned = self._consumer.assignment()
        for tp, records in batch.items():
            if records and tp in assigned:
                self._consumer.seek(tp, records[0].offset)

    async def _decode(self, batch: _Batch) -> _Decoded:
        """Each record's event, its raw MIME parsed in the pool, or why it cannot be decoded.

        Parsing outlasting the batch's budget cuts ``batch`` (in place) at the first record not
        parsed yet in each partition, and seeks back there: those records are read again.
        """
        decoded: _Decoded = {}
        parses: dict[asyncio.Task[Event], tuple[TopicPartition, int]] = {}
        for tp, records in batch.items():
            for i, record in enumerate(records):
                try:
                    if record.value is None:
                        raise ValueError("record has no value")
                    event = decode_inflight(record.value) or decode_event(record.value)
                except Exception as exc:  # any bad bytes or schema: the DLQ, never a stuck partition
                    decoded[(tp, record.offset)] = f"undecodable event: {exc}"
                    continue
                decoded[(tp, record.offset)] = event
                if event.content is not None and event.content.raw_mime is not None:
                    parses[asyncio.ensure_future(self._expand(event))] = (tp, i)
        if not parses:
            return decoded
        done, pending = await asyncio.wait(parses, timeout=self.parse_batch_budget_s)
        for task in done:
            tp, i = parses[task]
            failure = task.exception()
            # libs.mime never raises on bad MIME; a parse whose fields fail the event schema goes
            # to the DLQ like any event that cannot be processed, never back to a retry loop.
            decoded[(tp, batch[tp][i].offset)] = (
                task.result()
                if failure is None
                else f"raw_mime cannot be turned into a message: {failure!r}"[:500]
            )
        cut: dict[TopicPartition, int] = {}
        for task in pending:
            task.cancel()
            tp, i = parses[task]
            cut[tp] = min(i, cut.get(tp, i))
        if pending:
            await asyncio.wait(pending)
        for tp, i in cut.items():
            logger.warning("parsing outlasted %.0f s: %s is read again from offset %d",
                           self.parse_batch_budget_s, tp, batch[tp][i].offset)  # fmt: skip
            self._consumer.seek(tp, batch[tp][i].offset)
            batch[tp] = batch[tp][:i]
        return decoded

    async def _expand(self, event: Event) -> Event:
        assert event.content is not None
        return event.model_copy(update={"content": await self._parser.expand(event.content)})

    async def _read_erasures_from_start(self) -> None:
        """Every erased account, up to the topic's end: before the first batch is read."""
        partitions = await self._producer.partitions_for(self.erasures_topic)  # waits for the metadata
        tps = [TopicPartition(self.erasures_topic, p) for p in sorted(partitions)]
        self._erasures.assign(tps)
        for tp in tps:
            # From 0, not seek_to_beginning: its offset lookup, failing once on a topic just
            # created (no leader yet), was not retried and left the partition unread for good.
            self._erasures.seek(tp, 0)
        ends = await self._erasures.end_offsets(tps)
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            await self._poll_erasures(timeout_ms=500)
            for tp in list(pending):
                if await self._erasures.position(tp) >= ends[tp]:
                    pending.discard(tp)

    async def _poll_erasures(self, timeout_ms: int = 0) -> None:
        batch = await self._erasures.getmany(timeout_ms=timeout_ms, max_records=10_000)
        for records in batch.values():
            for record in records:
                account = account_in_key((record.key or b"") + b":")
                prefix = None if account is None else str(account).encode()
                if prefix is not None and prefix not in self._erased:
                    self._erased.add(prefix)
                    self._erase_due = True

    async def _forget_erased(self) -> int:
        """Tombstone every state held of an erased account; returns how many."""
        self._erase_due = False
        found: dict[int, list[bytes]] = {}
        for partition, states in self._states.items():
            keys = [k for k in states.keys() if _key_account(k) in self._erased]
            if keys:
                found[partition] = keys
        pairs = [(p, k) for p, keys in found.items() for k in keys]
        for i in range(0, len(pairs), MAX_EXPIRED_PER_SWEEP):
            chunk: dict[int, list[bytes]] = {}
            for p, k in pairs[i : i + MAX_EXPIRED_PER_SWEEP]:
                chunk.setdefault(p, []).append(k)
            await self._tombstone(chunk, erased=True)
        return len(pairs)

    async def sweep(self) -> int:
        """Tombstone the expired states and those of erased accounts (see the module docstring);
        returns how many expired."""
        self._next_sweep = time.monotonic() + self.state_sweep_interval_s
        now = time.time()
        await self._poll_erasures()
        async with self._lock:
            if self._fatal is not None:
                raise self._fatal
            if self._erase_due:
                await self._forget_erased()
            expired: dict[int, list[bytes]] = {}
            room = MAX_EXPIRED_PER_SWEEP
            for partition, states in self._states.items():
                keys = states.expired(
                    final_before=now - self.final_state_ttl_s,
                    pending_before=now - self.pending_state_ttl_s,
                    limit=room,
                )
                if keys:
                    expired[partition] = keys
                    room -= len(keys)
            if expired:
                await self._tombstone(expired)
            final = pending = 0
            for states in self._states.values():
                f, p = states.counts()
                final, pending = final + f, pending + p
            LIVE_STATES.labels("final").set(final)
            LIVE_STATES.labels("pending").set(pending)
        return sum(len(keys) for keys in expired.values())

    async def _tombstone(self, expired: dict[int, list[bytes]], *, erased: bool = False) -> None:
        out = _Outbox(self._producer)
        await self._producer.begin_transaction()
        try:
            for partition, keys in expired.items():
                for key in keys:
                    await out.add(self.state_topic, partition, key, None)
            await out.flush()
            await asyncio.gather(*out.sends)
        except BaseException as exc:
            _retrieve_failures(out.sends)
            if not isinstance(exc, ProducerFenced):
                await self._abort()
            raise
        await self._commit()
        for partition, keys in expired.items():
            states = self._states[partition]
            for key in keys:
                if erased:
                    ERASED_STATES.inc()
                else:
                    EXPIRED_STATES.labels("final" if states.is_final(key) else "pending").inc()
                states.pop(key)

    async def _transact(self, batch: _Batch, decoded: _Decoded) -> dict[str, int]:
        snapshot: _Snapshot = {}
        counts: dict[str, int] = {}
        out = _Outbox(self._producer)
        await self._producer.begin_transaction()
        try:
            postflight_partitions = sorted(await self._producer.partitions_for(self.postflight_topic))
            # A message's events share one inflight partition (its state lives there); with as many
            # postflight partitions, its records go to the one of the same number, which is what
            # the default partitioner gives the same key, without hashing every key again.
            same_partition = len(postflight_partitions) == len(
                self._consumer.partitions_for_topic(self.inflight_topic) or ()
            )

            async def send(tp: TopicPartition, emitted: _Emitted) -> None:
                partition = (
                    tp.partition if same_partition else _partition_of(emitted.key, postflight_partitions)
                )
                await out.add(self.postflight_topic, partition, emitted.key, emitted.value)

            for tp, records in batch.items():
                states = self._states[tp.partition]
                dirty: _Dirty = {}
                emitted: list[_Emitted] = []
                letters: list[tuple[ConsumerRecord[bytes, bytes], str]] = []
                held: dict[bytes, _Emitted] = {}
                for record in records:
                    event = decoded[(tp, record.offset)]
                    outcome = self._handle(tp, record, event, states, snapshot, dirty, emitted, letters)
                    counts[outcome] = counts.get(outcome, 0) + 1
                    # A message's records in this batch go out as one where they can (coalesced):
                    # its last one is held, up to HELD_RECORD_BYTES; the rest go into the builders
                    # at once, which go out as they fill.
                    for fresh in emitted:
                        kept = held.pop(fresh.key, None)
                        if kept is not None:
                            merged = _merged(kept, fresh)
                            if merged is None:
                                await send(tp, kept)
                            else:
                                fresh = merged
                                counts[_COALESCED] = counts.get(_COALESCED, 0) + 1
                        if len(fresh.value) <= HELD_RECORD_BYTES:
                            held[fresh.key] = fresh
                        else:
                            await send(tp, fresh)
                    emitted.clear()
                for kept in held.values():
                    await send(tp, kept)
                for record, reason in letters:
                    out.sends.append(
                        await self._dead_letter(record, reason, (tp.topic, tp.partition, record.offset))
                    )
                # Only the last state of a key in the batch goes to the changelog. A stored
                # message's waits, mostly for ever, for its next event: it is held as these bytes.
                for key, encoded in dirty.items():
                    state = states[key]
                    value = encoded or json_bytes(state)
                    await out.add(
                        self.state_topic,
                        tp.partition,
                        key,
                        value,
                        headers=[(H_FINAL, b"1" if state.final else b"0")],
                    )
                    if is_stored(state):
                        states.hold_encoded(key, value)
            await out.flush()
            await asyncio.gather(*out.sends)
            offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
            await self._producer.send_offsets_to_transaction(offsets, self.group_id)
        except BaseException as exc:
            _retrieve_failures(out.sends)
            self._rewind(batch, snapshot)
            if not isinstance(exc, ProducerFenced):
                await self._abort()
            raise
        await self._commit()
        return counts

    async def _commit(self) -> None:
        """Commit; a cancellation waits for the commit to end, as the batch is then fully done.

        A commit that fails leaves its outcome unknown (the coordinator may have written the
        markers), so rewinding in memory could duplicate or lose: the worker stops instead and
        its successor rebuilds everything from what Kafka committed.
        """
        commit = asyncio.ensure_future(self._producer.commit_transaction())
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            try:
                await asyncio.wait_for(commit, self.kafka.kafka_request_timeout_ms / 1000)
            except BaseException as exc:
                self._fatal = TransformStopped(f"commit interrupted: {exc!r}")
            raise
        except BaseException as exc:
            self._fatal = TransformStopped(f"commit failed, outcome unknown: {exc!r}")
            raise self._fatal from exc

    def _handle(
        self,
        tp: TopicPartition,
        record: ConsumerRecord[bytes, bytes],
        event: AnyEvent | str,
        states: PartitionStates,
        snapshot: _Snapshot,
        dirty: _Dirty,
        emitted: list[_Emitted],
        letters: list[tuple[ConsumerRecord[bytes, bytes], str]],
    ) -> str:
        """Fold one event into ``states``; what it produces goes to ``dirty`` (the key's state
        changed, with its changelog value when encoded already), ``emitted`` (postflight key and
        value) and ``letters`` (the DLQ, with the reason)."""
        if self._erased and _key_account(record.key or b"") in self._erased:
            return "erased"  # nothing of an erased account is kept, the DLQ included
        if isinstance(event, str):
            letters.append((record, event))
            return "undecodable"
        key = message_key_bytes(event.account_id, event.message_key)
        try:
            previous = states.get(key)  # decoding a restored state may fail here, not in the restore
            outcome = apply(previous, event, position=record.offset)
        except Exception as exc:
            logger.exception("lifecycle failed on %s:%d@%d", tp.topic, tp.partition, record.offset)
            letters.append((record, f"transform error: {exc!r}"))
            return "error"
        if outcome.kind is OutcomeKind.REJECTED:
            letters.append((record, outcome.reason or "rejected"))
        fields = outcome.postflight
        postflight = None if fields is None else _Emitted(key, fields, postflight_value(fields))
        changed = outcome.changed and outcome.state is not None
        # Only content makes a state grow by much; encoding it here is reused for the changelog.
        state_value = (
            json_bytes(outcome.state)
            if changed and outcome.state is not None and event.content is not None
            else None
        )
        largest = max(len(postflight.value) if postflight else 0, len(state_value or b""))
        if largest > MAX_RECORD_BYTES:
            letters.append(
                (record, f"message too large: {largest} bytes encoded, over the limit of {MAX_RECORD_BYTES}")
            )
            return "too_large"
        if changed and outcome.state is not None:
            snapshot.setdefault((tp.partition, key), previous)
            states[key] = outcome.state
            dirty[key] = state_value
        if postflight is not None:
            emitted.append(postflight)
        return outcome.kind.value

    async def _dead_letter(
        self, record: ConsumerRecord[bytes, bytes], reason: str, source: tuple[str, int, int]
    ) -> Awaitable[Any]:
        logger.info("dead-lettering %s:%d@%d: %s", *source, reason[:200])
        # The account from the key (ingest made it from the checked event): known even when the
        # value does not decode. The application is the account's owner; replay looks it up.
        return await dead_letter(
            self._producer,
            stage=STAGE,
            reason=reason,
            key=record.key,
            value=record.value,
            source=source,
            account_id=account_in_key(record.key),
        )

    def _rewind(
        self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]], snapshot: _Snapshot
    ) -> None:
        ABORTED.inc()
        for (partition, key), previous in snapshot.items():
            states = self._states.get(partition)
            if states is None:
                continue
            if previous is None:
                states.pop(key)
            else:
                states[key] = previous
        for tp, records in batch.items():
            self._consumer.seek(tp, records[0].offset)

    async def _abort(self) -> None:
        try:
            await self._producer.abort_transaction()
        except Exception:
            logger.exception("abort_transaction failed")

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:  # waits for the transaction in progress
            self._generation += 1
            await self._cancel_restore()
            for tp in revoked:
                self._states.pop(tp.partition, None)
            logger.info("revoked %s", sorted(tp.partition for tp in revoked))

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Pause the new partitions and rebuild their states in the background.

        aiokafka sends no heartbeats while this listener runs, so a restore inside it that
        outlasts the session timeout would get the member thrown out of the group, and the
        next assignment would restore again, for ever. The partitions stay paused (getmany
        returns nothing of them) until their states are in memory.
        """
        async with self._lock:
            self._generation += 1
            await self._cancel_restore()
            tps = {tp for tp in assigned if tp.topic == self.inflight_topic}
            if not tps:
                return
            self._consumer.pause(*tps)
            self._restoring = True
            self._restore_task = asyncio.create_task(
                self._restore_then_resume(tps, self._generation), name="transform-restore"
            )

    async def _cancel_restore(self) -> None:
        task, self._restore_task = self._restore_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._restoring = False

    async def _restore_then_resume(self, tps: set[TopicPartition], generation: int) -> None:
        try:
            restored = await self._restore(sorted(tp.partition for tp in tps))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # Processing without the state would be wrong: the worker stops on its next batch.
            logger.exception("restoring states of partitions %s failed", sorted(tps))
            self._fatal = TransformStopped(f"restoring states failed: {exc!r}")
            return
        async with self._lock:
            if generation != self._generation:
                return  # reassigned meanwhile; that assignment restores for itself
            self._states.update(restored)
            self._erase_due = self._erase_due or bool(self._erased)  # the changelog may hold some
            assigned = self._consumer.assignment()
            self._consumer.resume(*(tp for tp in tps if tp in assigned))
            self._restoring = False
            self._restore_task = None

    async def _restore(self, partitions: list[int]) -> dict[int, PartitionStates]:
        started = time.perf_counter()
        restored = {p: PartitionStates() for p in partitions}
        if not partitions:
            return restored
        tps = [TopicPartition(self.state_topic, p) for p in partitions]
        consumer = make_consumer(self.kafka, group_id=None)
        async with consumer:
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)  # the last stable offset, as read_committed
            pending = {tp for tp in tps if ends[tp] > 0}
            while pending:
                batch = await consumer.getmany(*pending, timeout_ms=500, max_records=10_000)
                for tp, records in batch.items():
                    states = restored[tp.partition]
                    for record in records:
                        if record.key is None:
                            continue
                        if record.value is None:
                            states.pop(record.key)
                        else:
                            final = (H_FINAL, b"1") in (record.headers or ())
                            states.put(record.key, record.value, final=final, at=record.timestamp / 1000)
                for tp in list(pending):
                    if await consumer.position(tp) >= ends[tp]:
                        pending.discard(tp)
        elapsed = time.perf_counter() - started
        RESTORE_SECONDS.observe(elapsed)
        logger.info(
            "restored %d states of partitions %s in %.2f s",
            sum(len(s) for s in restored.values()), partitions, elapsed,
        )  # fmt: skip
        return restored
