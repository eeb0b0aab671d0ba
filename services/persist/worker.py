"""persist's consumer loops: postflight into the shards, and parked records back into them.

A shard whose server is down or slow must neither stop the other shards nor lose anything. So a
batch is split by server, and the servers are written concurrently, each with a timeout: a
server's shards in one transaction (:func:`services.persist.writer.write_shards`, one commit
instead of one a shard). When that transaction fails, its shards are written again one by one,
concurrently, each in a transaction of its own, and what follows is per shard: the records
of a shard that failed are *parked* on ``flightlog.persist-retry`` (acknowledged by Kafka) before
the batch's offsets are committed. The retry loop writes parked records when their backoff is
due and parks them again, with a longer backoff, while their shard is still failing. Writes are
version-guarded, so a parked record that lands after a newer one changes nothing it should not
(only its content, if the newer record carried none: see services.persist.writer): order does not
matter and parking is safe. A circuit breaker per shard parks records at once while the shard is
known to be failing, so the main loop does not pay a timeout per batch. The breaker closes only
when a probe of the shard (``SELECT 1``, in a task of its own every ``Breaker.open_s``) or a
retried write succeeds: the main loop never waits on a failing shard itself, which matters for
a server that hangs rather than refuses (a probe in the batch held every shard's records for
the whole write timeout every few seconds).

Offsets are committed only after the database commit (or the park, or the dead letter) of every
record they cover: at-least-once, made exact by the version guard.

Poison records (see :func:`services.persist.writer.classify`). A record that can never be
written must neither be retried for ever nor hold its shard's batch with it:

- A record that does not decode, or whose shard is not in the map, goes to ``flightlog.dlq`` at once.
- A ``PERMANENT`` failure of a shard batch is isolated: a row that cannot be built names its
  record, which is dead-lettered and the rest written again at once; a data error of the
  database is bisected (halves written separately) down to the single record at fault. Every
  good record is written, only the bad one is dead-lettered, with the stage, the reason and the
  original bytes.
- ``UNAVAILABLE`` (the shard cannot take writes): the shard's records are parked as before and
  its breaker opens. Such parks are *not charged* to the records, so an outage of any length
  dead-letters nothing: the records wait for their shard.
- ``TRANSIENT`` (the shard answered with an error that may pass, e.g. a lock wait timeout or a
  deadlock, or one we do not know): parked. The retry loop isolates such a failure by
  bisection too, and a failure is charged to a record only when it failed on its own. A record
  charged ``persist_max_attempts`` times (default 10) goes to the DLQ with its last error instead
  of being parked again: the safety net for a poison we failed to recognise. Charges travel in
  the ``flightlog-failures`` header; ``flightlog-attempt`` still counts every park and drives the
  backoff (0.5 s doubling, capped at ``persist_max_backoff_s``). Records parked before the
  charge header existed start at zero charges.

Lock waits are bounded by ``persist_lock_wait_timeout_s`` (below ``persist_write_timeout_s``), so
a row locked elsewhere fails with the server's error 1205 (charged, isolated) rather than with
our timeout (which looks like an unreachable shard and opens the breaker).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Self

import asyncmy.errors
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from prometheus_client import Counter, Histogram
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from libs.backoff import backoff_s
from libs.dlq import account_in_key, dead_letter
from libs.events import PostflightRecord, decode_postflight
from libs.ids import ShardBitsMismatch, shard_of
from libs.kafka import PERSIST_RETRY
from libs.shards import ShardRouter, UnknownShard
from services.persist.relay import CommittedChange
from services.persist.writer import (
    Failure,
    ShardWriteResult,
    UnstorableRecord,
    classify,
    write_shard,
    write_shards,
)

__all__ = ["PersistSettings", "PersistWorker"]

logger = logging.getLogger(__name__)

H_ATTEMPT: Final = "flightlog-attempt"  # parks so far: drives the backoff
H_FAILURES: Final = "flightlog-failures"  # failures charged to the record (persist_max_attempts)
H_NOT_BEFORE: Final = "flightlog-not-before"

RECORDS = Counter("flightlog_persist_records_total", "Postflight records handled", ["outcome"])
ISOLATIONS = Counter(
    "flightlog_persist_isolations_total", "Shard batches split to find the record that fails", ["failure"]
)
# Failures classified UNAVAILABLE that are one shard's, not its server's.
_A_SHARDS_OWN: Final = (ShardBitsMismatch, asyncmy.errors.ProgrammingError)
TOGETHER_FAILED = Counter(
    "flightlog_persist_server_writes_failed_total",
    "Transactions of a server's shards that failed, whose shards were then written one by one",
)


class PersistSettings(BaseSettings):
    """persist's own settings (``FLIGHTLOG_PERSIST_*``); see the module docstring for the policy."""

    model_config = SettingsConfigDict(env_prefix="FLIGHTLOG_", extra="ignore", frozen=True)

    # flightlog.postflight's group; flightlog.persist-retry is read in "<group>-retry". Overridable
    # so a second pipeline on one stack (the e2e tests beside `make dev`) keeps its own offsets.
    persist_group_id: str = "flightlog-persist"
    persist_max_records: int = Field(default=2000, gt=0)  # records per consumed batch
    # The broker answers a fetch of flightlog.postflight once this much is there, or when the wait
    # is over: fuller batches, so fewer transactions per record, for at most the wait's latency
    # when the pipeline is not busy. A batch costs persist and MariaDB ~18 ms of CPU whatever its
    # records (its shard parts' statements and commits), so at high rates the wait decides much
    # of the CPU per event. 1 MiB / 100 ms against 256 KiB / 50 ms (python -m cli.pipeline_step,
    # December 2026): persist's batches at 16,000 events/s 368 -> 168 in 20 s, the pipeline's CPU
    # 91.5 -> 72.8 us an event; p99 at 8,500 events/s 111 -> 174 ms, at 2,000 76 -> 130 ms, inside
    # the 250 ms target (docs/architecture.md, "persist's fetch wait").
    persist_fetch_min_bytes: int = Field(default=1024 * 1024, ge=1)
    persist_fetch_max_wait_ms: int = Field(default=100, ge=0, le=500)
    # one transaction: a shard's, or a server's shards'
    persist_write_timeout_s: float = Field(default=10.0, gt=0)
    # Whole seconds (InnoDB's unit), below the write timeout so a lock wait is the server's error.
    persist_lock_wait_timeout_s: int = Field(default=5, ge=1)
    persist_max_backoff_s: float = Field(default=30.0, gt=0)  # between retries of a parked record
    # Charged failures (the record failed alone, its shard answering) before the DLQ; parks
    # because the shard is unavailable are never charged.
    persist_max_attempts: int = Field(default=10, ge=1)

    @model_validator(mode="after")
    def _lock_wait_below_write_timeout(self) -> Self:
        if self.persist_lock_wait_timeout_s >= self.persist_write_timeout_s:
            raise ValueError(
                "FLIGHTLOG_PERSIST_LOCK_WAIT_TIMEOUT_S must be below FLIGHTLOG_PERSIST_WRITE_TIMEOUT_S"
            )
        return self


