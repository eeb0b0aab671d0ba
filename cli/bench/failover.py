"""A primary killed under writes: ``flightlog bench``'s failover stage, and the harness behind it.

The stage never touches the shared stack's servers: :class:`PrivateDeployment` starts a
deployment of its own under a temporary directory on free ports: a global server (the shard
map) and one cluster of a primary and its semi-synchronous GTID replica, built by the same
:class:`cli.stack.Stack` code as ``flightlog stack up``. A writer streams persist's own writes
(:func:`services.persist.writer.write_shard`, one record a transaction, through a
:class:`~libs.shards.ShardRouter`) into one shard; the primary is killed with SIGKILL; the
controller (:class:`libs.shardops.watch.ShardWatch`, in this process) detects it and fails over;
the writer retries what failed as persist does (an unavailable shard: retry, ask the router to
reload the map) until writes succeed again.

Figures: the time from the kill until the first write succeeds again (the target: < 5 s), the
controller's detection time and the failover's own steps, and the acknowledged writes missing
on the promoted primary afterwards (the target: 0). ``tests/e2e/test_shard_failover.py`` drives
the same :func:`kill_primary_under_writes`.

Runnable alone: ``python -m cli.bench.failover``.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cli.bench import deploy
from cli.bench.deploy import PrivateDeployment
from cli.bench.report import BenchReport, Figure, Section, Stage, StageContext, machine_facts
from libs.events import Direction, MessageDoc, Participant, PostflightRecord, Status
from libs.shardops.failover import FailoverResult
from libs.shardops.watch import ShardWatch
from libs.shards import ShardRouter
from services.persist.writer import Failure, classify, write_shard

__all__ = [
    "STAGE",
    "FailoverRun",
    "kill_primary_under_writes",
    "private_deployment",
]

CLUSTER: Final = "c1"
SHARD: Final = 1
GLOBAL_SCHEMA: Final = "flightlog_global_failover"
RETRY_PAUSE_S: Final = 0.05  # between a failed write and its retry


def private_deployment(state_dir: Path) -> contextlib.AbstractContextManager[PrivateDeployment]:
    """The stage's deployment: a global server and one cluster with its replica."""
    return deploy.private_deployment(state_dir, GLOBAL_SCHEMA, replicas=True)


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
            sender=Participant(email="failover@example.test"),
            to=[Participant(email="rcpt@example.test")],
            subject=key,
            body_text="written while the primary dies",
            occurred_at=now,
            final_at=now,
        ),
    )


@dataclass
class FailoverRun:
    killed_at: float = 0.0
    recovered_at: float = 0.0  # the first write acknowledged after the kill
    acked: list[str] = field(default_factory=list)  # message keys, in acknowledgement order
    failed_writes: int = 0  # attempts that failed and were retried (none is given up)
    failover: FailoverResult | None = None
    detected_after_s: float = 0.0  # from the kill until the controller started the failover
    missing: list[str] = field(default_factory=list)  # acknowledged, not on the promoted primary

    @property
    def writes_again_s(self) -> float:
        return self.recovered_at - self.killed_at


async def _writer(
    router: ShardRouter, account: int, run: FailoverRun, stop: asyncio.Event, recovered: asyncio.Event
) -> None:
    n = 0
    while not stop.is_set():
        key = f"fo-{n:07d}"
        try:
            await write_shard(router, SHARD, [record(account, key)])
        except Exception as exc:
            if classify(exc) is Failure.PERMANENT:
                raise
            # persist's answer to an unavailable shard: the record is kept and written again
            # later; the router is asked to follow a new map as soon as one is published
            run.failed_writes += 1
            router.request_reload()
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        run.acked.append(key)
        if run.killed_at and not run.recovered_at:
            run.recovered_at = time.monotonic()
            recovered.set()
        n += 1


