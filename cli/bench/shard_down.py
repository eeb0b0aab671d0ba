"""One cluster's primary killed under writes to every shard: ``flightlog bench``'s shard-down stage.

The target (docs/architecture.md): with one shard's server down, the other shards keep at least 80 % of
their throughput, and nothing is lost. The stage never touches the shared stack's servers:
:class:`PrivateDeployment` starts a global server (the shard map) and two one-server clusters, ``a``
and ``b``, of its own, on free ports under a temporary directory, by the same
:class:`cli.stack.MariaDB` code as ``flightlog stack up``; four shards alternate between them.

Writers stream persist's own writes (:func:`services.persist.writer.write_shard` through one
:class:`~libs.shards.ShardRouter`, one record a transaction) into every shard, as persist's
per-shard concurrent writes do. A write that fails for a reason that may pass is *parked* as
persist parks it: the record is kept, the shard's :class:`~services.persist.worker.Breaker`
opens (so the next records are parked at once, without paying for a failed connect), the router
is asked to reload the map, and a retry loop writes the parked records again with persist's
backoff. Cluster ``b``'s primary gets SIGKILL, stays down for a while, and is started again on
its data directory (InnoDB crash recovery); the retry loop then lands what was parked.

Figures: cluster ``a``'s writes/s with both clusters up, and from the kill until ``b`` is
started again; their ratio (the target: >= 80 %); and the records lost (the target: 0): every
record a writer acknowledged or parked is looked up on its shard at the end.

Runnable alone: ``python -m cli.bench.shard_down``.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cli.bench import deploy
from cli.bench.deploy import PrivateDeployment
from cli.bench.report import BenchReport, Figure, Section, Stage, StageContext, machine_facts
from libs.backoff import backoff_s
from libs.events import Direction, MessageDoc, Participant, PostflightRecord, Status
from libs.shards import ShardRouter
from services.persist.worker import Breaker
from services.persist.writer import Failure, classify, write_shard

__all__ = [
    "STAGE",
    "DownRun",
    "down_deployment",
    "kill_cluster_under_writes",
    "missing",
    "rate_between",
]

GLOBAL_SCHEMA: Final = "flightlog_global_shard_down"
SHARDS: Final = 4  # round-robin: 1 and 3 on cluster a, 2 and 4 on cluster b
WRITERS_PER_SHARD: Final = 2
WRITE_TIMEOUT_S: Final = 10.0  # persist's default FLIGHTLOG_PERSIST_WRITE_TIMEOUT_S
PARK_PAUSE_S: Final = 0.05  # a writer whose record was parked takes its next one after this
RETRY_BASE_S: Final = 0.5  # persist's backoff of a parked record: 0.5 s doubling...
RETRY_MAX_S: Final = 2.0  # ...capped lower than persist's 30 s, so the bench drains quickly
DRAIN_TIMEOUT_S: Final = 60.0  # for the parked records to land once b is back


def down_deployment(state_dir: Path) -> contextlib.AbstractContextManager[PrivateDeployment]:
    """The stage's deployment: a global server and two one-server clusters, ``a`` (the first)
    and ``b``."""
    return deploy.private_deployment(state_dir, GLOBAL_SCHEMA, clusters=2, buffer_pool_mb=64)


async def placement(deployment: PrivateDeployment) -> dict[int, bool]:
    """The global schema, the map and the shards; returns shard -> whether it is on ``a``."""
    shard_map = await deployment.schemas(SHARDS)
    return {s: shard_map.cluster_of(s).primary[1] == deployment.primary.port for s in shard_map.shards}


def rate_between(acked_at: Iterable[float], start: float, end: float) -> float:
    """Acknowledgements per second in ``[start, end)``; 0 for an empty window."""
    if end <= start:
        return 0.0
    return sum(start <= t < end for t in acked_at) / (end - start)


def missing(written: Iterable[tuple[int, str]], stored: set[tuple[int, str]]) -> list[tuple[int, str]]:
    """The (account, key) pairs a writer acknowledged or parked that are not stored."""
    return [k for k in written if k not in stored]


def record(account_id: int, key: str) -> PostflightRecord:
    now = datetime.now(UTC)
    return PostflightRecord(
        account_id=account_id,
        message_key=key,
        version=1,
        message=MessageDoc(
            status=Status.DELIVERED,
            direction=Direction.OUTBOUND,
            channel="email",
            sender=Participant(email="down@example.test"),
            to=[Participant(email="rcpt@example.test")],
            subject=key,
            body_text="written while another cluster is down " * 4,
            occurred_at=now,
            final_at=now,
        ),
    )


@dataclass
class _Parked:
    shard: int
    record: PostflightRecord
    attempt: int = 1
    not_before: float = 0.0


@dataclass
class DownRun:
    on_a: dict[int, bool]
    acked_at_a: list[float] = field(default_factory=list)  # monotonic times of a's acknowledgements
    written: list[tuple[int, str]] = field(default_factory=list)  # acknowledged or parked
    parked: list[_Parked] = field(default_factory=list)  # waiting for a retry
    parks: int = 0  # records parked (each once, however often retried)
    retried_attempts: int = 0  # retries of parked records that failed again
    unparked: int = 0  # parked records written by the retry loop
    parked_on_a: int = 0  # records of a's shards parked: should stay 0
    killed_at: float = 0.0
    restarted_at: float = 0.0  # b started again (the down window's end)
    back_at: float = 0.0  # b answering again
    drained_at: float = 0.0  # the last parked record written
    baseline: tuple[float, float] = (0.0, 0.0)  # the window both clusters were up
    lost: list[tuple[int, str]] = field(default_factory=list)

    @property
    def a_up_per_s(self) -> float:
        return rate_between(self.acked_at_a, *self.baseline)

    @property
    def a_down_per_s(self) -> float:
        return rate_between(self.acked_at_a, self.killed_at, self.restarted_at)

    @property
    def ratio(self) -> float:
        return self.a_down_per_s / self.a_up_per_s if self.a_up_per_s else 0.0


def _park(run: DownRun, breaker: Breaker, router: ShardRouter, shard: int, rec: PostflightRecord) -> None:
    breaker.failed(shard)
    router.request_reload()
    run.parks += 1
    if run.on_a[shard]:
        run.parked_on_a += 1
    run.parked.append(
        _Parked(shard, rec, not_before=time.monotonic() + backoff_s(1, RETRY_BASE_S, RETRY_MAX_S))
    )


async def _writer(
    router: ShardRouter, breaker: Breaker, shard: int, account: int, run: DownRun, stop: asyncio.Event
) -> None:
    n = 0
    while not stop.is_set():
        key = f"sd-{n:07d}"
        rec = record(account, key)
        n += 1
        run.written.append((account, key))
        if not breaker.allows(shard):  # persist's main loop parks at once while the breaker is open
            _park(run, breaker, router, shard, rec)
            await asyncio.sleep(PARK_PAUSE_S)
            continue
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await write_shard(router, shard, [rec])
        except Exception as exc:
            if classify(exc) is Failure.PERMANENT:
                raise
            _park(run, breaker, router, shard, rec)
            await asyncio.sleep(PARK_PAUSE_S)
            continue
        breaker.succeeded(shard)
        if run.on_a[shard]:
            run.acked_at_a.append(time.monotonic())


async def _retry_loop(router: ShardRouter, breaker: Breaker, run: DownRun, stop: asyncio.Event) -> None:
    """persist's retry loop: due parked records, one batch a shard, parked again on failure."""
    while not (stop.is_set() and not run.parked):
        await asyncio.sleep(0.1)
        now = time.monotonic()
        due = [p for p in run.parked if p.not_before <= now]
        if not due:
            continue
        by_shard: dict[int, list[_Parked]] = {}
        for p in due:
            by_shard.setdefault(p.shard, []).append(p)
        for shard, items in by_shard.items():
            try:
                async with asyncio.timeout(WRITE_TIMEOUT_S):
                    await write_shard(router, shard, [p.record for p in items])
            except Exception as exc:
                if classify(exc) is Failure.PERMANENT:
                    raise
                breaker.failed(shard)
                router.request_reload()
                run.retried_attempts += len(items)
                for p in items:
                    p.attempt += 1
                    p.not_before = time.monotonic() + backoff_s(p.attempt, RETRY_BASE_S, RETRY_MAX_S)
                continue
            breaker.succeeded(shard)
            done = {id(p) for p in items}
            run.parked = [p for p in run.parked if id(p) not in done]
            run.unparked += len(items)
            if not run.parked:
                run.drained_at = time.monotonic()


