"""The bench report: figures, the sections stages write for themselves, and BENCHMARKS.md.

The bottom of :mod:`cli.bench`. A stage is a :class:`Stage` whose ``run`` adds figures to the
:class:`BenchReport` in its :class:`StageContext`; the runner orders the stages and renders the
report. Nothing here imports a stage or the runner, so every stage can depend on this module and
on nothing else of the bench above :mod:`cli.bench.drive`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cli.progress import Step, quiet
from libs.config import DatabaseSettings, KafkaSettings

__all__ = [
    "RAW_UPSERT",
    "BenchReport",
    "Chart",
    "Figure",
    "RampStep",
    "Section",
    "Stage",
    "StageContext",
    "machine_facts",
    "write_benchmarks_md",
]

# The raw stage's MariaDB figure: the limit the pipeline stage's figures are a ratio of, when
# both ran.
RAW_UPSERT = "raw MariaDB batched upsert (500 rows/txn)"


@dataclass
class Figure:
    stage: str  # the figure's label (the JSON's key since the first report)
    value: float
    unit: str
    limit: str | None = None
    ratio: float | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class Chart:
    """A PNG drawn from the report (:mod:`cli.bench.charts`), by its file name beside BENCHMARKS.md."""

    file: str
    alt: str


@dataclass
class Section:
    """A stage's own part of BENCHMARKS.md after the main table: how it measured, its figures,
    what they show, and its charts.

    Its figures are in the report's figures too (the JSON and the terminal list everything), but
    the markdown shows them only here, beside the method needed to read them.
    """

    title: str
    method: str
    figures: list[Figure] = field(default_factory=list)
    reading: str = ""
    charts: list[Chart] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RampStep:
    """One offered rate of a pipeline ramp: what the pipeline made of it, and what it cost.

    :param offered: events/s posted, on a 100 ms clock.
    :param accepted: events/s ingest answered 202 for within the step.
    :param queryable: the step's events over the time from its start until its last message was
        queryable: the offered rate less what lagged behind.
    :param backlog_s: posted but not queryable at the step's end, in seconds of the offered rate.
    :param sustained: accepted >= 95% of offered and a backlog under the ramp's bound.
    :param p50_ms: ingest-to-queryable latency of the step's messages (POST start to row write).
    :param cpu_us: CPU time (user + sys) per event of each group of processes, over the step
        from its start until its last message was queryable.
    :param rest_cores: cores busy meanwhile outside those groups: the rest of the machine.
    """

    offered: int
    accepted: float
    queryable: float
    backlog_s: float
    sustained: bool
    events: int
    p50_ms: float
    p99_ms: float
    cpu_us: dict[str, float] = field(default_factory=dict)
    cores: dict[str, float] = field(default_factory=dict)
    rest_cores: float = 0.0


@dataclass
class BenchReport:
    started_at: str
    machine: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)  # the stages that ran, in order
    # the pipeline's ramps by what ran ("one transform, one persist" ...), for the charts
    ramps: dict[str, list[RampStep]] = field(default_factory=dict)

    def add(self, figure: Figure, progress: Callable[[str], None], section: Section | None = None) -> None:
        self.figures.append(figure)
        if section is not None:
            section.figures.append(figure)
        progress(f"  {figure.stage}: {_fmt(figure.value)} {figure.unit}")

    def by_stage(self, stage: str) -> Figure | None:
        return next((f for f in self.figures if f.stage == stage), None)

    def table(self, figures: list[Figure] | None = None) -> str:
        rows = ["| stage | figure | raw limit (same run) | ratio | note |", "| --- | --- | --- | --- | --- |"]
        for f in self.figures if figures is None else figures:
            ratio = f"{f.ratio:.0%}" if f.ratio is not None else ""
            rows.append(f"| {f.stage} | {_fmt(f.value)} {f.unit} | {f.limit or ''} | {ratio} | {f.note} |")
        return "\n".join(rows)

    def to_json(self) -> str:
        return json.dumps(
            {
                "started_at": self.started_at,
                "machine": self.machine,
                "stages": self.stages,
                "figures": [asdict(f) for f in self.figures],
                "profiles": self.profiles,
                "ramps": {name: [asdict(s) for s in steps] for name, steps in self.ramps.items()},
                "sections": [
                    {
                        "title": s.title,
                        "method": s.method,
                        "figures": [f.stage for f in s.figures],
                        "reading": s.reading,
                        "charts": [c.file for c in s.charts],
                    }
                    for s in self.sections
                ],
            },
            indent=2,
        )


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"


def machine_facts() -> dict[str, Any]:
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024**2, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        **{name: importlib.metadata.version(name) for name in ("aiokafka", "asyncmy", "aiomysql")},
    }


@dataclass(frozen=True, slots=True)
class StageContext:
    """What every stage gets: the report to add to, where to say what it is doing (``progress``
    for a line, ``step`` for a part that takes a while: its closing line says how long), the
    stack."""

    report: BenchReport
    progress: Callable[[str], None]
    db: DatabaseSettings
    kafka: KafkaSettings
    step: Step = quiet
    quick: bool = False
    ingest_url: str = "http://127.0.0.1:8081"
    gateway_url: str = "http://127.0.0.1:8080"
    profile_dir: Path | None = None  # where py-spy's profiles go; None: no profiling


@dataclass(frozen=True, slots=True)
class Stage:
    """One stage of ``flightlog bench``.

    :param name: what ``--stages`` takes.
    :param title: the progress heading while it runs.
    :param summary: its line in ``flightlog bench --help``.
    :param needs: ``stack`` when the servers are enough (the stage starts what else it measures),
        ``services`` when it drives the four services ``flightlog dev`` starts.
    """

    name: str
    title: str
    summary: str
    needs: Literal["stack", "services"]
    run: Callable[[StageContext], Awaitable[None]]


def write_benchmarks_md(report: BenchReport, command: str, path: Path) -> None:
    m = report.machine
    in_sections = {id(f) for s in report.sections for f in s.figures}
    profile = ""
    if report.profiles:
        profile = (
            "\n\n## Where the time goes\n\n"
            "py-spy on each service while a stage loads it: the pipeline's services during the "
            "overload stage, the gateway while it serves the gateway stage's range queries and gets "
            "by id (share of one core running Python code, then the functions with the most self "
            "time; a C extension's time is its Python caller's):\n\n"
            + "\n".join(f"- {line}" for line in report.profiles)
        )
    sections = "".join(
        f"\n\n## {s.title}\n\n{s.method}"
        + (f"\n\n{report.table(s.figures)}" if s.figures else "")
        + (f"\n\n{s.reading}" if s.reading else "")
        + "".join(f"\n\n![{c.alt}]({c.file})" for c in s.charts)
        for s in report.sections
    )
    path.write_text(
        "# Benchmarks\n\n"
        f"Produced by `{command}` on {report.started_at}: {m['cores']} cores, {m['memory_gib']} GiB, "
        f"Python {m['python']}, aiokafka {m['aiokafka']}, "
        + "".join(f"{d} {m[d]}, " for d in ("asyncmy", "aiomysql") if d in m)
        + f"kernel {m['kernel']}. "
        "Kafka, both MariaDB servers, every service and the load generator share the machine.\n\n"
        + report.table([f for f in report.figures if id(f) not in in_sections])
        + "\n\nRatios compare rows/s with rows/s: one message is five lifecycle events and one row. "
        "Webhook latency runs from each POST /v1/events's start to the bench's own receiver on "
        "127.0.0.1 (signatures verified); the IMAP stages sync a generated Dovecot mailbox through "
        "the running ingest service, timed to the rows in the account's shard table and to the "
        "new mail's webhooks; idle accounts are measured on the ingest process (CPU time and RSS). "
        "Figures move by tens of percent between runs on this shared 2-core machine."
        + profile
        + sections
        + "\n"
    )