async def kill_primary_under_writes(
    deployment: PrivateDeployment, *, before_s: float = 2.0, after_s: float = 2.0, timeout_s: float = 30.0
) -> FailoverRun:
    """Write for ``before_s``, kill -9 the primary, write until writes succeed again and
    ``after_s`` more, then count the acknowledged writes on the promoted primary."""
    run = FailoverRun()
    account = (SHARD << 48) | 1
    stop, stopping_watch, recovered = asyncio.Event(), asyncio.Event(), asyncio.Event()
    watch = ShardWatch(deployment.settings)

    def on_failover(result: FailoverResult) -> None:
        run.failover = result
        run.detected_after_s = time.monotonic() - run.killed_at - result.timings_s["total"]

    watch.on_failover = on_failover
    led = asyncio.Event()
    async with ShardRouter(deployment.settings) as router:
        watcher = asyncio.create_task(watch.run(stopping_watch, ready=led.set), name="shard-watch")
        writer = asyncio.create_task(_writer(router, account, run, stop, recovered), name="failover-writer")
        try:
            await asyncio.wait_for(led.wait(), 10)
            await asyncio.sleep(before_s)
            deployment.primary.kill()
            run.killed_at = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(recovered.wait(), timeout_s)
            await asyncio.sleep(after_s)
        finally:
            stop.set()
            stopping_watch.set()
            await asyncio.gather(writer, watcher)
        if not run.recovered_at:
            raise TimeoutError(f"writes did not succeed again within {timeout_s:.0f} s of the kill")
        pool = await router.pool(SHARD)
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT message_key FROM {router.table(SHARD, 'messages')} WHERE account_id = %s", (account,)
            )
            stored = {bytes(r[0]).decode() for r in await cur.fetchall()}
            await conn.commit()
    run.missing = [k for k in run.acked if k not in stored]
    return run


async def bench_failover() -> FailoverRun:
    with tempfile.TemporaryDirectory(prefix="flightlog-failover-") as tmp:
        with private_deployment(Path(tmp)) as deployment:
            await deployment.schemas()
            return await kill_primary_under_writes(deployment)


def section_method() -> str:
    return (
        "A deployment of its own (never the shared servers): a global server and one cluster of a"
        " primary and its semi-synchronous GTID replica, started by the same code as `flightlog"
        " stack up`. One writer streams persist's writes (one record a transaction) into a shard;"
        " the primary gets SIGKILL; the controller (`flightlog shards watch`'s loop, health checks"
        " every 0.25 s, dead after 3 failed checks over 1 s) fences, promotes and publishes a new"
        " shard map version; the writer retries as persist does and its router polls the map fast"
        " while writes fail. Acknowledged writes are then looked up on the promoted primary."
    )


async def failover_stage(report: BenchReport, progress: Callable[[str], None]) -> None:
    run = await bench_failover()
    section = Section("Failover", section_method())
    report.sections.append(section)
    report.add(
        Figure("failover: kill -9 to writes succeeding again", run.writes_again_s, "s", limit="target < 5 s"),
        progress,
        section,
    )
    report.add(Figure("failover: controller detection", run.detected_after_s, "s"), progress, section)
    if run.failover is not None:
        report.add(
            Figure(
                "failover: fence, catch-up, promote, publish",
                run.failover.timings_s["total"],
                "s",
                note=", ".join(
                    f"{k} {v * 1000:.0f} ms" for k, v in run.failover.timings_s.items() if k != "total"
                ),
            ),
            progress,
            section,
        )
    report.add(
        Figure(
            "failover: acknowledged writes lost",
            len(run.missing),
            "rows",
            note=f"of {len(run.acked)} acknowledged",
        ),
        progress,
        section,
    )
    section.reading = (
        f"{run.failed_writes} write attempts failed while the primary was gone and were retried;"
        " none was given up."
    )


async def _stage(ctx: StageContext) -> None:
    await failover_stage(ctx.report, ctx.progress)


STAGE = Stage(
    "failover",
    "failover",
    "kill -9 a primary under writes: time until writes succeed again, acknowledged writes lost",
    "stack",
    _stage,
)


async def _main() -> None:
    report = BenchReport(started_at=datetime.now(UTC).isoformat(timespec="seconds"), machine=machine_facts())
    await failover_stage(report, print)
    print("\n" + report.table())


if __name__ == "__main__":
    asyncio.run(_main())
