"""Range queries and get-by-id through the gateway beside the same SQL straight against MariaDB.

``python -m cli.bench.gateway`` seeds an account with ``messages`` rows (persist's own writer),
starts a gateway process (or uses ``--gateway``), then runs ``concurrency`` workers for
``duration_s`` each way: GET /v1/accounts/{id}/messages?limit=50&before=<random time> beside the
statement the gateway runs for it (:func:`services.gateway.messages.list_statement`) over each
driver the bench compares (:mod:`cli.bench.rawsql`), then GET /v1/messages/{random id} beside its
SELECT by primary key. ``flightlog bench``'s gateway stage runs :func:`bench_gateway` against the
gateway ``flightlog dev`` started.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

from cli.bench import cpu
from cli.bench.profile import ServiceProfile, profile_services
from cli.bench.rawsql import DRIVERS, raw_pool
from cli.bench.report import Figure, Stage, StageContext
from cli.services import LocalService, LocalServices
from libs.accounts import create_account, create_application
from libs.config import DatabaseSettings, StackSettings
from libs.events import Direction, MessageDoc, Participant, PostflightRecord, Status
from libs.ids import shard_of
from libs.messages import DETAIL_COLUMNS
from libs.shards import ShardRouter
from services.gateway.messages import MessageQuery, list_statement
from services.persist.writer import write_shard

__all__ = ["STAGE", "GatewayBench", "RangeResult", "bench_gateway"]

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class RangeResult:
    label: str
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    cpu_us: dict[str, float] = field(default_factory=dict)  # CPU time per request, by process group
    profile: ServiceProfile | None = None  # py-spy over the gateway while this ran

    @property
    def per_s(self) -> float:
        return self.requests / self.duration_s

    def line(self) -> str:
        return (
            f"{self.label:<10} {self.per_s:9.0f} req/s  p50 {self.p50_ms:6.2f} ms  p99 {self.p99_ms:6.2f} ms"
            f"   ({self.requests} requests)"
        )


async def _seed(router: ShardRouter, messages: int) -> tuple[int, str]:
    app, key = await create_application(router, f"bench-{uuid.uuid4().hex[:8]}")
    account = await create_account(router, app.id, "bench@example.test")
    shard = shard_of(account.id)
    batch: list[PostflightRecord] = []
    for i in range(messages):
        doc = MessageDoc(
            status=Status.DELIVERED,
            direction=Direction.OUTBOUND,
            channel="email",
            sender=Participant(email="sender@example.test"),
            to=[Participant(email=f"r{i % 10}@example.test")],
            subject=f"subject {i}",
            snippet=f"snippet {i}",
            body_text="body " * 40,
            occurred_at=T0 + timedelta(seconds=i * 60),
        )
        batch.append(PostflightRecord(account_id=account.id, message_key=f"b{i:06d}", version=1, message=doc))
        if len(batch) == 500:
            await write_shard(router, shard, batch)
            batch = []
    if batch:
        await write_shard(router, shard, batch)
    return account.id, key


def _random_before(messages: int) -> datetime:
    return T0 + timedelta(seconds=random.randrange(60, messages * 60))


async def _drive(
    label: str,
    one: Callable[[], Awaitable[None]],
    concurrency: int,
    duration_s: float,
    *,
    groups: Mapping[str, Sequence[int]] | None = None,
    profile: tuple[str, int, Path] | None = None,
) -> RangeResult:
    """``concurrency`` workers calling ``one`` for ``duration_s``; the CPU time of ``groups`` per
    request over the run, and py-spy over the process ``profile`` names (the profile's name, the
    pid, the output folder)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - start)

    before = await asyncio.to_thread(cpu.sample, groups or {})
    started = time.perf_counter()
    sampled: list[ServiceProfile] = []
    if profile is not None:
        name, pid, out_dir = profile
        # the middle of the run: past the first requests, done before the workers stop
        seconds = max(1.0, duration_s - 2.0)
        spy = profile_services({name: pid}, seconds, out_dir)
        (_, sampled) = await asyncio.gather(asyncio.gather(*(worker() for _ in range(concurrency))), spy)
    else:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    used = cpu.usage(before, await asyncio.to_thread(cpu.sample, groups or {}))
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    per_request = used.per_event_us(len(ms)) if ms else {}
    return RangeResult(
        label, len(ms), elapsed, statistics.median(ms), p99, per_request, sampled[0] if sampled else None
    )


