"""The pipeline from ingest to queryable, through the four running services.

An overload (everything posted at once; the rate at which the last message becomes queryable is
the most the pipeline drains, with py-spy sampling the services meanwhile); a ramp of offered
rates until the pipeline falls behind, each step timed to its messages' rows and charged the CPU
time every process spent on it (:mod:`cli.bench.cpu`); the ingest-to-queryable latency at fixed
rates; then the ramp again with a second transform and a second persist sharing the partitions.
Rates are set beside the raw upsert limit when the raw stage ran before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
from aiokafka.admin import AIOKafkaAdminClient

from cli.bench import cpu
from cli.bench.charts import CPU_CHART, RAMP_CHART
from cli.bench.drive import Tenant, lifecycle, make_tenant, offer, post_events
from cli.bench.profile import ServiceProfile, profile_services
from cli.bench.report import RAW_UPSERT, BenchReport, Chart, Figure, RampStep, Section, Stage, StageContext
from cli.bench.stats import nearest_rank
from cli.progress import Step, quiet
from cli.services import LocalService, LocalServices, dev_env
from cli.stack import Stack
from libs.config import DatabaseSettings, KafkaSettings, ServiceSettings
from libs.kafka import make_admin
from libs.shards import ShardRouter
from services.persist.worker import PersistSettings
from services.transform.settings import TransformSettings

__all__ = [
    "ONE_EACH",
    "STAGE",
    "TWO_EACH",
    "cpu_figures",
    "cpu_section",
    "pipeline_latency",
    "pipeline_processes",
    "pipeline_ramp",
    "pipeline_throughput",
    "ramp_table",
    "scaling_section",
    "second_instances",
]

# The ramps, by what ran: the keys of BenchReport.ramps and the charts' legends.
ONE_EACH: Final = "one transform, one persist"
TWO_EACH: Final = "two transforms, two persists"
# Process groups whose CPU time a ramp step is charged, in the charts' stacking order.
PIPELINE_SERVICES: Final = ("ingest", "transform", "persist", "gateway")
SECOND: Final = "-bench-2nd"  # the second instances' pid and log files, and their instance ids


async def _landed(router: ShardRouter, accounts: list[int], prefix: str) -> int:
    async def one(acc: int) -> int:
        shard = acc >> 48
        pool = await router.pool(shard, write=False)
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT COUNT(*) FROM {router.table(shard, 'messages')}"
                " WHERE account_id = %s AND message_key LIKE %s AND status = 'delivered'",
                (acc, prefix + "%"),
            )
            (n,) = await cur.fetchone()
            await conn.commit()
            return int(n)

    return sum(await asyncio.gather(*(one(a) for a in accounts)))


async def wait_landed(
    router: ShardRouter, accounts: list[int], prefix: str, count: int, timeout_s: float = 300.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while (landed := await _landed(router, accounts, prefix)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {landed} of {count} messages {prefix}* queryable after {timeout_s:.0f} s: "
                "see .state/logs/transform.log and persist.log"
            )
        await asyncio.sleep(0.25)


# Consumers stopped longer than their session timeout (10 s) leave their groups: the ingest-alone
# run posts less than this long.
MAX_PAUSE_S: Final = 8.0


@contextlib.contextmanager
def _stopped(pids: Sequence[int]) -> Iterator[None]:
    """The processes ``pids`` stopped (SIGSTOP) for the block, continued however it ends."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


async def pipeline_throughput(
    db: DatabaseSettings,
    url: str,
    tenant: Tenant,
    messages: int,
    posters: int = 8,
    batch_messages: int = 100,
    *,
    paused: Sequence[int] = (),
) -> tuple[float, float]:
    """Offer events as fast as ingest takes them; returns (events/s accepted, events/s queryable).

    With the offered load above capacity, the rate at which the last message becomes queryable
    is the highest rate the pipeline sustains. The processes ``paused`` (transform and persist,
    for ingest's own rate) are stopped while the events are posted.
    """
    prefix = f"tp{uuid.uuid4().hex[:6]}-"
    t = datetime.now(UTC)
    batches = []
    for first in range(0, messages, batch_messages):
        events = []
        for n in range(first, min(first + batch_messages, messages)):
            events += lifecycle(tenant.accounts[n % len(tenant.accounts)], f"{prefix}{n}", t)
        batches.append(events)
    queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)
    async with ShardRouter(db) as router, aiohttp.ClientSession() as http:

        async def poster() -> None:
            while not queue.empty():
                await post_events(http, url, tenant.api_key, queue.get_nowait())

        start = time.monotonic()
        with _stopped(paused):
            await asyncio.gather(*(poster() for _ in range(posters)))
            posted = time.monotonic() - start
        if paused and posted > MAX_PAUSE_S:
            raise RuntimeError(f"posting took {posted:.1f} s with consumers stopped: post fewer messages")
        await wait_landed(router, tenant.accounts, prefix, messages)
        done = time.monotonic() - start
    return messages * 5 / posted, messages * 5 / done


