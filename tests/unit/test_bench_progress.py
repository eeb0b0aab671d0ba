"""``flightlog bench``'s progress: a closing line per stage and per step a stage marks (what ran,
how long), in cli.progress's conventions, without a server."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from cli.bench.report import Stage, StageContext
from cli.bench.runner import run_bench
from cli.progress import Steps


async def _fake_stage(ctx: StageContext) -> None:
    for rate in (2_000, 4_000):
        with ctx.step(f"ramp step: {rate:,} events/s") as line:
            line.text = f"ramp {rate:,} events/s: sustained"
    ctx.progress("  a figure: 1 events/s")


async def _failing_stage(ctx: StageContext) -> None:
    with ctx.step("ramp step: 2,000 events/s"):
        raise RuntimeError("the pipeline stopped")


def _steps() -> tuple[Steps, io.StringIO]:
    out = io.StringIO()
    # not a terminal: no spinner, closing lines only (and a "…" line for a step still running)
    return Steps(Console(file=out, width=200, highlight=False), announce_after_s=60), out


async def test_one_closing_line_per_stage_and_per_step_with_its_elapsed_time() -> None:
    steps, out = _steps()
    stages = [Stage(n, n, "", "stack", _fake_stage) for n in ("first", "second")]
    report = await run_bench(lambda line: steps.console.print(line), step=steps, stages=stages)
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "✓ ramp 2,000 events/s: sustained",
        "✓ ramp 4,000 events/s: sustained",
        "  a figure: 1 events/s",
        "✓ stage 1/2: first",
        "✓ ramp 2,000 events/s: sustained",
        "✓ ramp 4,000 events/s: sustained",
        "  a figure: 1 events/s",
        "✓ stage 2/2: second",
    ]
    assert all(line.endswith(" s)") for line in lines if line.startswith("✓"))
    assert report.stages == ["first", "second"]


async def test_a_failing_step_and_its_stage_are_marked() -> None:
    steps, out = _steps()
    with pytest.raises(RuntimeError, match="stopped"):
        await run_bench(
            lambda _: None, step=steps, stages=[Stage("p", "pipeline", "", "stack", _failing_stage)]
        )
    assert out.getvalue().splitlines() == ["✗ ramp step: 2,000 events/s", "✗ stage 1/1: pipeline"]