async def _stored(router: ShardRouter, shard: int, accounts: Sequence[int]) -> set[tuple[int, str]]:
    pool = await router.pool(shard)
    marks = ", ".join(["%s"] * len(accounts))
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT account_id, message_key FROM {router.table(shard, 'messages')}"
            f" WHERE account_id IN ({marks})",
            tuple(accounts),
        )
        rows = await cur.fetchall()
        await conn.commit()
    return {(int(r[0]), bytes(r[1]).decode()) for r in rows}


async def kill_cluster_under_writes(
    deployment: PrivateDeployment,
    on_a: dict[int, bool],
    *,
    warmup_s: float = 1.0,
    baseline_s: float = 5.0,
    down_s: float = 5.0,
    after_s: float = 2.0,
    progress: Callable[[str], None] | None = None,
) -> DownRun:
    """Write to every shard; measure ``a``'s rate for ``baseline_s``; kill -9 ``b`` for
    ``down_s``; start it again, write ``after_s`` more, drain the parked records, count losses."""
    say = progress or (lambda _: None)
    run = DownRun(on_a=on_a)
    accounts = {
        shard: [(shard << 48) | (100 + i) for i in range(WRITERS_PER_SHARD)] for shard in sorted(on_a)
    }
    stop_writers, stop_retry = asyncio.Event(), asyncio.Event()
    breaker = Breaker()
    async with ShardRouter(deployment.settings) as router:
        writers = [
            asyncio.create_task(
                _writer(router, breaker, shard, a, run, stop_writers), name=f"down-writer-{a:x}"
            )
            for shard, accs in accounts.items()
            for a in accs
        ]
        retry = asyncio.create_task(_retry_loop(router, breaker, run, stop_retry), name="down-retry")
        try:
            await asyncio.sleep(warmup_s)
            start = time.monotonic()
            await asyncio.sleep(baseline_s)
            run.baseline = (start, time.monotonic())
            say(f"  both clusters up: a at {run.a_up_per_s:,.0f} writes/s; kill -9 b")
            await asyncio.to_thread(deployment.stack.mariadb[1].kill)
            run.killed_at = time.monotonic()
            await asyncio.sleep(down_s)
            run.restarted_at = time.monotonic()
            say(f"  b down: a at {run.a_down_per_s:,.0f} writes/s, {run.parks} records parked; starting b")
            await asyncio.to_thread(deployment.stack.mariadb[1].up)
            run.back_at = time.monotonic()
            await asyncio.sleep(after_s)
        finally:
            stop_writers.set()
            await asyncio.gather(*writers)
            stop_retry.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(retry), DRAIN_TIMEOUT_S)
            retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retry
        stored: set[tuple[int, str]] = set()
        for shard, accs in accounts.items():
            stored |= await _stored(router, shard, accs)
    run.lost = missing(run.written, stored)
    return run


