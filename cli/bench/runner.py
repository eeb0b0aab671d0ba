"""``flightlog bench``: every stage measured beside the raw limit of the same machine, in one run.

Raw limits: MariaDB batched upserts into a real shard table, Kafka produce and consume with
aiokafka at the pipeline's message size. Pipeline: the highest sustained events/s from ingest to
queryable, and the ingest-to-queryable latency at a fixed rate. Then the gateway, webhooks, IMAP,
idle IMAP accounts and transform's memory. Each stage reports its figure and, where one applies,
its ratio to the raw limit.

The top of :mod:`cli.bench`: the stages in the order they run. Order matters for two reasons:
the pipeline's ratios need the raw stage's upsert figure, and the stages that load the shared
services come before the one that measures memory on a quiet machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cli.bench import (
    failover,
    gateway,
    idle,
    imap,
    pipeline,
    raw,
    send,
    shard_down,
    shard_move,
    streams,
    transform_memory,
    webhooks,
)
from cli.bench.report import BenchReport, Stage, StageContext, machine_facts
from cli.progress import Step, quiet
from libs.config import DatabaseSettings, KafkaSettings

__all__ = ["STAGES", "run_bench", "select_stages"]

STAGES: Final[tuple[Stage, ...]] = (
    raw.STAGE,
    pipeline.STAGE,
    gateway.STAGE,
    streams.STAGE,
    webhooks.STAGE,
    imap.STAGE,
    send.STAGE,
    idle.STAGE,
    failover.STAGE,
    shard_move.STAGE,
    shard_down.STAGE,
    transform_memory.STAGE,
)


def select_stages(names: Iterable[str]) -> list[Stage]:
    """The named stages in run order (whatever order they were named in); ValueError for a name
    that is no stage."""
    wanted = {n.strip() for n in names if n.strip()}
    unknown = wanted - {s.name for s in STAGES}
    if unknown:
        raise ValueError(
            f"no stage {', '.join(sorted(unknown))}: the stages are {', '.join(s.name for s in STAGES)}"
        )
    return [s for s in STAGES if s.name in wanted]


async def run_bench(
    progress: Callable[[str], None],
    *,
    step: Step = quiet,
    stages: Sequence[Stage] = STAGES,
    quick: bool = False,
    ingest_url: str = "http://127.0.0.1:8081",
    gateway_url: str = "http://127.0.0.1:8080",
    profile_dir: Path | None = None,
) -> BenchReport:
    report = BenchReport(started_at=datetime.now(UTC).isoformat(timespec="seconds"), machine=machine_facts())
    ctx = StageContext(
        report,
        progress,
        DatabaseSettings(),
        KafkaSettings(),
        step=step,
        quick=quick,
        ingest_url=ingest_url,
        gateway_url=gateway_url,
        profile_dir=profile_dir,
    )
    for n, stage in enumerate(stages, 1):
        with step(f"stage {n}/{len(stages)}: {stage.title}"):
            report.stages.append(stage.name)
            await stage.run(ctx)
    return report