def pipeline_processes(extra: Mapping[str, int] | None = None) -> dict[str, list[int]]:
    """The processes a ramp step is charged: each running service (with ``extra``'s second
    instances, by service name), Kafka, the MariaDB primaries and replicas, this process."""
    services = LocalServices().services
    groups: dict[str, list[int]] = {
        name: [p for p in (services[name].proc.pid(), (extra or {}).get(name)) if p is not None]
        for name in PIPELINE_SERVICES
    }
    return {**{name: pids for name, pids in groups.items() if pids}, **cpu.stack_groups()}


# A ramp step is sustained when what was posted but is not queryable at its end is at most this
# many seconds of its rate: about one latency's worth below capacity (0.1 to 0.5 s up to 14,000
# events/s on the bench machine), growing every second above it. 2 s let a 10 s step count as
# sustained at 18,000 events/s while 14,659/s became queryable (December 2026).
MAX_BACKLOG_S: Final = 1.0


async def _landed_at(router: ShardRouter, accounts: list[int], prefix: str) -> dict[str, float]:
    """Each landed message of ``prefix``: when its row was last written (Unix time)."""

    async def one(acc: int) -> list[tuple[str, float]]:
        shard = acc >> 48
        pool = await router.pool(shard, write=False)
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT message_key, UNIX_TIMESTAMP(updated_at) FROM "
                f"{router.table(shard, 'messages')} WHERE account_id = %s AND message_key LIKE %s",
                (acc, prefix + "%"),
            )
            rows = [(bytes(key).decode(), float(at)) for key, at in await cur.fetchall()]
            await conn.commit()
            return rows

    return dict(row for rows in await asyncio.gather(*(one(a) for a in accounts)) for row in rows)


async def ramp_step(
    router: ShardRouter,
    http: aiohttp.ClientSession,
    url: str,
    tenant: Tenant,
    rate: int,
    step_s: float,
    max_backlog_s: float,
    groups: Mapping[str, Sequence[int]],
) -> RampStep:
    prefix = f"ramp{uuid.uuid4().hex[:6]}-"
    sent_at: dict[str, float] = {}
    before = await asyncio.to_thread(cpu.sample, groups)
    began, began_wall = time.monotonic(), time.time()
    n, tasks = await offer(http, url, tenant, prefix, rate, step_s, sent_at)
    # answers that come after the step's end count against its accepted rate
    await asyncio.wait(tasks, timeout=max(0.0, began + step_s - time.monotonic()) + 0.5)
    accepted = sum(t.done() and t.exception() is None for t in tasks) / len(tasks) * n * 5 / step_s
    backlog_s = (n - await _landed(router, tenant.accounts, prefix)) / (rate / 5)
    await asyncio.gather(*tasks)
    # The step ends when its last message is queryable: the next starts on a drained pipeline,
    # so the CPU time in between is this step's events' and nobody else's.
    await wait_landed(router, tenant.accounts, prefix, n)
    used = cpu.usage(before, await asyncio.to_thread(cpu.sample, groups))
    landed_at = await _landed_at(router, tenant.accounts, prefix)
    latencies_ms = [(at - sent_at[key]) * 1000 for key, at in landed_at.items()]
    return RampStep(
        offered=rate,
        accepted=accepted,
        queryable=n * 5 / max(1e-3, max(landed_at.values()) - began_wall),
        backlog_s=backlog_s,
        sustained=accepted >= 0.95 * rate and backlog_s <= max_backlog_s,
        events=n * 5,
        p50_ms=nearest_rank(latencies_ms, 50),
        p99_ms=nearest_rank(latencies_ms, 99),
        cpu_us=used.per_event_us(n * 5),
        cores=used.cores(),
        rest_cores=used.rest_s / used.wall_s if used.wall_s > 0 else 0.0,
    )