async def bench_shard_down(progress: Callable[[str], None]) -> DownRun:
    with tempfile.TemporaryDirectory(prefix="flightlog-shard-down-") as tmp:
        with down_deployment(Path(tmp)) as deployment:
            on_a = await placement(deployment)
            return await kill_cluster_under_writes(deployment, on_a, progress=progress)


def section_method() -> str:
    return (
        "A deployment of its own (never the shared servers): a global server and two one-server"
        f" clusters a and b, started by the same code as `flightlog stack up`, {SHARDS} shards"
        f" alternating between them. {WRITERS_PER_SHARD} writers a shard stream persist's writes"
        " (one record a transaction) into every shard. A write that fails is parked as persist"
        " parks it: the record is kept, the shard's breaker opens (its next records are parked at"
        f" once, one every {PARK_PAUSE_S * 1000:.0f} ms a writer), and a retry loop writes parked"
        f" records again with persist's backoff (0.5 s doubling, capped at {RETRY_MAX_S:.0f} s here)."
        " After 5 s with both clusters up, b's server gets SIGKILL; 5 s later it is started again"
        " on its data directory (crash recovery). a's rate is counted over the 5 s before the kill"
        " and the 5 s from the kill; at the end every record acknowledged or parked is looked up"
        " on its shard."
    )


async def shard_down_stage(report: BenchReport, progress: Callable[[str], None]) -> None:
    run = await bench_shard_down(progress)
    section = Section("One cluster down", section_method())
    report.sections.append(section)
    report.add(
        Figure("shard down: cluster a, both clusters up", run.a_up_per_s, "writes/s"), progress, section
    )
    report.add(
        Figure(
            "shard down: cluster a, b killed",
            run.a_down_per_s,
            "writes/s",
            limit="target >= 80 % of up",
            ratio=run.ratio,
        ),
        progress,
        section,
    )
    report.add(
        Figure(
            "shard down: records lost",
            len(run.lost),
            "records",
            limit="target 0",
            note=f"of {len(run.written)} acknowledged or parked",
        ),
        progress,
        section,
    )
    drained = run.drained_at - run.back_at if run.drained_at >= run.back_at > 0 else None
    section.reading = (
        f"{run.parks} records of b's shards were parked while b was down ({run.parked_on_a} of a's);"
        f" {run.retried_attempts} retries failed again while b was down; b took"
        f" {run.back_at - run.restarted_at:.1f} s to start (crash recovery), and"
        + (f" its parked records were all written {drained:.1f} s later." if drained is not None else " ")
        + f" {run.unparked} parked records were written by the retry loop."
    )


async def _stage(ctx: StageContext) -> None:
    await shard_down_stage(ctx.report, ctx.progress)


STAGE = Stage(
    "shard-down",
    "shard down",
    "kill -9 one of two private clusters under writes: the other's share of its throughput, records lost",
    "stack",
    _stage,
)


async def _main() -> None:
    report = BenchReport(started_at=datetime.now(UTC).isoformat(timespec="seconds"), machine=machine_facts())
    await shard_down_stage(report, print)
    print("\n" + report.table())


if __name__ == "__main__":
    asyncio.run(_main())