CHANGES = Counter("flightlog_persist_changes_total", "Rows written to shard change logs")
BATCH_SECONDS = Histogram("flightlog_persist_batch_seconds", "Time to write one consumed batch")
BODY_BYTES = Counter(
    "flightlog_persist_body_bytes_total", "Body bytes before and after compression", ["form"]
)


@dataclass(slots=True)
class Breaker:
    """Per-shard circuit breaker: open from a failure until :meth:`succeeded` (a probe or a
    retried write); ``open_s`` is the time between probes."""

    open_s: float = 2.0
    _open: set[int] = field(default_factory=set)

    def allows(self, shard: int) -> bool:
        return shard not in self._open

    def failed(self, shard: int) -> None:
        self._open.add(shard)

    def succeeded(self, shard: int) -> None:
        self._open.discard(shard)


@dataclass(frozen=True, slots=True)
class _Item:
    record: PostflightRecord
    source: ConsumerRecord[bytes, bytes]
    attempt: int = 0
    failures: int = 0


@dataclass(slots=True)
class _Verdicts:
    """What became of the records of one write that were not written."""

    parked: list[tuple[_Item, bool, str]] = field(default_factory=list)  # (item, charged, error)
    dead: list[tuple[_Item, str]] = field(default_factory=list)  # (item, reason)

    def park(self, items: Sequence[_Item], *, charged: bool, error: str) -> None:
        self.parked += [(item, charged, error) for item in items]

    def extend(self, other: _Verdicts) -> None:
        self.parked += other.parked
        self.dead += other.dead


