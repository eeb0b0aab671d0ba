"""Transform's CPU time per event: one transform process over inflight events of its own.

Reuses :class:`cli.bench.transform_memory.TransformUnderTest` (a real ``python -m
services.transform`` on topics, group and transactional id of its own) and feeds it the
pipeline bench's workload: messages of five outbound lifecycle events (accepted with the
content, queued, sending, sent, delivered), encoded as ingest puts them on inflight. The figure
is the process's user+sys CPU time (``/proc/<pid>/stat``) from the first event produced until
transform committed the last, divided by the events.

Two feeds: ``backlog`` produces every event while transform is stopped (SIGSTOP, shorter than its
session timeout) and then lets it drain them in full batches; ``paced`` produces at ``--rate``
events/s, so batches are as small as a transform that keeps up sees them. ``--profile`` also runs
py-spy over the measured period and prints the functions with the most self time.

Not a ``flightlog bench`` stage: it borrows the transform-memory stage's machinery, and a stage
imports no other (``cli/bench/__init__.py``), so it sits beside the bench. Runnable alone:
``python -m cli.transform_cpu [--messages N] [--feed backlog|paced] [--rate R] [--profile DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cli.bench.drive import lifecycle
from cli.bench.profile import parse_collapsed
from cli.bench.transform_memory import TransformUnderTest, sample_total
from libs.config import KafkaSettings, StackSettings
from libs.events import Event, encode, message_key_bytes
from libs.kafka import make_producer

__all__ = ["CpuRun", "bench_transform_cpu", "cpu_seconds", "workload"]

ACCOUNT: Final = 5 << 48 | 78
EVENTS_PER_MESSAGE: Final = 5
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User+sys CPU time of ``pid`` so far (its threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14, 15)


def workload(first: int, count: int, prefix: str) -> list[tuple[bytes, bytes]]:
    """(key, value) of the events of messages ``first`` .. ``first + count - 1``, as ingest encodes them."""
    now = datetime.now(UTC)
    out = []
    for i in range(first, first + count):
        for raw in lifecycle(ACCOUNT, f"{prefix}{i}", now):
            event = Event.model_validate({**raw, "received_at": now})
            out.append((message_key_bytes(event.account_id, event.message_key), encode(event)))
    return out


@dataclass(frozen=True, slots=True)
class CpuRun:
    feed: str
    events: int
    cpu_s: float
    wall_s: float
    batches: int
    top: list[tuple[str, float]]

    def lines(self) -> list[str]:
        out = [
            f"feed {self.feed}: {self.events:,} events, {self.batches:,} transactions "
            f"({self.events / max(self.batches, 1):,.0f} events each)",
            f"transform CPU {self.cpu_s:.2f} s = {self.cpu_s / self.events * 1e6:.1f} us/event; "
            f"wall {self.wall_s:.2f} s ({self.events / self.wall_s:,.0f} events/s)",
        ]
        out += [f"  {share:5.1%}  {name}" for name, share in self.top]
        return out


async def _produce(kafka: KafkaSettings, topic: str, records: list[tuple[bytes, bytes]], rate: float) -> None:
    """Send ``records`` at ``rate`` events/s (0: as fast as possible)."""
    async with make_producer(kafka, linger_ms=5) as producer:
        started = time.monotonic()
        sends = []
        for n, (key, value) in enumerate(records):
            sends.append(await producer.send(topic, value, key=key))
            if rate and n % 100 == 99 and (ahead := (n + 1) / rate - (time.monotonic() - started)) > 0:
                await asyncio.sleep(ahead)
        await asyncio.gather(*sends)


async def _committed(t: TransformUnderTest) -> tuple[float, float]:
    """(events committed, transactions committed) since the process started."""
    text = await t.metrics()
    return (
        sample_total(text, "flightlog_transform_events_total"),
        sample_total(text, "flightlog_transform_batch_seconds_count"),
    )


async def _wait_for(t: TransformUnderTest, events: float, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while (done := (await _committed(t))[0]) < events:
        if time.monotonic() > deadline:
            raise RuntimeError(f"transform committed {done:,.0f} of {events:,.0f} events; see {t.log_file}")
        await asyncio.sleep(0.05)
    return done


async def bench_transform_cpu(
    kafka: KafkaSettings,
    state_dir: Path,
    *,
    messages: int,
    feed: str,
    rate: float,
    profile_dir: Path | None,
    warmup: int = 1000,
) -> CpuRun:
    async with TransformUnderTest(
        kafka, state_dir, body_bytes=0, final_state_ttl_s=3600.0, sweep_interval_s=5.0, partitions=6,
        name="tcpu",
    ) as t:  # fmt: skip
        pid = t.service.proc.pid()
        assert pid is not None
        await _produce(kafka, t.inflight, workload(0, warmup, t.prefix), 0)
        base = await _wait_for(t, warmup * EVENTS_PER_MESSAGE, 120)
        records = workload(warmup, messages, t.prefix)
        _, batches0 = await _committed(t)
        spy = None
        if profile_dir is not None:
            await asyncio.to_thread(profile_dir.mkdir, parents=True, exist_ok=True)
            spy = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid),
                "--rate", "200", "--format", "raw",
                "--output", str(profile_dir / "transform.collapsed.txt"), "--nonblocking",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            await asyncio.sleep(1)
        if feed == "backlog":
            os.kill(pid, signal.SIGSTOP)
            try:
                stopped = time.monotonic()
                await _produce(kafka, t.inflight, records, 0)
                if time.monotonic() - stopped > 5:
                    print("warning: producing outlasted 5 s; transform may have left its group")
            finally:
                cpu0, wall0 = cpu_seconds(pid), time.monotonic()
                os.kill(pid, signal.SIGCONT)
        else:
            cpu0, wall0 = cpu_seconds(pid), time.monotonic()
            await _produce(kafka, t.inflight, records, rate)
        await _wait_for(t, base + len(records), max(120.0, len(records) / 500))
        cpu1, wall1 = cpu_seconds(pid), time.monotonic()
        _, batches1 = await _committed(t)
        top: list[tuple[str, float]] = []
        if spy is not None and profile_dir is not None:
            spy.send_signal(signal.SIGINT)
            await spy.wait()
            text = await asyncio.to_thread((profile_dir / "transform.collapsed.txt").read_text)
            _, top = parse_collapsed(text, top=15)
        return CpuRun(feed, len(records), cpu1 - cpu0, wall1 - wall0, round(batches1 - batches0), top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="messages of five events each")
    parser.add_argument("--feed", choices=("backlog", "paced"), default="backlog")
    parser.add_argument("--rate", type=float, default=5000.0, help="events/s of the paced feed")
    parser.add_argument("--profile", type=Path, default=None, help="run py-spy, write its output here")
    args = parser.parse_args()
    run = asyncio.run(
        bench_transform_cpu(
            KafkaSettings(), StackSettings().state_dir, messages=args.messages, feed=args.feed,
            rate=args.rate, profile_dir=args.profile,
        )
    )  # fmt: skip
    print("\n".join(run.lines()))


if __name__ == "__main__":
    main()
