"""The bench's charts (cli.bench.charts) and the pipeline's report rows built from its ramps
(cli.bench.pipeline): files that are valid PNGs, rows that say what each process costs, and the
sections BENCHMARKS.md shows them in, all without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cli.bench.charts import CPU_CHART, RAMP_CHART, write_charts
from cli.bench.pipeline import (
    ONE_EACH,
    TWO_EACH,
    cpu_figures,
    cpu_section,
    ramp_table,
    scaling_section,
)
from cli.bench.report import BenchReport, Chart, RampStep, Section, write_benchmarks_md

MACHINE = {
    "cores": 2,
    "memory_gib": 23.5,
    "python": "3.11.7",
    "kernel": "6",
    "aiokafka": "0.14",
    "aiomysql": "0.3",
}


def _step(offered: int, sustained: bool = True, scale: float = 1.0) -> RampStep:
    cpu_us = {"ingest": 60.0 * scale, "transform": 50.0 * scale, "persist": 40.0 * scale, "Kafka": 30.0}
    return RampStep(
        offered=offered,
        accepted=offered * (1.0 if sustained else 0.9),
        queryable=offered * (0.98 if sustained else 0.7),
        backlog_s=0.3 if sustained else 4.0,
        sustained=sustained,
        events=offered * 10,
        p50_ms=40.0 + offered / 1000,
        p99_ms=200.0 + offered / 100,
        cpu_us=cpu_us,
        cores={name: us * offered / 1e6 for name, us in cpu_us.items()},
        rest_cores=0.25,
    )


ONE = [_step(2_000, scale=1.5), _step(4_000), _step(6_000, sustained=False)]
TWO = [_step(2_000, scale=1.6), _step(4_000, scale=1.1), _step(6_000), _step(8_000, sustained=False)]


def _report() -> BenchReport:
    report = BenchReport(started_at="2026-12-01T00:00:00+00:00", machine=MACHINE)
    report.ramps = {ONE_EACH: ONE, TWO_EACH: TWO}
    return report


def _valid_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()  # checks the chunks' CRCs
    with Image.open(path) as image:
        assert image.format == "PNG"
        size: tuple[int, int] = image.size
        return size


def test_both_charts_are_written_as_valid_pngs(tmp_path: Path) -> None:
    written = write_charts(_report(), tmp_path / "out")
    assert [p.name for p in written] == [RAMP_CHART, CPU_CHART]
    for path in written:
        width, height = _valid_png(path)
        assert width >= 600 and height >= 300


def test_no_ramp_no_chart_and_no_cpu_figures_no_cpu_chart(tmp_path: Path) -> None:
    empty = BenchReport(started_at="x", machine=MACHINE)
    assert write_charts(empty, tmp_path) == []
    empty.ramps = {ONE_EACH: []}
    assert write_charts(empty, tmp_path) == []
    without_cpu = BenchReport(started_at="x", machine=MACHINE)
    without_cpu.ramps = {ONE_EACH: [RampStep(2_000, 2_000, 1_990, 0.1, True, 20_000, 40, 90)]}
    assert [p.name for p in write_charts(without_cpu, tmp_path)] == [RAMP_CHART]
    _valid_png(tmp_path / RAMP_CHART)
    assert not (tmp_path / CPU_CHART).exists()


def test_cpu_rows_are_those_of_the_highest_sustained_step() -> None:
    figures = {f.stage: f for f in cpu_figures(ONE)}
    assert list(figures) == [
        "CPU per event, ingest",
        "CPU per event, transform",
        "CPU per event, persist",
        "CPU per event, Kafka",
        "CPU per event, all of the above",
    ]
    assert figures["CPU per event, ingest"].value == 60.0  # the 4,000 step, not the 2,000 one
    assert figures["CPU per event, ingest"].unit == "µs"
    assert "at 4,000 events/s (40,000 events)" in figures["CPU per event, ingest"].note
    assert "0.24 cores" in figures["CPU per event, ingest"].note
    total = figures["CPU per event, all of the above"]
    assert total.value == 180.0
    assert "5,556 events/s per core" in total.note
    assert "0.72 of the machine's" in total.note and "other processes) 0.25 more" in total.note


def test_cpu_rows_when_no_step_was_sustained_say_so() -> None:
    figures = cpu_figures([_step(2_000, sustained=False)])
    assert "did not sustain" in figures[0].note
    assert cpu_figures([]) == []


def test_the_sections_in_benchmarks_md(tmp_path: Path) -> None:
    report = _report()
    cpu_section(report, ONE, lambda _: None)
    scaling_section(report, ONE, TWO, lambda _: None)
    by_stage = {f.stage: f for f in report.figures}
    assert by_stage[f"highest sustained rate, {ONE_EACH}"].value == 4_000
    two = by_stage[f"highest sustained rate, {TWO_EACH}"]
    assert two.value == 6_000 and two.note == "1.50x one of each"
    # the stages' cost at the highest rate both sustained, one process beside two
    transform = by_stage["CPU per event at 4,000 events/s, transform, two processes"]
    assert transform.value == pytest.approx(55.0)
    assert "one process: 50.0 µs" in transform.note

    path = tmp_path / "BENCHMARKS.md"
    write_benchmarks_md(report, "flightlog bench --write-md", path)
    text = path.read_text()
    main, cpu, scaling = text.split("\n## ")[0], *text.split("\n## ")[1:]
    assert "CPU per event" not in main  # the sections' rows are in their own tables
    assert cpu.startswith("CPU per event, by process\n")
    assert "| CPU per event, ingest | 60.00 µs |" in cpu
    assert f"![CPU time per event of each process at every ramp step]({CPU_CHART})" in cpu
    assert scaling.startswith("Scaling by partitions\n")
    assert "| highest sustained rate, two transforms, two persists | 6,000 events/s |" in scaling
    busy = "one transform, one persist 0.72 at 4,000 events/s; two transforms, two persists 1.08 at 6,000"
    assert busy in scaling

    data = json.loads(report.to_json())
    assert [s["offered"] for s in data["ramps"][TWO_EACH]] == [2_000, 4_000, 6_000, 8_000]
    assert data["ramps"][ONE_EACH][1]["cpu_us"]["ingest"] == 60.0
    assert data["sections"][0]["charts"] == [CPU_CHART]


def test_a_section_without_figures_has_no_empty_table(tmp_path: Path) -> None:
    report = _report()
    report.sections.append(
        Section("Ramp", "How.", reading=ramp_table(report.ramps), charts=[Chart(RAMP_CHART, "r")])
    )
    path = tmp_path / "BENCHMARKS.md"
    write_benchmarks_md(report, "flightlog bench --write-md", path)
    section = path.read_text().split("\n## Ramp\n")[1]
    assert section.startswith("\nHow.\n\n| processes | offered |")
    assert "| stage | figure |" not in section
    assert section.endswith(f"\n\n![r]({RAMP_CHART})\n")


def test_ramp_table_has_a_row_per_step_of_each_ramp() -> None:
    rows = ramp_table({ONE_EACH: ONE, TWO_EACH: TWO}).splitlines()
    assert len(rows) == 2 + len(ONE) + len(TWO)
    assert rows[2].startswith(
        f"| {ONE_EACH} | 2,000 events/s | 2,000/s | 1,960/s | 0.30 s | 42 ms | 220 ms |"
    )
    assert rows[2].endswith("| 255 µs | sustained |")
    assert rows[4].endswith("| falling behind |")


def test_a_ramp_that_sustained_its_top_says_its_limit_is_higher() -> None:
    report = _report()
    scaling_section(report, ONE, [_step(2_000), _step(4_000)], lambda _: None)
    by_stage = {f.stage: f for f in report.figures}
    assert "the ramp's top" not in by_stage[f"highest sustained rate, {ONE_EACH}"].note
    assert by_stage[f"highest sustained rate, {TWO_EACH}"].note == (
        "1.00x one of each; the ramp's top, sustained: the limit is above it"
    )
