"""A shard moved between clusters under writes: ``flightlog bench``'s shard-move stage, and its harness.

The stage never touches the shared stack's servers: :class:`PrivateDeployment` starts a global
server (the shard map) and two clusters (one primary each) of its own, on free ports under a
temporary directory, by the same :class:`cli.stack.MariaDB` code as ``flightlog stack up``.
Writers stream persist's own writes (:func:`services.persist.writer.write_shard` through a
:class:`~libs.shards.ShardRouter`, one record a transaction: new messages and new versions of
earlier ones, so the copy has inserts and updates to catch up) into the accounts of shard 1,
while :func:`libs.shardops.move.move_shard` moves it from ``c1`` to ``c2``. A write that fails
is retried as persist retries an unavailable shard (parked: retried, the router asked to reload
the map); one that fails for good is a failed write.

Figures: the move's duration, the write pause (the wait of the writes that were held: first
attempt to acknowledgement, p99 and max), the fence as the mover measures it, and failed
writes (the target: 0). ``tests/e2e/test_shard_move.py`` drives the same :func:`move_under_writes`.

Runnable alone: ``python -m cli.bench.shard_move``.
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
from cli.bench.stats import LatencySummary, summarize
from libs.events import Direction, MessageDoc, Participant, PostflightRecord, Status
from libs.shardops.move import MoveResult, move_shard
from libs.shards import ShardRouter
from services.persist.writer import Failure, classify, db_errno, write_shard

__all__ = ["STAGE", "MoveRun", "move_deployment", "move_under_writes"]

SHARD: Final = 1  # on c1; shard 2 is on c2
GLOBAL_SCHEMA: Final = "flightlog_global_move"
RETRY_PAUSE_S: Final = 0.05  # between a failed write and its retry
KEYS_PER_ACCOUNT: Final = 200  # then the writer goes round again with a higher version


def move_deployment(state_dir: Path) -> contextlib.AbstractContextManager[PrivateDeployment]:
    """The stage's deployment: a global server and two one-server clusters, ``c1`` and ``c2``."""
    return deploy.private_deployment(state_dir, GLOBAL_SCHEMA, clusters=2)


def record(account_id: int, key: str, version: int) -> PostflightRecord:
    now = datetime.now(UTC)
    return PostflightRecord(
        account_id=account_id,
        message_key=key,
        version=version,
        message=MessageDoc(
            status=Status.DELIVERED,
            direction=Direction.OUTBOUND,
            channel="email",
            sender=Participant(email="move@example.test"),
            to=[Participant(email="rcpt@example.test")],
            subject=f"{key} v{version}",
            body_text="written while its shard moves " * 4,
            occurred_at=now,
            final_at=now,
        ),
    )


@dataclass
class MoveRun:
    accounts: list[int]
    acked: dict[tuple[int, str], int] = field(default_factory=dict)  # (account, key) -> version
    writes: int = 0  # acknowledged writes, each a new version
    latencies_s: list[float] = field(default_factory=list)  # first attempt to acknowledgement
    held_s: list[float] = field(default_factory=list)  # the same, of writes that had to be retried
    retried_attempts: int = 0  # attempts that failed and were retried (parked)
    failed_writes: int = 0  # writes given up (a permanent failure)
    errors: dict[str, int] = field(default_factory=dict)  # retried attempts by error type
    move: MoveResult | None = None
    move_s: float = 0.0

    @property
    def pause(self) -> LatencySummary | None:
        return summarize(self.held_s) if self.held_s else None


