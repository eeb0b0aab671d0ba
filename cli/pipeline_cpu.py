"""Each pipeline stage's CPU time per event over a backlog drained in full batches, stage by stage.

``python -m cli.pipeline_cpu [--messages N] [--runs R]`` runs on the local services (``flightlog
services up``, from the working tree to measure) and posts lifecycles shaped as the bench's
(:func:`cli.bench.drive.lifecycle`, 100 messages a request, 8 requests at a time):

1. transform and persist stopped (SIGSTOP): ingest's CPU while it accepts them all;
2. transform continued alone: its CPU until it has committed every event;
3. persist continued: its CPU until every message is queryable and the change relay has
   published every change.

Each stage so works through full batches, as it does at the pipeline's capacity, and the figure
is that process's user+sys time (``/proc/<pid>/stat``) over the events. A step at a fixed rate
(the bench's ramp) charges each stage the smaller batches of a pipeline with time to spare, and
the cost of those depends on how fast the other stages are: what a change to one stage does to its
own cost is clearer here. The first run warms up and is not printed. Figures still move by
several microseconds between runs on a shared machine: compare runs made one after the other.
The pause stays under the services' session timeouts (10 s) for the default message count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.request import urlopen

import aiohttp

from cli.bench.drive import Tenant, lifecycle, make_tenant, post_events
from cli.bench.pipeline import wait_landed
from cli.bench.transform_memory import sample_total
from cli.services import LocalService, LocalServices
from cli.transform_cpu import EVENTS_PER_MESSAGE, cpu_seconds
from libs.config import DatabaseSettings
from libs.shards import ShardRouter

__all__ = ["StageCpu", "measure"]

MESSAGES_PER_REQUEST = 100
POSTERS = 8


@dataclass(frozen=True, slots=True)
class StageCpu:
    events: int
    us_per_event: dict[str, float]  # ingest, transform, persist
    seconds: dict[str, float]  # how long each stage took

    def line(self) -> str:
        return f"{self.events:,} events: " + "  ".join(
            f"{name} {us:.1f} us ({self.seconds[name]:.1f} s)" for name, us in self.us_per_event.items()
        )


def _metric(service: LocalService, name: str) -> float:
    with urlopen(f"{service.management_address}/metrics", timeout=5) as resp:
        return sample_total(resp.read().decode(), name)


async def _until(service: LocalService, name: str, value: float, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (seen := await asyncio.to_thread(_metric, service, name)) < value:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{name} of {service.name} is {seen:,.0f}, not {value:,.0f}, after {timeout_s:.0f} s"
            )
        await asyncio.sleep(0.05)


async def _post(http: aiohttp.ClientSession, url: str, tenant: Tenant, prefix: str, messages: int) -> None:
    t = datetime.now(UTC)
    requests: list[list[dict[str, Any]]] = []
    for first in range(0, messages, MESSAGES_PER_REQUEST):
        events: list[dict[str, Any]] = []
        for n in range(first, min(first + MESSAGES_PER_REQUEST, messages)):
            events += lifecycle(tenant.accounts[n % len(tenant.accounts)], f"{prefix}{n}", t)
        requests.append(events)

    async def poster() -> None:
        while requests:
            await post_events(http, url, tenant.api_key, requests.pop())

    await asyncio.gather(*(poster() for _ in range(POSTERS)))


async def _one_run(
    router: ShardRouter, http: aiohttp.ClientSession, tenant: Tenant, messages: int
) -> StageCpu:
    services = LocalServices().services
    ingest, transform, persist = (services[n] for n in ("ingest", "transform", "persist"))
    pids = {s.name: s.proc.pid() for s in (ingest, transform, persist)}
    if None in pids.values():
        raise RuntimeError(f"not every service runs: {pids}; start them with `flightlog services up`")
    pid = {name: p for name, p in pids.items() if p is not None}
    events = messages * EVENTS_PER_MESSAGE
    prefix = f"cpu{uuid.uuid4().hex[:6]}-"
    transformed = await asyncio.to_thread(_metric, transform, "flightlog_transform_events_total")
    published = await asyncio.to_thread(_metric, persist, "flightlog_relay_changes_published_total")
    cpu: dict[str, float] = {}
    took: dict[str, float] = {}
    os.kill(pid["transform"], signal.SIGSTOP)
    os.kill(pid["persist"], signal.SIGSTOP)
    try:
        try:
            cpu0, started = cpu_seconds(pid["ingest"]), time.monotonic()
            await _post(http, ingest.address, tenant, prefix, messages)
            cpu["ingest"], took["ingest"] = cpu_seconds(pid["ingest"]) - cpu0, time.monotonic() - started
        finally:
            cpu0, started = cpu_seconds(pid["transform"]), time.monotonic()
            os.kill(pid["transform"], signal.SIGCONT)
        await _until(transform, "flightlog_transform_events_total", transformed + events)
        cpu["transform"], took["transform"] = cpu_seconds(pid["transform"]) - cpu0, time.monotonic() - started
    finally:
        cpu0, started = cpu_seconds(pid["persist"]), time.monotonic()
        os.kill(pid["persist"], signal.SIGCONT)
    await wait_landed(router, tenant.accounts, prefix, messages)
    await _until(persist, "flightlog_relay_changes_published_total", published + messages)
    cpu["persist"], took["persist"] = cpu_seconds(pid["persist"]) - cpu0, time.monotonic() - started
    return StageCpu(events, {name: s / events * 1e6 for name, s in cpu.items()}, took)


async def measure(messages: int, runs: int) -> list[StageCpu]:
    """``runs`` measured runs of ``messages`` lifecycles each, after one to warm up."""
    db = DatabaseSettings()
    tenant = await make_tenant(db, accounts_per_shard=4)
    out = []
    async with ShardRouter(db) as router, aiohttp.ClientSession() as http:
        for run in range(runs + 1):
            result = await _one_run(router, http, tenant, messages)
            if run:
                print(result.line(), flush=True)
                out.append(result)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000, help="lifecycles of five events each")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(measure(args.messages, args.runs))


if __name__ == "__main__":
    main()
