"""The bench's charts: the pipeline's ramps drawn as PNG files, linked from BENCHMARKS.md.

- :data:`RAMP_CHART`: throughput (accepted by ingest, queryable) and p50/p99 latency against the
  offered rate, one colour per ramp (one process of transform and persist, two of each).
- :data:`CPU_CHART`: the CPU time per event of each group of processes at every step of each
  ramp, stacked, so the bar's height is what the whole machine spends on an event.

matplotlib draws off screen (the Agg backend) and is imported only when a chart is drawn, so
importing the bench does not pay for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cli.bench.report import BenchReport, RampStep

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CPU_CHART", "RAMP_CHART", "cpu_chart", "ramp_chart", "write_charts"]

RAMP_CHART: Final = "benchmarks-ramp.png"
CPU_CHART: Final = "benchmarks-cpu.png"
DPI: Final = 100


def _new_figure(width_in: float, height_in: float) -> Figure:
    # matplotlib.figure.Figure without pyplot: no global state, no GUI backend chosen
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _k(rate: float) -> str:
    return f"{rate / 1000:g}k"


def ramp_chart(ramps: Mapping[str, Sequence[RampStep]], path: Path) -> None:
    """Throughput and latency against the offered rate; a hollow marker is a step the pipeline
    did not sustain."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    thousands = FuncFormatter(lambda v, _: f"{v:,.0f}")
    fig = _new_figure(12, 4.8)
    tput, lat = fig.subplots(1, 2)
    top = max(s.offered for steps in ramps.values() for s in steps)
    tput.plot([0, top], [0, top], color="0.7", linestyle=":", label="offered")
    for i, (name, steps) in enumerate(ramps.items()):
        colour = f"C{i}"
        x = [s.offered for s in steps]
        for ax, series in (
            (tput, ((f"{name}: queryable", [s.queryable for s in steps], "-"),
                    (f"{name}: accepted by ingest", [s.accepted for s in steps], "--"))),
            (lat, ((f"{name}: p50", [s.p50_ms for s in steps], "-"),
                   (f"{name}: p99", [s.p99_ms for s in steps], "--"))),
        ):  # fmt: skip
            for label, y, style in series:
                ax.plot(x, y, color=colour, linestyle=style, label=label)
                ax.scatter(
                    x, y, color=colour, zorder=3,
                    facecolors=[colour if s.sustained else "white" for s in steps],
                )  # fmt: skip
    tput.set(
        title="Throughput", xlabel="offered (events/s)", ylabel="events/s", xlim=(0, None), ylim=(0, None)
    )
    lat.set(title="Ingest to queryable latency", xlabel="offered (events/s)", ylabel="ms", yscale="log")
    # plain milliseconds at 1-2-5 steps rather than powers of ten
    lat.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    lat.yaxis.set_major_formatter(thousands)
    lat.yaxis.set_minor_formatter(NullFormatter())
    for ax in (tput, lat):
        ax.xaxis.set_major_formatter(thousands)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    tput.yaxis.set_major_formatter(thousands)
    fig.suptitle("Pipeline ramp (hollow marker: not sustained)")
    fig.savefig(path, format="png")


def cpu_chart(ramps: Mapping[str, Sequence[RampStep]], path: Path) -> None:
    """Per ramp, a stacked bar per step of the CPU time each group of processes spent per event."""
    fig = _new_figure(6 * len(ramps) + 1, 4.8)
    axes = fig.subplots(1, len(ramps), sharey=True, squeeze=False)[0]
    groups: list[str] = []
    for steps in ramps.values():
        for s in steps:
            groups += [g for g in s.cpu_us if g not in groups]
    colours = {g: f"C{i}" for i, g in enumerate(groups)}
    for ax, (name, steps) in zip(axes, ramps.items(), strict=True):
        labels = [_k(s.offered) + ("" if s.sustained else "*") for s in steps]
        bottom = [0.0] * len(steps)
        for g in groups:
            heights = [s.cpu_us.get(g, 0.0) for s in steps]
            ax.bar(labels, heights, bottom=bottom, color=colours[g], label=g)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        for x, total in zip(labels, bottom, strict=True):
            ax.annotate(f"{total:,.0f}", (x, total), ha="center", va="bottom", fontsize="small")
        ax.set(title=name, xlabel="offered (events/s; *: not sustained)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("CPU µs per event (user + sys)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles[::-1], names[::-1], fontsize="small", loc="outside right upper")  # top of stack first
    fig.suptitle("CPU time per event, by process, at each ramp step")
    fig.savefig(path, format="png")


def write_charts(report: BenchReport, directory: Path) -> list[Path]:
    """Every chart the report has data for, into ``directory``; the files written."""
    ramps = {name: steps for name, steps in report.ramps.items() if steps}
    if not ramps:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / RAMP_CHART]
    ramp_chart(ramps, written[0])
    if any(s.cpu_us for steps in ramps.values() for s in steps):
        written.append(directory / CPU_CHART)
        cpu_chart(ramps, written[-1])
    return written
