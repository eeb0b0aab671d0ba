"""Transform memory over many large messages: ``flightlog bench``'s transform-memory stage.

The target (docs/architecture.md) is that transform's RSS and restore time do not grow with the number of
messages ever processed. This stage runs a real transform process (``python -m
services.transform``) on topics of its own, with a short final-state TTL and sweep interval, and
feeds it inbound messages with bodies of ``body_bytes`` (one ``message.received`` with the
content, or for every tenth message ``message.receiving`` with the content, then
``message.received``, so a pending state carries a body too). It reads the process's
``VmRSS``/``VmHWM`` after a warm-up share of the messages and after all of them (the warm-up
takes the fetch buffers, batches and allocator arenas to their working size, so what grows
after it is what transform keeps per message), follows the state changelog as a restore would
read it (keys whose last record is not a tombstone are the states a restart would restore), then
restarts the process and reads the restore's own log line (states, seconds). Beside it, the raw
Kafka produce rate at the same record size, measured in the same run.

Runnable alone: ``python -m cli.bench.transform_memory [--messages N] [--body-kb K]``.
:class:`TransformUnderTest` is also what ``tests/integration/test_transform_memory.py`` drives.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from cli.bench.drive import raw_kafka
from cli.bench.report import BenchReport, Figure, Section, Stage, StageContext, machine_facts
from cli.services import LocalService
from libs.config import KafkaSettings, StackSettings
from libs.events import Event, EventType, encode, message_key_bytes
from libs.kafka import (
    TOPICS,
    TRANSFORM_STATE,
    TopicSpec,
    create_topics,
    make_admin,
    make_consumer,
    make_producer,
)

__all__ = [
    "STAGE",
    "ChangelogFold",
    "Memory",
    "Restore",
    "TransformMemoryRun",
    "TransformUnderTest",
    "bench_transform_memory",
    "events_of",
    "growth_per_thousand",
    "inbound_events",
    "parse_restore_line",
    "proc_status_bytes",
    "sample_total",
    "section_method",
    "section_reading",
    "transform_memory_stage",
]

ACCOUNT: Final = 5 << 48 | 77
PENDING_EVERY: Final = 10  # every tenth message has a pending state (receiving) before it is final
PARTITIONS: Final = 3  # of each of the stage's own topics
# what the worker counts per event (flightlog_transform_events_total's outcome label); anything
# but these two is a dead letter or an error
_GOOD_OUTCOMES: Final = frozenset({"emitted", "applied"})
_RESTORE_LINE: Final = re.compile(r"restored (\d+) states\b.*? in (\d+(?:\.\d+)?) s")
_WORDS: Final = (
    "quarterly report attached please review before friday meeting budget shipment invoice thanks "
    "regards schedule update project milestone the a of to and for with on at from by about"
).split()


# --- pure helpers ---------------------------------------------------------------------------


def proc_status_bytes(status_text: str, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    for line in status_text.splitlines():
        name, _, rest = line.partition(":")
        if name == field:
            value, unit = (*rest.split(), "")[:2]
            if unit != "kB":
                raise ValueError(f"{field} is in {unit!r}, not kB")
            return int(value) * 1024
    raise ValueError(f"no {field} in the status text")


def parse_restore_line(line: str) -> tuple[int, float] | None:
    """(states, seconds) from the worker's "restored N states of partitions [...] in S s" line."""
    match = _RESTORE_LINE.search(line)
    return (int(match[1]), float(match[2])) if match else None