class PersistWorker:
    """Consumes ``postflight_topic`` (and ``retry_topic``) and writes into the shards.

    ``settings`` bounds batches, transactions, lock waits and backoff and sets how many charged
    failures a record is given (see the module docstring). ``on_changes`` is told each shard
    that committed change rows, with the rows (the change relay's wake-up and hand-over).
    """

    def __init__(
        self,
        router: ShardRouter,
        producer: AIOKafkaProducer,
        consumer: AIOKafkaConsumer,
        retry_consumer: AIOKafkaConsumer,
        *,
        retry_topic: str = PERSIST_RETRY,
        settings: PersistSettings | None = None,
        on_changes: Callable[[int, Sequence[CommittedChange]], None] | None = None,
    ) -> None:
        s = settings or PersistSettings()
        self.on_changes = on_changes
        self.router = router
        self.producer = producer
        self.consumer = consumer
        self.retry_consumer = retry_consumer
        self.retry_topic = retry_topic
        self.max_records = s.persist_max_records
        self.write_timeout_s = s.persist_write_timeout_s
        self.lock_wait_timeout_s = s.persist_lock_wait_timeout_s
        self.max_backoff_s = s.persist_max_backoff_s
        self.max_attempts = s.persist_max_attempts
        self.breaker = Breaker()
        self._probes: dict[int, asyncio.Task[None]] = {}

    async def run(self, stopping: asyncio.Event) -> None:
        """Both loops until ``stopping`` is set; each finishes its batch before returning."""
        try:
            await asyncio.gather(self._main_loop(stopping), self._retry_loop(stopping))
        finally:
            await self.stop_probes()

    async def stop_probes(self) -> None:
        """Cancel the breakers' probes (``run`` does it when it ends)."""
        probes, self._probes = list(self._probes.values()), {}
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)

    def _open_breaker(self, shard: int) -> None:
        self.breaker.failed(shard)
        if shard not in self._probes:
            self._probes[shard] = asyncio.create_task(self._probe(shard), name=f"persist-probe-{shard}")

    async def _probe(self, shard: int) -> None:
        """Close ``shard``'s breaker once its server answers a query again."""
        try:
            while not self.breaker.allows(shard):
                await asyncio.sleep(self.breaker.open_s)
                if self.breaker.allows(shard):
                    return  # a retried write closed it meanwhile
                try:
                    async with asyncio.timeout(self.write_timeout_s):
                        pool = await self.router.pool(shard)
                        async with pool.acquire() as conn, conn.cursor() as cur:
                            await cur.execute("SELECT 1")
                except Exception as exc:
                    logger.debug("shard %d probe failed: %s", shard, _describe(exc))
                    continue
                self.breaker.succeeded(shard)
        finally:
            self._probes.pop(shard, None)

    async def _main_loop(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            batch = await self.consumer.getmany(timeout_ms=200, max_records=self.max_records)
            records = [r for rs in batch.values() for r in rs]
            if not records:
                continue
            with BATCH_SECONDS.time():
                items = await self._decode(records, stage="persist")
                await self._write(items, stage="persist")
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
            await self._write(items, stage="persist-retry", from_retry=True)
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
                        account_id=account_in_key(r.key),
                    )
                )
                RECORDS.labels("dead_letter").inc()
                continue
            attempt, failures = int(_header_float(r, H_ATTEMPT)), int(_header_float(r, H_FAILURES))
            items.append(_Item(record, r, attempt, failures))
        if dead:
            await asyncio.gather(*dead)
        return items

    async def _write(self, items: Sequence[_Item], *, stage: str, from_retry: bool = False) -> None:
        by_shard: dict[int, list[_Item]] = defaultdict(list)
        for item in items:
            by_shard[shard_of(item.record.account_id)].append(item)
        verdicts = _Verdicts()
        groups = [[shard] for shard in by_shard] if from_retry else self._by_server(by_shard)
        for outcome in await asyncio.gather(
            *(self._write_group(g, by_shard, from_retry=from_retry) for g in groups)
        ):
            verdicts.extend(outcome)
        await self._settle(verdicts, stage=stage)

    def _by_server(self, shards: Iterable[int]) -> list[list[int]]:
        """The shards to write in one transaction: those of one server. A shard whose breaker is
        open, that is read-only for a move or that the map does not name goes alone, to the path
        that parks it."""
        together: dict[int, list[int]] = defaultdict(list)
        alone: list[list[int]] = []
        shard_map = self.router.shard_map
        for shard in shards:
            cluster = shard_map.shard_cluster.get(shard)
            if cluster is None or shard in shard_map.readonly or not self.breaker.allows(shard):
                alone.append([shard])
            else:
                together[cluster].append(shard)
        return [*together.values(), *alone]

    async def _write_group(
        self, shards: list[int], by_shard: Mapping[int, list[_Item]], *, from_retry: bool = False
    ) -> _Verdicts:
        """Write the shards of one server in one transaction (:func:`write_shards`: one commit
        instead of one a shard); when it fails, write them one by one, which tells which shard
        and which records failed and handles each as always (:meth:`_write_one`)."""
        if len(shards) > 1:
            try:
                async with asyncio.timeout(self.write_timeout_s):
                    results = await write_shards(
                        self.router,
                        {shard: [i.record for i in by_shard[shard]] for shard in shards},
                        lock_wait_timeout_s=self.lock_wait_timeout_s,
                    )
            except Exception as exc:
                # The server's unavailability (not a shard's schema or id counter): one by one
                # would wait for it again.
                if classify(exc) is Failure.UNAVAILABLE and not isinstance(exc, _A_SHARDS_OWN):
                    verdicts = _Verdicts()
                    for shard in shards:
                        self._unavailable(shard, exc, [by_shard[shard]], verdicts)
                    return verdicts
                TOGETHER_FAILED.inc()
                logger.info(
                    "shards %s in one transaction: %s; writing them one by one", shards, _describe(exc)
                )
            else:
                for result in results:
                    self._written(result, len(by_shard[result.shard]))
                return _Verdicts()
        verdicts = _Verdicts()
        for outcome in await asyncio.gather(
            *(self._write_one(shard, by_shard[shard], from_retry=from_retry) for shard in shards)
        ):
            verdicts.extend(outcome)
        return verdicts

    def _unavailable(self, shard: int, exc: Exception, parts: list[list[_Item]], verdicts: _Verdicts) -> None:
        """The shard cannot take writes: park its records uncharged and open its breaker."""
        self._log_unavailable(shard, exc, sum(len(p) for p in parts))
        self._open_breaker(shard)
        # a failover may be publishing a new primary: follow it within a fraction of a second,
        # so the parked records' next retry goes there
        self.router.request_reload()
        for part in parts:
            verdicts.park(part, charged=False, error=_describe(exc))

    def _written(self, result: ShardWriteResult, records: int) -> None:
        shard = result.shard
        self.breaker.succeeded(shard)
        # A patch of a message with no row is handled, not written: nothing to patch.
        RECORDS.labels("written").inc(records - result.patches_without_row)
        RECORDS.labels("patch_without_row").inc(result.patches_without_row)
        CHANGES.inc(result.changed)
        if result.changed and self.on_changes is not None:
            self.on_changes(shard, result.committed)
        BODY_BYTES.labels("raw").inc(result.body_bytes_raw)
        BODY_BYTES.labels("stored").inc(result.body_bytes_stored)

    async def _write_one(self, shard: int, items: list[_Item], *, from_retry: bool) -> _Verdicts:
        """Write one shard's items, isolating the records that fail (see the module docstring).

        Parts are written one after another, first half first; an unavailable shard parks what
        is left at once (uncharged), without trying the other parts.
        """
        verdicts = _Verdicts()
        if not from_retry and not self.breaker.allows(shard):  # the retry loop is the probe
            verdicts.park(items, charged=False, error=f"shard {shard}'s breaker is open")
            return verdicts
        pending = [items]
        while pending:
            part = pending.pop()
            try:
                async with asyncio.timeout(self.write_timeout_s):
                    result = await write_shard(
                        self.router,
                        shard,
                        [i.record for i in part],
                        lock_wait_timeout_s=self.lock_wait_timeout_s,
                    )
            except Exception as exc:
                failure = classify(exc)
                error = _describe(exc)
                if failure is Failure.UNAVAILABLE:
                    self._unavailable(shard, exc, [part, *pending], verdicts)
                    return verdicts
                culprit = exc.record if isinstance(exc, UnstorableRecord) else None
                bad = [i for i in part if i.record is culprit]
                if bad:  # the row builder named its record: no bisection needed
                    verdicts.dead += [(i, f"unwritable record: {error}") for i in bad]
                    rest = [i for i in part if i.record is not culprit]
                    if rest:
                        pending.append(rest)
                    continue
                if len(part) == 1:
                    if failure is Failure.PERMANENT:
                        verdicts.dead.append((part[0], f"unwritable record: {error}"))
                    else:
                        verdicts.park(part, charged=True, error=error)
                    continue
                if failure is Failure.PERMANENT or from_retry:
                    ISOLATIONS.labels(failure.value).inc()
                    logger.info(
                        "shard %d: %s failure in a part of %d records (%s); bisecting",
                        shard,
                        failure.value,
                        len(part),
                        error,
                    )
                    middle = len(part) // 2
                    pending += [part[middle:], part[:middle]]
                    continue
                # A transient failure on the hot path: park the part uncharged; the retry loop,
                # off the hot path, isolates it if it happens again.
                logger.warning("shard %d: %s; parking %d records", shard, error, len(part))
                verdicts.park(part, charged=False, error=error)
            else:
                self._written(result, len(part))
        return verdicts

    @staticmethod
    def _log_unavailable(shard: int, exc: Exception, records: int) -> None:
        if isinstance(exc, ShardBitsMismatch):
            # A counter without the shard's bits: refuse to write, keep the records for a retry
            # once an operator repairs it (`flightlog db migrate` re-asserts the counters).
            logger.error("shard %d refused a write: %s; parking %d records", shard, exc, records)
        else:
            logger.warning("shard %d unavailable (%s); parking %d records", shard, _describe(exc), records)

    async def _settle(self, verdicts: _Verdicts, *, stage: str) -> None:
        """Park or dead-letter what was not written; returns once Kafka acknowledged all of it."""
        futures: list[asyncio.Future[Any]] = []
        parked = 0
        dead = list(verdicts.dead)
        for item, charged, error in verdicts.parked:
            failures = item.failures + int(charged)
            if failures >= self.max_attempts:
                dead.append((item, f"gave up after {failures} failed attempts; the last: {error}"))
                continue
            futures.append(await self._park(item, failures))
            parked += 1
        for item, reason in dead:
            logger.warning(
                "dead-lettering %s[%d]@%d: %s",
                item.source.topic,
                item.source.partition,
                item.source.offset,
                reason[:300],
            )
            futures.append(
                await dead_letter(
                    self.producer,
                    stage=stage,
                    reason=reason,
                    key=item.source.key,
                    value=item.source.value,
                    source=(item.source.topic, item.source.partition, item.source.offset),
                    account_id=item.record.account_id,
                )
            )
        if futures:
            await asyncio.gather(*futures)
        RECORDS.labels("parked").inc(parked)
        RECORDS.labels("dead_letter").inc(len(dead))

    async def _park(self, item: _Item, failures: int) -> asyncio.Future[Any]:
        attempt = item.attempt + 1
        not_before = time.time() + backoff_s(attempt, 0.5, self.max_backoff_s)
        future: asyncio.Future[Any] = await self.producer.send(
            self.retry_topic,
            key=item.source.key,
            value=item.source.value,
            headers=[
                (H_ATTEMPT, str(attempt).encode()),
                (H_FAILURES, str(failures).encode()),
                (H_NOT_BEFORE, repr(not_before).encode()),
            ],
        )
        return future


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _header_float(record: ConsumerRecord[bytes, bytes], name: str) -> float:
    for key, value in record.headers or ():
        if key == name:
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 0.0