@dataclass(frozen=True, slots=True)
class GatewayBench:
    range_gateway: RangeResult
    get_gateway: RangeResult
    range_direct: dict[str, RangeResult]  # by driver
    get_direct: dict[str, RangeResult]

    def fastest(self, direct: dict[str, RangeResult]) -> tuple[str, RangeResult]:
        driver = max(direct, key=lambda d: direct[d].per_s)
        return driver, direct[driver]


async def bench_gateway(
    gateway_url: str,
    settings: DatabaseSettings,
    *,
    messages: int = 10_000,
    concurrency: int = 16,
    duration_s: float = 10.0,
    page: int = 50,
    gateway_pid: int | None = None,
    profile_dir: Path | None = None,
) -> GatewayBench:
    """Range queries and get-by-id, each through the gateway and as the same SQL straight to
    MariaDB with each driver of :data:`cli.bench.rawsql.DRIVERS`, at the same concurrency against
    one seeded account. Each run charges the CPU time of the gateway (``gateway_pid``, when
    given), the stack's servers and the bench itself per request; with ``profile_dir`` py-spy
    samples the gateway while it serves each kind of request."""
    groups = {**({"gateway": [gateway_pid]} if gateway_pid is not None else {}), **cpu.stack_groups()}

    def spy(name: str) -> tuple[str, int, Path] | None:
        if gateway_pid is None or profile_dir is None:
            return None
        return name, gateway_pid, profile_dir

    async with ShardRouter(settings) as router:
        account_id, key = await _seed(router, messages)
        shard = shard_of(account_id)
        cluster = router.shard_map.cluster_of(shard)
        table = router.table(shard, "messages")
        async with raw_pool(DRIVERS[0], settings, *cluster.primary, size=1) as query:
            found = await query(f"SELECT id FROM {table} WHERE account_id = %s", (account_id,))
        ids = [int(r[0]) for r in found]
        headers = {"Authorization": f"Bearer {key}"}
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, headers=headers) as http:

            async def gateway_get(url: str, params: dict[str, str] | None = None) -> None:
                async with http.get(url, params=params) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"gateway answered {resp.status}: {await resp.text()}")
                    await resp.read()

            async def range_via_gateway() -> None:
                params = {"limit": str(page), "before": _random_before(messages).isoformat()}
                await gateway_get(f"{gateway_url}/v1/accounts/{account_id}/messages", params)

            async def get_via_gateway() -> None:
                await gateway_get(f"{gateway_url}/v1/messages/{random.choice(ids)}")

            await _drive("warm-up", range_via_gateway, concurrency, 1.0)
            range_gateway, get_gateway = [
                await _drive("gateway", one, concurrency, duration_s, groups=groups, profile=spy(name))
                for name, one in (("gateway-range", range_via_gateway), ("gateway-get", get_via_gateway))
            ]

        get_sql = f"SELECT {', '.join(DETAIL_COLUMNS)} FROM {table} WHERE id = %s AND deleted = 0"
        range_raw: dict[str, RangeResult] = {}
        get_raw: dict[str, RangeResult] = {}
        for driver in DRIVERS:
            async with raw_pool(driver, settings, *cluster.primary, size=concurrency) as query:

                async def range_direct() -> None:
                    before = _random_before(messages).astimezone(UTC).replace(tzinfo=None)
                    await query(*list_statement(router, MessageQuery(account_id, limit=page, before=before)))

                async def get_direct() -> None:
                    await query(get_sql, (random.choice(ids),))

                await _drive("warm-up", range_direct, concurrency, 1.0)
                range_raw[driver] = await _drive(driver, range_direct, concurrency, duration_s, groups=groups)
                get_raw[driver] = await _drive(driver, get_direct, concurrency, duration_s, groups=groups)
    return GatewayBench(range_gateway, get_gateway, range_raw, get_raw)