async def _writer(router: ShardRouter, account: int, run: MoveRun, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        key, version = f"mv-{n % KEYS_PER_ACCOUNT:05d}", n // KEYS_PER_ACCOUNT + 1
        first = time.monotonic()
        retried = False
        while True:
            try:
                await write_shard(router, SHARD, [record(account, key, version)])
                break
            except Exception as exc:
                if classify(exc) is Failure.PERMANENT:
                    run.failed_writes += 1
                    break
                # persist's answer: park the record and write it again later, having asked
                # the router to follow the new map as soon as it is published
                retried = True
                run.retried_attempts += 1
                errno = db_errno(exc)
                name = type(exc).__name__ + (f" {errno}" if errno is not None else "")
                run.errors[name] = run.errors.get(name, 0) + 1
                router.request_reload()
                await asyncio.sleep(RETRY_PAUSE_S)
        took = time.monotonic() - first
        run.latencies_s.append(took)
        if retried:
            run.held_s.append(took)
        run.acked[(account, key)] = version
        run.writes += 1
        n += 1


async def move_under_writes(
    deployment: PrivateDeployment,
    *,
    writers: int = 4,
    before_s: float = 2.0,
    after_s: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> MoveRun:
    """Write for ``before_s``, move shard 1 to c2 with the writes going on, write ``after_s`` more."""
    run = MoveRun(accounts=[(SHARD << 48) | (100 + i) for i in range(writers)])
    stop = asyncio.Event()
    async with ShardRouter(deployment.settings) as router:
        tasks = [
            asyncio.create_task(_writer(router, a, run, stop), name=f"move-writer-{a & 0xFFFF}")
            for a in run.accounts
        ]
        try:
            await asyncio.sleep(before_s)
            started = time.monotonic()
            run.move = await move_shard(deployment.settings, SHARD, "c2", chunk_rows=500, progress=progress)
            run.move_s = time.monotonic() - started
            await asyncio.sleep(after_s)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    return run


async def bench_shard_move(progress: Callable[[str], None]) -> MoveRun:
    with tempfile.TemporaryDirectory(prefix="flightlog-move-") as tmp:
        with move_deployment(Path(tmp)) as deployment:
            await deployment.schemas()
            return await move_under_writes(
                deployment, writers=4, before_s=5.0, after_s=2.0, progress=progress
            )


def section_method() -> str:
    return (
        "A deployment of its own (never the shared servers): a global server and two one-server"
        " clusters, started by the same code as `flightlog stack up`. Four writers stream persist's"
        " writes (one record a transaction, new messages and new versions of earlier ones) into"
        " shard 1 for 5 s; then `flightlog shards move 1 --to c2` runs with the writes going on"
        " (snapshot with mariadb-dump, catch-up rounds, fence by map state and RENAME TABLE, last"
        " changes, chunked checksum verify, counters, map switch). A write that fails is retried"
        " as persist retries a parked record; the write pause is the wait of the writes that were"
        " held, from first attempt to acknowledgement."
    )


async def shard_move_stage(report: BenchReport, progress: Callable[[str], None]) -> None:
    run = await bench_shard_move(progress)
    section = Section("Shard move", section_method())
    report.sections.append(section)
    move = run.move
    report.add(Figure("shard move: duration", run.move_s, "s"), progress, section)
    pause = run.pause
    report.add(
        Figure(
            "shard move: write pause p99",
            (pause.p99_ms / 1000) if pause else 0.0,
            "s",
            limit="target <= 1 s",
            note=pause.text() if pause else "no write was held",
        ),
        progress,
        section,
    )
    if move is not None:
        report.add(
            Figure(
                "shard move: writes fenced (mover's clock)",
                move.write_pause_s,
                "s",
                note=", ".join(f"{k} {v * 1000:.0f} ms" for k, v in move.timings_s.items()),
            ),
            progress,
            section,
        )
    report.add(
        Figure(
            "shard move: failed writes", run.failed_writes, "writes", note=f"of {run.writes} acknowledged"
        ),
        progress,
        section,
    )
    section.reading = (
        f"{run.retried_attempts} write attempts were refused during the fence and retried"
        f" ({', '.join(f'{k} {v}' for k, v in sorted(run.errors.items())) or 'none'}); none was"
        f" given up. {move.summary() if move else ''}"
    )


async def _stage(ctx: StageContext) -> None:
    await shard_move_stage(ctx.report, ctx.progress)


STAGE = Stage(
    "shard-move",
    "shard move",
    "move a shard between two private clusters under writes: duration, write pause p99, failed writes",
    "stack",
    _stage,
)


async def _main() -> None:
    report = BenchReport(started_at=datetime.now(UTC).isoformat(timespec="seconds"), machine=machine_facts())
    await shard_move_stage(report, print)
    print("\n" + report.table())


if __name__ == "__main__":
    asyncio.run(_main())
