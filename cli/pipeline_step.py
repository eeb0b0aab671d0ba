"""One step of the bench's pipeline ramp on the running local services: what every process spends.

``python -m cli.pipeline_step [--rate R] [--seconds S] [--runs N]`` (on ``flightlog services up``,
from the working tree to measure) offers ``R`` events/s for ``S`` seconds ``N`` times, each run a
step of ``flightlog bench``'s ramp (:func:`cli.bench.pipeline.ramp_step`: the same lifecycles,
charged every process's CPU until the step's last message is queryable). Beside the step's
figures, the statements the MariaDB primaries ran a second over it (their ``Questions``): what a
change to persist's writer or to the change relay does to the database shows there first.

Quicker than the bench (one rate, the services already up) for comparing two versions of a stage
at the rates that matter: run it on each, one after the other. At 8,000 events/s for 20 s, runs
of the same code agree within about 5 % in total CPU per event.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp

from cli.bench.drive import make_tenant
from cli.bench.pipeline import pipeline_processes, ramp_step
from cli.services import SERVICE_PORTS
from libs.config import DatabaseSettings
from libs.db import connect
from libs.shards import ShardRouter

__all__ = ["statements_run"]


async def statements_run(db: DatabaseSettings, router: ShardRouter) -> int:
    """The statements the primaries of the shard map have run since they started."""
    total = 0
    for cluster in router.shard_map.clusters.values():
        async with connect(db, *cluster.primary) as conn, conn.cursor() as cur:
            await cur.execute("SHOW GLOBAL STATUS LIKE 'Questions'")
            row = await cur.fetchone()
            total += int(row[1]) if row is not None else 0
    return total


async def measure(rate: int, seconds: float, runs: int) -> None:
    db = DatabaseSettings()
    # as the bench's pipeline stage: ingest's per-account limit stays above the rate
    tenant = await make_tenant(db, accounts_per_shard=4)
    groups = pipeline_processes()
    url = f"http://127.0.0.1:{SERVICE_PORTS['ingest']}"
    async with ShardRouter(db) as router, aiohttp.ClientSession() as http:
        for _ in range(runs):
            asked, began = await statements_run(db, router), time.monotonic()
            step = await ramp_step(router, http, url, tenant, rate, seconds, 2.0, groups)
            per_s = (await statements_run(db, router) - asked) / (time.monotonic() - began)
            costs = ", ".join(f"{name} {us:.1f}" for name, us in step.cpu_us.items())
            print(
                f"{rate:,} events/s for {seconds:.0f} s: queryable {step.queryable:,.0f}/s, p50"
                f" {step.p50_ms:,.0f} ms, p99 {step.p99_ms:,.0f} ms, MariaDB primaries {per_s:,.0f}"
                f" statements/s; CPU us/event: {costs}, total {sum(step.cpu_us.values()):.1f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=int, default=8_000, help="events/s offered")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(measure(args.rate, args.seconds, args.runs))


if __name__ == "__main__":
    main()