def _cpu_note(result: RangeResult) -> str:
    """Where a run's CPU time went, per request, by process group."""
    spent = ", ".join(f"{name} {us:,.0f} µs" for name, us in result.cpu_us.items())
    return f"CPU per request: {spent}" if spent else "CPU per request: not measured"


async def gateway_stage(ctx: StageContext) -> None:
    gateway_pid = LocalServices().services["gateway"].proc.pid()
    gw = await bench_gateway(
        ctx.gateway_url,
        ctx.db,
        duration_s=5.0 if ctx.quick else 10.0,
        gateway_pid=gateway_pid,
        profile_dir=ctx.profile_dir,
    )
    for what, through, direct in (
        ("range query (16 concurrent, 50 rows)", gw.range_gateway, gw.range_direct),
        ("get by id (16 concurrent)", gw.get_gateway, gw.get_direct),
    ):
        for driver, result in direct.items():
            ctx.report.add(
                Figure(
                    f"raw {what}, same SQL straight to MariaDB, {driver}",
                    result.per_s,
                    "req/s",
                    note=f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms; {_cpu_note(result)}",
                ),
                ctx.progress,
            )
        fastest, raw = gw.fastest(direct)
        ctx.report.add(
            Figure(
                f"{what} through the gateway",
                through.per_s,
                "req/s",
                limit=f"{raw.per_s:,.0f} req/s direct ({fastest}, the fastest driver)",
                ratio=through.per_s / raw.per_s,
                note=f"p50 {through.p50_ms:.1f} ms, p99 {through.p99_ms:.1f} ms; {_cpu_note(through)}",
            ),
            ctx.progress,
        )
        if through.profile is not None:
            ctx.report.profiles.append(through.profile.line())


STAGE = Stage(
    "gateway",
    "gateway",
    "range queries and get by id through the gateway beside the same SQL straight to MariaDB",
    "services",
    gateway_stage,
)


async def _main(args: argparse.Namespace) -> None:
    settings = DatabaseSettings()
    svc = None
    url = args.gateway
    if url is None:
        # range queries only: no webhook dispatcher competing for the core (or for the lock)
        svc = LocalService(
            "gateway",
            args.port,
            StackSettings().state_dir,
            env={"FLIGHTLOG_WEBHOOKS_DISPATCHER_IN_GATEWAY": "false"},
            instance=args.instance,
            processes=args.processes,
        )
        svc.start(wait_s=60)
        url = svc.address
    try:
        result = await bench_gateway(
            url,
            settings,
            messages=args.messages,
            concurrency=args.concurrency,
            duration_s=args.duration_s,
            gateway_pid=None if svc is None else svc.proc.pid(),
            profile_dir=args.profile,
        )
    finally:
        if svc is not None:
            svc.stop(timeout_s=20)
    for what, through, direct in (
        (f"range queries, limit 50, {args.messages} messages", result.range_gateway, result.range_direct),
        ("get by id", result.get_gateway, result.get_direct),
    ):
        print(f"{what}, concurrency {args.concurrency}")
        for run in (through, *direct.values()):
            print(run.line())
            print(f"           {_cpu_note(run)}")
            if run.profile is not None:
                print(f"           {run.profile.line()}")
        fastest, raw = result.fastest(direct)
        print(f"gateway / raw ({fastest}): {through.per_s / raw.per_s:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", help="a running gateway's base URL (default: start one on --port)")
    parser.add_argument("--port", type=int, default=8291, help="the port of the gateway started")
    parser.add_argument("--instance", default="-bench", help="its name's suffix (pid file, log)")
    parser.add_argument("--processes", type=int, default=1, help="gateway processes sharing the port")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--profile", type=Path, help="a folder for py-spy profiles of the gateway started")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