def _step_line(s: RampStep) -> str:
    busiest = sorted(s.cpu_us.items(), key=lambda kv: -kv[1])[:3]
    return (
        f"ramp {s.offered:,} events/s: accepted {s.accepted:,.0f}/s, queryable {s.queryable:,.0f}/s,"
        f" backlog {s.backlog_s:.2f} s, p50 {s.p50_ms:,.0f} ms, p99 {s.p99_ms:,.0f} ms;"
        f" CPU {sum(s.cpu_us.values()):,.0f} µs/event ("
        + ", ".join(f"{name} {us:,.0f}" for name, us in busiest)
        + f") -> {'sustained' if s.sustained else 'falling behind'}"
    )


async def pipeline_ramp(
    db: DatabaseSettings,
    url: str,
    tenant: Tenant,
    show: Step,
    groups: Mapping[str, Sequence[int]],
    *,
    start: int = 2_000,
    step: int = 2_000,
    top: int = 30_000,
    step_s: float = 10.0,
    max_backlog_s: float = MAX_BACKLOG_S,
) -> list[RampStep]:
    """Raise the offered rate step by step until the pipeline falls behind.

    A step is sustained when ingest accepted >= 95% of the offered events within the step and
    what was posted but is not yet queryable at its end is under ``max_backlog_s`` of that rate:
    above the pipeline's capacity that backlog grows with every second, below it it stays at
    about one latency's worth. Every step waits for its last message to be queryable before the
    next begins, and is charged the CPU time of ``groups`` meanwhile; the ramp stops at the first
    step that is not sustained, after one more step halfway between it and the step before (the
    highest sustained rate to half a step). The steps are returned by offered rate.
    """
    steps: list[RampStep] = []
    async with ShardRouter(db) as router, aiohttp.ClientSession() as http:

        async def run(rate: int) -> RampStep:
            with show(f"ramp step: {rate:,} events/s for {step_s:.0f} s") as line:
                result = await ramp_step(router, http, url, tenant, rate, step_s, max_backlog_s, groups)
                line.text = _step_line(result)
            steps.append(result)
            return result

        for rate in range(start, top + 1, step):
            if not (await run(rate)).sustained:
                if rate > start:
                    await run(rate - step // 2)
                break
    return sorted(steps, key=lambda s: s.offered)


async def pipeline_latency(
    db: DatabaseSettings, url: str, tenant: Tenant, rate_events_s: int, seconds: float
) -> list[float]:
    """Post at a fixed rate; latency of each message = its row's last write - its POST's start."""
    prefix = f"lat{uuid.uuid4().hex[:6]}-"
    sent_at: dict[str, float] = {}
    async with ShardRouter(db) as router, aiohttp.ClientSession() as http:
        n, tasks = await offer(http, url, tenant, prefix, rate_events_s, seconds, sent_at)
        await asyncio.gather(*tasks)
        await wait_landed(router, tenant.accounts, prefix, n)
        landed_at = await _landed_at(router, tenant.accounts, prefix)
    return [at - sent_at[key] for key, at in landed_at.items()]


def _beside_upsert(report: BenchReport, rows_s: float) -> tuple[str | None, float | None]:
    """The raw upsert limit and the ratio of ``rows_s`` to it, when the raw stage ran first."""
    raw = report.by_stage(RAW_UPSERT)
    if raw is None:
        return None, None
    return f"{raw.value:,.0f} rows/s upsert", rows_s / raw.value


def _at_top(steps: Sequence[RampStep]) -> str:
    """A note for a ramp that sustained its last step: it stopped at its top, not at a limit."""
    return "; the ramp's top, sustained: the limit is above it" if steps and steps[-1].sustained else ""


def best_sustained(steps: Sequence[RampStep]) -> RampStep | None:
    return max((s for s in steps if s.sustained), key=lambda s: s.offered, default=None)


def cpu_figures(steps: Sequence[RampStep]) -> list[Figure]:
    """The CPU time per event of each group of processes at the ramp's highest sustained step
    (its first step when none was: the note says so), and their sum."""
    at = best_sustained(steps) or (steps[0] if steps else None)
    if at is None or not at.cpu_us:
        return []
    where = f"at {at.offered:,} events/s ({at.events:,} events)" + (
        "" if at.sustained else ", a step the pipeline did not sustain: the stages behind are undercounted"
    )
    figures = [
        Figure(f"CPU per event, {name}", us, "µs", note=f"{at.cores[name]:.2f} cores; {where}")
        for name, us in at.cpu_us.items()
    ]
    total = sum(at.cpu_us.values())
    figures.append(
        Figure(
            "CPU per event, all of the above",
            total,
            "µs",
            note=f"{1e6 / total:,.0f} events/s per core; {sum(at.cores.values()):.2f} of the machine's"
            f" {os.cpu_count()} cores busy, the rest of the machine (other processes)"
            f" {at.rest_cores:.2f} more",
        )
    )
    return figures


def ramp_table(ramps: Mapping[str, Sequence[RampStep]]) -> str:
    """Every step of every ramp, as a markdown table."""
    rows = [
        "| processes | offered | accepted | queryable | backlog at the end | p50 | p99 | CPU per event | |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, steps in ramps.items():
        for s in steps:
            rows.append(
                f"| {name} | {s.offered:,} events/s | {s.accepted:,.0f}/s | {s.queryable:,.0f}/s"
                f" | {s.backlog_s:.2f} s | {s.p50_ms:,.0f} ms | {s.p99_ms:,.0f} ms"
                f" | {sum(s.cpu_us.values()):,.0f} µs | {'sustained' if s.sustained else 'falling behind'} |"
            )
    return "\n".join(rows)


async def _group_members(admin: AIOKafkaAdminClient, group: str) -> tuple[str, int]:
    """A consumer group's state and number of members."""
    [response] = await admin.describe_consumer_groups([group])
    _error, _group, state, _protocol_type, _protocol, members = response.groups[0][:6]
    return str(state), len(members)


async def _wait_groups(
    kafka: KafkaSettings, expected: Mapping[str, int], ready: Sequence[LocalService], timeout_s: float = 120.0
) -> None:
    """Until every group of ``expected`` is stable with that many members (each one has its
    partitions) and every service of ``ready`` answers ready (transform: its states restored)."""
    admin = make_admin(kafka)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            seen = {g: await _group_members(admin, g) for g in expected}
            settled = all(seen[g] == ("Stable", n) for g, n in expected.items())
            if settled and all(await asyncio.gather(*(asyncio.to_thread(s.ready) for s in ready))):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"consumer groups not settled after {timeout_s:.0f} s: {seen}")
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def second_instances(kafka: KafkaSettings, show: Step = quiet) -> AsyncIterator[dict[str, int]]:
    """A second transform and a second persist beside the running ones, in their consumer groups
    (the partitions split between the two), each with an instance id of its own (transform's
    transactional id derives from it); yields their pids once both groups have settled. Leaving
    stops them and waits until the first instances hold every partition again."""
    groups = {
        "transform": TransformSettings().transform_group_id,
        "persist": PersistSettings().persist_group_id,
    }
    first = LocalServices().services
    admin = make_admin(kafka)
    await admin.start()
    try:
        before = {g: (await _group_members(admin, g))[1] for g in groups.values()}
    finally:
        await admin.close()
    env = {**dev_env(), "FLIGHTLOG_INSTANCE_ID": f"{ServiceSettings().instance_id}{SECOND}"}
    state_dir = Stack().settings.state_dir
    seconds = {name: LocalService(name, _free_port(), state_dir, env, instance=SECOND) for name in groups}
    try:
        with show("a second transform and a second persist: starting, then the groups settling"):
            for svc in seconds.values():
                await asyncio.to_thread(svc.start, wait_s=120)
            await _wait_groups(
                kafka,
                {g: before[g] + 1 for g in groups.values()},
                [*seconds.values(), first["transform"], first["persist"]],
            )
        yield {name: pid for name, svc in seconds.items() if (pid := svc.proc.pid()) is not None}
    finally:
        with show("the second transform and persist: stopping, the first taking their partitions back"):
            for svc in seconds.values():
                await asyncio.to_thread(svc.proc.stop, 40)
            await _wait_groups(kafka, before, [first["transform"], first["persist"]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _half_rate(best: int) -> int:
    """Half the highest sustained rate, to 500 events/s."""
    return round(best / 2 / 500) * 500


async def pipeline_stage(ctx: StageContext) -> None:
    report, progress, show, db, url, quick = (
        ctx.report, ctx.progress, ctx.step, ctx.db, ctx.ingest_url, ctx.quick
    )  # fmt: skip
    # 64 accounts: ingest's per-account limit (1,000 events/s each) stays above what it can take
    tenant = await make_tenant(db, accounts_per_shard=4)
    services = LocalServices().services
    alone_messages = 4_000 if quick else 16_000
    with show(f"ingest alone: {alone_messages * 5:,} events posted with transform and persist stopped"):
        consumers = [pid for n in ("transform", "persist") if (pid := services[n].proc.pid())]
        alone, _ = await pipeline_throughput(db, url, tenant, alone_messages, paused=consumers)
    report.add(
        Figure(
            "ingest alone accepted (POST /v1/events, 500 events/request, acks=all)",
            alone,
            "events/s",
            note="transform and persist stopped (SIGSTOP) while it runs, so the cores are ingest's,"
            " Kafka's and the load generator's; target >= 40,000 events/s",
        ),
        progress,
    )
    messages = 4_000 if quick else 20_000
    with show(f"overload: {messages * 5:,} events posted at once, drained"):
        overload = asyncio.create_task(pipeline_throughput(db, url, tenant, messages))
        profiles: list[ServiceProfile] = []
        if ctx.profile_dir is not None:
            await asyncio.sleep(1.0)  # past the first requests, into the steady overload
            pids = {n: pid for n in ("ingest", "transform", "persist") if (pid := services[n].proc.pid())}
            profiles = await profile_services(pids, 3.0 if quick else 8.0, ctx.profile_dir)
        accepted, drained = await overload
    report.add(
        Figure(
            "ingest accepted under overload, the whole pipeline running (500 events/request)",
            accepted,
            "events/s",
        ),
        progress,
    )
    # Each message is 5 events and one row: the row rate is what MariaDB sees.
    limit, ratio = _beside_upsert(report, drained / 5)
    report.add(
        Figure(
            "end-to-end drain rate under overload (everything posted at once)",
            drained,
            "events/s",
            limit=limit,
            ratio=ratio,
            note=f"{drained / 5:,.0f} rows/s; ratio is rows/s over raw upsert rows/s",
        ),
        progress,
    )
    for prof in profiles:
        report.profiles.append(prof.line())
        progress(f"  profile {prof.line()}")

    top, step_s = (10_000, 4.0) if quick else (30_000, 10.0)
    one = report.ramps[ONE_EACH] = await pipeline_ramp(
        db, url, tenant, show, pipeline_processes(), top=top, step_s=step_s
    )
    ramp_section = Section(
        "The pipeline's ramp, step by step",
        "Each step posts lifecycles (five events a message, 100 ms clock) at the offered rate for"
        f" {step_s:.0f} s, then waits until its last message is queryable before the next"
        " step starts. Accepted: events ingest answered 202 for within the step. Queryable: the"
        " step's events over the time from its start to its last row's write. Latency: each"
        " message's row write less its POST's start. A step is sustained when ingest accepted 95%"
        " of the offered events and what was not queryable at the step's end is at most"
        f" {MAX_BACKLOG_S:.0f} s of the offered rate; the ramp stops at the first step that is not,"
        " after one more step halfway between it and the one before.",
        charts=[Chart(RAMP_CHART, "throughput and p50/p99 latency against the offered rate")],
    )
    report.sections.append(ramp_section)  # its table once both ramps have run
    best = best_sustained(one)
    best_rate = best.offered if best is not None else 0
    limit, ratio = _beside_upsert(report, best_rate / 5)
    report.add(
        Figure(
            "end-to-end ingest to queryable, highest sustained rate (ramp)",
            best_rate,
            "events/s",
            limit=limit,
            ratio=ratio,
            note=f"{best_rate / 5:,.0f} rows/s; steps of 2,000 events/s, and one of 1,000 below the first"
            f" not sustained (sustained: 95 % accepted, at most {MAX_BACKLOG_S:.0f} s of the rate not"
            " queryable yet at the step's end); "
            + ", ".join(f"{s.offered // 1000}k: {s.backlog_s:.1f} s backlog" for s in one)
            + _at_top(one),
        ),
        progress,
    )
    cpu_section(report, one, progress)
    latency_s = 10.0 if quick else 30.0
    rates = {2_000: "2,000 events/s"}
    if (half := _half_rate(best_rate)) > 0 and half != 2_000:
        rates[half] = f"half the highest sustained rate ({half:,} events/s)"
    for rate, at in rates.items():
        with show(f"latency at {rate:,} events/s for {latency_s:.0f} s"):
            ms = [s * 1000 for s in await pipeline_latency(db, url, tenant, rate, latency_s)]
        for p in (50, 99):
            report.add(
                Figure(
                    f"ingest-to-queryable latency p{p} at {at}",
                    nearest_rank(ms, p),
                    "ms",
                    note=f"n={len(ms):,}",
                ),
                progress,
            )

    async with second_instances(ctx.kafka, show) as extra:
        two = report.ramps[TWO_EACH] = await pipeline_ramp(
            db, url, tenant, show, pipeline_processes(extra), top=top, step_s=step_s
        )

    scaling_section(report, one, two, progress)
    ramp_section.reading = ramp_table(report.ramps)


CPU_METHOD: Final = (
    "The CPU time (user + system, from `/proc/<pid>/stat`, each process with its child processes)"
    " that each process spent on the highest sustained step of the ramp with one transform and one"
    " persist, divided by the step's events: from the step's start until its last message was"
    " queryable, on a pipeline drained of the step before. What follows a row's write (the change"
    " relay, webhook dispatch in the gateway) runs partly into the next step. 1,000,000 µs over"
    " the total is the events/s one core of this machine carries for the whole pipeline, Kafka and"
    " MariaDB included; each stage's own figure sizes its processes. Other work on the machine"
    " (the rest, from `/proc/stat`) is not in the figures."
)


def cpu_section(report: BenchReport, steps: Sequence[RampStep], progress: Callable[[str], None]) -> None:
    section = Section(
        "CPU per event, by process",
        CPU_METHOD,
        reading="The chart shows every step of both ramps: how the cost per event falls as batches grow"
        " with the rate, and where the machine goes.",
        charts=[Chart(CPU_CHART, "CPU time per event of each process at every ramp step")],
    )
    report.sections.append(section)
    for figure in cpu_figures(steps):
        report.add(figure, progress, section)


def scaling_section(
    report: BenchReport, one: Sequence[RampStep], two: Sequence[RampStep], progress: Callable[[str], None]
) -> None:
    best_one, best_two = best_sustained(one), best_sustained(two)
    rate_one = best_one.offered if best_one is not None else 0
    rate_two = best_two.offered if best_two is not None else 0
    section = Section(
        "Scaling by partitions",
        "The same ramp, in the same run, with a second transform and a second persist started beside"
        " the first (instance ids of their own, the same consumer groups: each takes three of the six"
        " partitions of flightlog.inflight and flightlog.postflight) once both groups were stable"
        " with the new member and both transforms had restored their states. Ingest, Kafka and"
        " MariaDB stay as they are; all of it shares the machine's cores.",
    )
    busy = [
        f"{name} {sum(best.cores.values()):.2f} at {best.offered:,} events/s"
        for name, best in ((ONE_EACH, best_one), (TWO_EACH, best_two))
        if best is not None
    ]
    if busy:
        section.reading = (
            "Cores busy, all the processes of the CPU table together, at each ramp's highest sustained"
            f" step: {'; '.join(busy)}; the machine has {os.cpu_count()}."
        )
    report.sections.append(section)
    report.add(
        Figure(
            f"highest sustained rate, {ONE_EACH}", rate_one, "events/s", note="the ramp above" + _at_top(one)
        ),
        progress,
        section,
    )
    report.add(
        Figure(
            f"highest sustained rate, {TWO_EACH}",
            rate_two,
            "events/s",
            note=(f"{rate_two / rate_one:.2f}x one of each" if rate_one else "") + _at_top(two),
        ),
        progress,
        section,
    )
    # the stages' cost per event at the highest rate both ramps sustained, side by side
    common = {s.offered for s in one if s.sustained} & {s.offered for s in two if s.sustained}
    if not common:
        return
    rate = max(common)
    at_one = next(s for s in one if s.offered == rate)
    at_two = next(s for s in two if s.offered == rate)
    for name in ("transform", "persist"):
        if name in at_one.cpu_us and name in at_two.cpu_us:
            report.add(
                Figure(
                    f"CPU per event at {rate:,} events/s, {name}, two processes",
                    at_two.cpu_us[name],
                    "µs",
                    note=f"one process: {at_one.cpu_us[name]:,.1f} µs; both together"
                    f" {at_two.cores[name]:.2f} cores",
                ),
                progress,
                section,
            )


STAGE = Stage(
    "pipeline",
    "pipeline",
    "ingest to queryable: overload drain rate (py-spy profile), sustained-rate ramp with CPU per"
    " event, latency, the ramp with two transforms and two persists",
    "services",
    pipeline_stage,
)
