"""The bench's report model and BENCHMARKS.md: a stage's section follows the main table with its
own figures, so a full run writes what used to be added by hand."""

from __future__ import annotations

import json
from pathlib import Path

from cli.bench.report import BenchReport, Figure, Section, write_benchmarks_md
from cli.bench.transform_memory import Memory, Restore, TransformMemoryRun, section_method, section_reading

MACHINE = {
    "cores": 2,
    "memory_gib": 23.5,
    "python": "3.11.7",
    "kernel": "6",
    "aiokafka": "0.14",
    "aiomysql": "0.3",
}


def _report() -> BenchReport:
    report = BenchReport(started_at="2026-12-01T00:00:00+00:00", machine=MACHINE)
    report.add(Figure("raw MariaDB batched upsert (500 rows/txn)", 9_659, "rows/s"), lambda _: None)
    section = Section("Transform memory", method="How it measured.", reading="What it shows.")
    report.sections.append(section)
    report.add(Figure("transform restore after a restart", 0.17, "s"), lambda _: None, section)
    return report


def test_a_sections_figures_are_in_its_own_table_not_the_main_one(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    write_benchmarks_md(_report(), "flightlog bench --write-md", path)
    text = path.read_text()
    main, section = text.split("\n## Transform memory\n")
    assert "raw MariaDB batched upsert" in main and "transform restore" not in main
    assert section.startswith("\nHow it measured.\n\n| stage |")
    assert "| transform restore after a restart | 0.17 s |" in section
    assert text.endswith("\n\nWhat it shows.\n")


def test_the_json_keeps_every_figure_and_names_the_sections() -> None:
    data = json.loads(_report().to_json())
    assert [f["stage"] for f in data["figures"]] == [
        "raw MariaDB batched upsert (500 rows/txn)",
        "transform restore after a restart",
    ]
    assert data["sections"][0]["figures"] == ["transform restore after a restart"]


def test_the_transform_memory_section_is_written_from_the_run() -> None:
    mib = 2**20
    run = TransformMemoryRun(
        messages=20_000, warmup=2_000, body_bytes=50_000, ready=Memory(72 * mib, 72 * mib),
        warm=Memory(97 * mib, 99 * mib), end=Memory(105 * mib, 111 * mib), peak_rss_bytes=111 * mib,
        run_s=17.0, final_state_ttl_s=1.0, sweep_interval_s=0.5, peak_live_in_memory=1_695,
        live_at_end=1_482, live_after_sweep=0, sweep_wait_s=1.0, changelog_records=40_000,
        restore=Restore(states=0, seconds=0.17, ready_s=0.8, rss_bytes=91 * mib),
    )  # fmt: skip
    method = section_method(run)
    assert "`FLIGHTLOG_TRANSFORM_FINAL_STATE_TTL_S=1`" in method and "20,000 messages" in method
    assert "warm-up (2,000 messages)" in method
    reading = section_reading(run)
    assert "RSS grew 8.0 MiB over the 18,000 messages" in reading
    assert "858.3 MiB" in reading  # 18,000 bodies of 50 KB, had they been kept
    assert "0 states from 40,000 changelog records" in reading
    assert "delete.retention.ms 3600000" in reading  # from the topic's own config