def sample_total(metrics_text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (Prometheus text)."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


def growth_per_thousand(before_bytes: int, after_bytes: int, messages: int) -> float:
    """Bytes of growth per 1,000 messages between two readings ``messages`` apart (may be < 0)."""
    if messages <= 0:
        raise ValueError("messages must be positive")
    return (after_bytes - before_bytes) * 1000 / messages


def _body_pool(size: int, seed: int = 11) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    n = 0
    while n < size:
        word = rng.choice(_WORDS)
        words.append(word)
        n += len(word) + 1
    return " ".join(words)


def inbound_events(
    first: int, count: int, body_bytes: int, *, prefix: str, account_id: int = ACCOUNT
) -> Iterator[Event]:
    """The events of messages ``first`` .. ``first + count - 1``, each with an ASCII body of
    ``body_bytes``: one ``message.received`` with the content, or for every
    :data:`PENDING_EVERY`-th message a ``message.receiving`` with it and then ``message.received``.

    Bodies differ per message (a window of a shared pool and the message's number), so nothing
    the worker keeps could be shared between messages.
    """
    pool = _body_pool(body_bytes * 2)
    now = datetime.now(UTC)
    for i in range(first, first + count):
        start = (i * 7919) % body_bytes
        head = f"message {i}: "
        content = {
            "from": "sender@example.test",
            "to": ["rcpt@example.test"],
            "subject": f"memory {i}",
            "body_text": head + pool[start : start + body_bytes - len(head)],
        }
        key = f"{prefix}{i}"
        common = {"account_id": account_id, "message_key": key, "occurred_at": now, "direction": "inbound"}
        if i % PENDING_EVERY == 0:
            yield Event.model_validate(
                {**common, "event_id": f"{key}-1", "type": EventType.RECEIVING, "content": content}
            )
            yield Event.model_validate({**common, "event_id": f"{key}-2", "type": EventType.RECEIVED})
        else:
            yield Event.model_validate(
                {**common, "event_id": f"{key}-1", "type": EventType.RECEIVED, "content": content}
            )


def events_of(first: int, count: int) -> int:
    """How many events :func:`inbound_events` yields for these messages."""
    pending = len(range(-first % PENDING_EVERY, count, PENDING_EVERY))
    return count + pending


class ChangelogFold:
    """The changelog as a restore sees it: the last record of each key, tombstones removing it."""

    def __init__(self) -> None:
        self.records = 0
        self._sizes: dict[bytes, int] = {}

    def add(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        self.records += 1
        if value is None:
            self._sizes.pop(key, None)
        else:
            self._sizes[key] = len(value)

    @property
    def live(self) -> int:
        return len(self._sizes)

    @property
    def live_bytes(self) -> int:
        return sum(self._sizes.values())


# --- the process ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Memory:
    rss_bytes: int
    hwm_bytes: int  # the peak RSS since the process started


@dataclass(frozen=True, slots=True)
class Restore:
    states: int
    seconds: float  # the worker's own figure: reading the changelog into memory
    ready_s: float  # from the start of the new process until it answered ready
    rss_bytes: int  # of the new process, once ready


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class TransformUnderTest:
    """A transform process on topics, group and transactional id of its own.

    ``async with`` creates the topics (the changelog with the production topic's config, so
    compaction behaves as it does in production), starts the process and waits until it is
    ready; leaving stops it and deletes the topics (they hold a GiB or more at 50 KB bodies).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        state_dir: Path,
        *,
        body_bytes: int,
        final_state_ttl_s: float,
        sweep_interval_s: float,
        partitions: int = PARTITIONS,
        name: str = "tmem",
    ) -> None:
        self.kafka = kafka
        self.body_bytes = body_bytes
        self.final_state_ttl_s = final_state_ttl_s
        self.sweep_interval_s = sweep_interval_s
        self.partitions = partitions
        suffix = uuid.uuid4().hex[:8]
        self.instance = f"{name}-{suffix}"
        self.prefix = f"{name}{suffix}-"
        self.inflight, self.postflight, self.state = (
            f"{name}.{suffix}.{n}" for n in ("inflight", "postflight", "state")
        )
        env = {
            "FLIGHTLOG_INSTANCE_ID": self.instance,
            "FLIGHTLOG_TRANSFORM_GROUP_ID": f"{name}-{suffix}",
            "FLIGHTLOG_TRANSFORM_INFLIGHT_TOPIC": self.inflight,
            "FLIGHTLOG_TRANSFORM_POSTFLIGHT_TOPIC": self.postflight,
            "FLIGHTLOG_TRANSFORM_STATE_TOPIC": self.state,
            "FLIGHTLOG_TRANSFORM_SESSION_TIMEOUT_MS": "6000",
            "FLIGHTLOG_TRANSFORM_FINAL_STATE_TTL_S": str(final_state_ttl_s),
            "FLIGHTLOG_TRANSFORM_STATE_SWEEP_INTERVAL_S": str(sweep_interval_s),
            "FLIGHTLOG_LOG_FORMAT": "json",
            "FLIGHTLOG_LOG_LEVEL": "INFO",
        }
        self.service = LocalService(
            "transform", _free_port(), state_dir, env=env, instance=f"-{self.instance}"
        )
        self.messages = 0  # produced so far
        self.events = 0
        self.peak_rss_bytes = 0  # sampled while waiting for batches
        self.peak_live_in_memory = 0  # the states gauge, sampled likewise
        self.fold = ChangelogFold()
        self._tail: AIOKafkaConsumer | None = None
        self._http: aiohttp.ClientSession | None = None

    @property
    def log_file(self) -> Path:
        return self.service.proc.log_file

    async def __aenter__(self) -> Self:
        state_config = next(s.config for s in TOPICS if s.name == TRANSFORM_STATE)
        await create_topics(
            self.kafka,
            (
                TopicSpec(self.inflight, self.partitions),
                TopicSpec(self.postflight, self.partitions),
                TopicSpec(self.state, self.partitions, dict(state_config)),
            ),
        )
        try:
            self._http = aiohttp.ClientSession()
            await asyncio.to_thread(self.service.start, wait_s=120)
            self._tail = make_consumer(self.kafka, group_id=None)
            await self._tail.start()
            tps = [TopicPartition(self.state, p) for p in range(self.partitions)]
            self._tail.assign(tps)
            await self._tail.seek_to_beginning(*tps)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        try:
            await asyncio.to_thread(self.service.proc.stop, 40)
        finally:
            if self._tail is not None:
                await self._tail.stop()
            if self._http is not None:
                await self._http.close()
            admin = make_admin(self.kafka)
            await admin.start()
            try:
                await admin.delete_topics([self.inflight, self.postflight, self.state])
            finally:
                await admin.close()

    def _pid(self) -> int:
        pid = self.service.proc.pid()
        if pid is None:
            raise RuntimeError(f"transform is not running:\n{self.service.proc.log_tail(30)}")
        return pid

    def memory(self) -> Memory:
        status = Path(f"/proc/{self._pid()}/status").read_text()
        return Memory(proc_status_bytes(status, "VmRSS"), proc_status_bytes(status, "VmHWM"))

    async def metrics(self) -> str:
        assert self._http is not None
        async with self._http.get(f"{self.service.management_address}/metrics") as resp:
            resp.raise_for_status()
            return await resp.text()

    async def live_in_memory(self) -> int:
        """States the process holds, as of its last sweep (its ``flightlog_transform_states``)."""
        return round(sample_total(await self.metrics(), "flightlog_transform_states"))

    async def feed(self, count: int, *, timeout_s: float | None = None) -> float:
        """Produce ``count`` more messages and wait until transform committed all their events.

        Returns the seconds from the first send to the last commit. Unless the process was
        restarted since the first ``feed``, its counters cover every event produced.
        """
        first, self.messages = self.messages, self.messages + count
        self.events += events_of(first, count)
        started = time.monotonic()
        async with make_producer(self.kafka, linger_ms=20, max_batch_size=1_048_576) as producer:
            sends = []
            for event in inbound_events(first, count, self.body_bytes, prefix=self.prefix):
                key = message_key_bytes(event.account_id, event.message_key)
                sends.append(await producer.send(self.inflight, encode(event), key=key))
            await asyncio.gather(*sends)
        deadline = started + (timeout_s if timeout_s is not None else max(120.0, count / 50))
        while (done := sum((outcomes := await self._poll()).values())) < self.events:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"transform committed {done:,.0f} of {self.events:,} events in "
                    f"{deadline - started:.0f} s; see {self.log_file}"
                )
            await asyncio.sleep(0.25)
        bad = {k: v for k, v in outcomes.items() if k not in _GOOD_OUTCOMES and v}
        if bad:
            raise RuntimeError(f"transform did not take every event: {bad}; see {self.log_file}")
        return time.monotonic() - started

    async def _poll(self) -> dict[str, float]:
        """Events committed since the process started, by outcome; samples the peaks on the way."""
        text = await self.metrics()
        self.peak_rss_bytes = max(self.peak_rss_bytes, self.memory().rss_bytes)
        self.peak_live_in_memory = max(
            self.peak_live_in_memory, round(sample_total(text, "flightlog_transform_states"))
        )
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "flightlog_transform_events_total":
                    out[sample.labels["outcome"]] = out.get(sample.labels["outcome"], 0.0) + sample.value
        return out

    async def read_changelog(self) -> ChangelogFold:
        """Fold the changelog up to its last stable offset (read_committed, as a restore reads)."""
        assert self._tail is not None
        tps = [TopicPartition(self.state, p) for p in range(self.partitions)]
        ends = await self._tail.end_offsets(tps)
        pending = {tp for tp in tps if await self._tail.position(tp) < ends[tp]}
        while pending:
            batch = await self._tail.getmany(*pending, timeout_ms=500, max_records=10_000)
            for records in batch.values():
                for record in records:
                    self.fold.add(record.key, record.value)
            for tp in list(pending):
                if await self._tail.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return self.fold

    async def wait_live_states(self, at_most: int, timeout_s: float) -> int:
        """Follow the changelog until at most ``at_most`` states are live in it; returns how many
        are, also when ``timeout_s`` passed first (the caller judges)."""
        deadline = time.monotonic() + timeout_s
        while (await self.read_changelog()).live > at_most:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        return self.fold.live

    async def restart(self) -> Restore:
        """Stop the process (SIGTERM, drained), start it again, and read its restore's log line."""
        await asyncio.to_thread(self.service.proc.stop, 40)
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        started = time.monotonic()
        await asyncio.to_thread(self.service.start, wait_s=300)
        ready_s = time.monotonic() - started
        with self.log_file.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
        found = [r for line in lines if (r := parse_restore_line(line)) is not None]
        if not found:
            raise RuntimeError(f"no restore line in {self.log_file} after the restart")
        # one member owns every partition, so one assignment and one restore
        states, seconds = found[-1]
        return Restore(states, seconds, ready_s, self.memory().rss_bytes)


# --- the stage --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransformMemoryRun:
    messages: int
    warmup: int
    body_bytes: int
    ready: Memory  # the process started, no message yet
    warm: Memory  # after the warm-up messages
    end: Memory  # after every message
    peak_rss_bytes: int  # highest VmRSS sampled while transform worked
    run_s: float  # the messages after the warm-up, first send to last commit
    final_state_ttl_s: float
    sweep_interval_s: float
    peak_live_in_memory: int  # the process's states gauge, highest sampled
    live_at_end: int  # states live in the changelog right after the last commit
    live_after_sweep: int
    sweep_wait_s: float
    changelog_records: int  # what a restore reads until the broker compacts
    restore: Restore

    @property
    def growth_bytes(self) -> int:
        return self.end.rss_bytes - self.warm.rss_bytes

    @property
    def growth_per_thousand_bytes(self) -> float:
        return growth_per_thousand(self.warm.rss_bytes, self.end.rss_bytes, self.messages - self.warmup)


async def bench_transform_memory(
    kafka: KafkaSettings,
    state_dir: Path,
    *,
    messages: int = 20_000,
    warmup: int = 2_000,
    body_bytes: int = 50_000,
    final_state_ttl_s: float = 1.0,
    sweep_interval_s: float = 0.5,
    sweep_timeout_s: float = 60.0,
    progress: Callable[[str], None] = lambda _: None,
) -> TransformMemoryRun:
    """Feed ``warmup`` then ``messages - warmup`` messages, wait for the sweep, then restart."""
    if not 0 < warmup < messages:
        raise ValueError("0 < warmup < messages")
    async with TransformUnderTest(
        kafka, state_dir, body_bytes=body_bytes, final_state_ttl_s=final_state_ttl_s,
        sweep_interval_s=sweep_interval_s,
    ) as t:  # fmt: skip
        ready = t.memory()
        await t.feed(warmup)
        warm = t.memory()
        progress(f"  {warmup:,} messages: RSS {warm.rss_bytes / 2**20:,.0f} MiB")
        run_s = await t.feed(messages - warmup)
        end = t.memory()
        progress(f"  {messages:,} messages: RSS {end.rss_bytes / 2**20:,.0f} MiB ({run_s:.1f} s)")
        live_at_end = (await t.read_changelog()).live
        began = time.monotonic()
        live_after = await t.wait_live_states(0, sweep_timeout_s)
        sweep_wait_s = time.monotonic() - began
        records = t.fold.records
        restore = await t.restart()
        progress(f"  restart: {restore.states:,} states restored in {restore.seconds:.2f} s")
        return TransformMemoryRun(
            messages, warmup, body_bytes, ready, warm, end, t.peak_rss_bytes, run_s, final_state_ttl_s,
            sweep_interval_s, t.peak_live_in_memory, live_at_end, live_after, sweep_wait_s, records,
            restore,
        )  # fmt: skip


def _compaction_settings() -> str:
    config = next(s.config for s in TOPICS if s.name == TRANSFORM_STATE)
    return ", ".join(f"{k} {v}" for k, v in config.items() if k != "cleanup.policy")


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def section_method(run: TransformMemoryRun) -> str:
    """How the run measured, for BENCHMARKS.md's "Transform memory" section."""
    return (
        f"One transform process (`python -m services.transform`, {PARTITIONS} partitions, topics of "
        f"its own) with `FLIGHTLOG_TRANSFORM_FINAL_STATE_TTL_S={run.final_state_ttl_s:g}` and "
        f"`FLIGHTLOG_TRANSFORM_STATE_SWEEP_INTERVAL_S={run.sweep_interval_s:g}`, fed {run.messages:,} "
        f"messages with ~{run.body_bytes / 1000:,.0f} KB bodies: {PENDING_EVERY - 1} in "
        f"{PENDING_EVERY} are one `message.received` with the body, the others `message.receiving` "
        "with the body and then `message.received`. RSS is the process's `VmRSS`; growth is from "
        f"the end of a warm-up ({run.warmup:,} messages) to the end of the run; live states are the "
        "changelog's keys whose last record is not a tombstone, which is what a restart restores. "
        "Other sizes: `python -m cli.bench.transform_memory --messages N --body-kb K`."
    )


def section_reading(run: TransformMemoryRun) -> str:
    """What the run's figures show, for the same section."""
    after = run.messages - run.warmup
    return (
        f"RSS grew {_mib(run.growth_bytes)} over the {after:,} messages after the warm-up; kept, "
        f"their bodies alone would be {_mib(after * run.body_bytes)}. The restart restored "
        f"{run.restore.states:,} states from {run.changelog_records:,} changelog records: a restore "
        "reads every record the broker has not cleaned yet, as nothing before the active segment "
        "is compacted until the segment rolls and `min.compaction.lag.ms` has passed, and "
        f"tombstones stay for `delete.retention.ms` after compaction ({_compaction_settings()}). "
        "So restore time is bounded by that window of changelog traffic, about two records a "
        "message, not by every message ever processed."
    )


async def transform_memory_stage(
    report: BenchReport,
    progress: Callable[[str], None],
    kafka: KafkaSettings,
    *,
    quick: bool = False,
    messages: int | None = None,
    body_bytes: int = 50_000,
    state_dir: Path | None = None,
) -> TransformMemoryRun:
    """Run :func:`bench_transform_memory` and add its figures beside the raw Kafka produce rate
    at the same record size, in a section of their own: read without the method, the figures of
    one short run say little about growth."""
    messages = messages or (4_000 if quick else 20_000)
    warmup = max(1, messages // 10)
    section = Section("Transform memory", method="")
    report.sections.append(section)
    sample = next(inbound_events(1, 1, body_bytes, prefix="tmem-size-"))
    size = len(encode(sample))
    # enough records that the rate is not mostly the producer's start-up
    produce, _ = await raw_kafka(kafka, max(2_000, messages // 5), size)
    report.add(
        Figure(f"raw Kafka produce (aiokafka, acks=all, {size:,} B)", produce, "msgs/s"), progress, section
    )
    run = await bench_transform_memory(
        kafka, state_dir or StackSettings().state_dir, messages=messages, warmup=warmup,
        body_bytes=body_bytes, progress=progress,
    )  # fmt: skip
    section.method = section_method(run)
    section.reading = section_reading(run)
    after = run.messages - run.warmup
    report.add(
        Figure(
            f"transform over {after:,} messages of ~{body_bytes / 1000:,.0f} KB",
            after / run.run_s,
            "msgs/s",
            limit=f"{produce:,.0f} msgs/s produce",
            ratio=after / run.run_s / produce,
            note=f"first send to last commit; {PENDING_EVERY - 1} in {PENDING_EVERY} messages one "
            "message.received, the others message.receiving then message.received",
        ),
        progress,
        section,
    )
    report.add(
        Figure(
            f"transform RSS after {run.messages:,} messages of ~{body_bytes / 1000:,.0f} KB",
            run.end.rss_bytes / 2**20,
            "MiB",
            note=f"{run.ready.rss_bytes / 2**20:,.1f} MiB before the first message",
        ),
        progress,
        section,
    )
    report.add(
        Figure(
            f"transform RSS growth per 1,000 messages (~{body_bytes / 1000:,.0f} KB each)",
            run.growth_per_thousand_bytes / 1024,
            "KiB",
            note=f"RSS {_mib(run.ready.rss_bytes)} ready, {_mib(run.warm.rss_bytes)} after "
            f"{run.warmup:,}, {_mib(run.end.rss_bytes)} after {run.messages:,} (growth "
            f"{_mib(run.growth_bytes)}); peak {_mib(max(run.peak_rss_bytes, run.end.hwm_bytes))}; "
            f"kept, the messages would be {_mib(after * body_bytes)}",
        ),
        progress,
        section,
    )
    report.add(
        Figure(
            "transform live states after the run (changelog, as a restore reads it)",
            run.live_at_end,
            "states",
            note=f"{run.live_after_sweep:,} after the sweep, {run.sweep_wait_s:.1f} s later; at most "
            f"{run.peak_live_in_memory:,} in memory during the run (flightlog_transform_states); "
            f"final-state TTL {run.final_state_ttl_s:g} s, sweep every {run.sweep_interval_s:g} s",
        ),
        progress,
        section,
    )
    report.add(
        Figure(
            "transform restore after a restart",
            run.restore.seconds,
            "s",
            note=f"{run.restore.states:,} states restored from {run.changelog_records:,} changelog "
            f"records (not compacted yet: {_compaction_settings()}); ready "
            f"{run.restore.ready_s:.1f} s after start, RSS {_mib(run.restore.rss_bytes)}",
        ),
        progress,
        section,
    )
    return run


async def _stage(ctx: StageContext) -> None:
    await transform_memory_stage(ctx.report, ctx.progress, ctx.kafka, quick=ctx.quick)


STAGE = Stage(
    "transform-memory",
    "transform memory",
    "RSS, live states and restore time of one transform process over many large messages",
    "stack",
    _stage,
)


async def _main(messages: int, body_bytes: int) -> None:
    report = BenchReport(started_at=datetime.now(UTC).isoformat(timespec="seconds"), machine=machine_facts())
    await transform_memory_stage(report, print, KafkaSettings(), messages=messages, body_bytes=body_bytes)
    print("\n" + report.table())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--body-kb", type=float, default=50.0, help="body size in KB (1,000 bytes)")
    args = parser.parse_args()
    asyncio.run(_main(args.messages, round(args.body_kb * 1000)))


if __name__ == "__main__":
    main()
