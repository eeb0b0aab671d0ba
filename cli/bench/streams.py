"""Idle delta streams through the running gateway: ``flightlog bench``'s streams stage.

``streams`` SSE streams (GET /v1/accounts/{id}/delta/stream) and ``long_polls`` long-poll loops
(GET /v1/accounts/{id}/delta?timeout=30, each asking again with its next cursor) are spread over
``accounts`` fresh accounts on every shard. The gateway's and the MariaDB primaries' CPU time
(``/proc/<pid>/stat``) is read over a window before the streams open (the baseline: the rest of
the stack idling) and over ``window_s`` with every stream open and nothing changing: the
gateway's whole share of a core then bounds what the idle streams cost it, and the primaries'
difference says what they cost the database (noisy: other clients share the servers). The
gateway's counters of delta reads and notifier checks (on /metrics, where the gateway has them)
and the servers' ``Questions`` say how many queries ran.

Then ``rounds`` messages are posted, one at a time, each to one account with open streams,
through ingest (its whole outbound lifecycle in one request, accepted to delivered: transform
sends a message to postflight only once it is final): transform and persist carry it as in
production, where persist's commit wakes its change relay. The time from the change row's write
(``changes.created_at``, the server's clock on this machine) until each of the account's streams
and long-polls received its delta is the change-to-stream latency; from the POST's start, the
event-to-stream latency. p50 and p99 over every (message, stream) pair. A stream that has not
received a change after ``deliver_timeout_s`` counts as missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import aiohttp
import orjson

from cli.bench.drive import lifecycle, post_events
from cli.bench.report import Figure, Stage, StageContext
from cli.services import LocalServices, management_address
from cli.stack import Stack
from libs.accounts import create_account, create_application
from libs.config import DatabaseSettings
from libs.db import connect
from libs.ids import shard_of
from libs.service import raise_open_files_limit
from libs.shards import ShardRouter

__all__ = ["STAGE", "StreamsBench", "bench_streams"]

LONG_POLL_S: Final = 30
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
# the gateway's own counters of its delta reads and notifier safety checks (absent before them)
_COUNTERS = {
    name: re.compile(rb"^flightlog_gateway_delta_" + name.encode() + rb"_total (\S+)$", re.MULTILINE)
    for name in ("reads", "checks")
}


def _cpu_seconds(pid: int) -> float:
    # utime and stime: the 14th and 15th fields, counted after the parenthesised command name
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


@dataclass(frozen=True, slots=True)
class StreamsBench:
    streams: int
    long_polls: int
    accounts: int
    window_s: float
    gateway_baseline: float  # share of one core, before the streams opened
    gateway_idle: float  # with every stream open, nothing changing
    mariadb_baseline: float  # the primaries together
    mariadb_idle: float
    questions_baseline_per_s: float  # the primaries' Questions, every client of the stack
    questions_idle_per_s: float
    reads_per_s: float | None  # the gateway's delta reads in the idle window; None: no counter
    checks_per_s: float | None  # the notifier's safety checks (a query each) in the idle window
    latencies_ms: list[float]  # from the change row's write to each stream
    event_latencies_ms: list[float]  # from the POST /v1/events to each stream
    missed: int
    connect_s: float

    def percentile_ms(self, q: float, *, from_event: bool = False) -> float:
        ms = sorted(self.event_latencies_ms if from_event else self.latencies_ms)
        if not ms:
            return float("nan")
        return ms[min(len(ms) - 1, int(len(ms) * q))]


@dataclass
class _Receipts:
    """When each stream received each message key: (key -> receive times), plus who is connected."""

    connected: int = 0
    got: dict[str, list[float]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, key: str) -> None:
        self.got.setdefault(key, []).append(time.time())
        self.arrived.set()

    def delta(self, data: bytes) -> None:
        obj = orjson.loads(data).get("object") or {}
        if (key := obj.get("message_key")) is not None:
            self.add(key)

    async def wait_for(self, key: str, count: int, timeout_s: float) -> None:
        """Until ``count`` streams received ``key``, or ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while len(self.got.get(key, ())) < count:
                    self.arrived.clear()
                    await self.arrived.wait()


async def _sse(http: aiohttp.ClientSession, url: str, key: str, receipts: _Receipts) -> None:
    async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as resp:
        resp.raise_for_status()
        event = b""
        async for raw in resp.content:
            line = raw.rstrip(b"\n")
            if line.startswith(b"retry:"):
                receipts.connected += 1
            elif line.startswith(b"event: "):
                event = line[7:]
            elif line.startswith(b"data: ") and event == b"delta":
                receipts.delta(line[6:])


async def _long_poll(http: aiohttp.ClientSession, url: str, key: str, receipts: _Receipts) -> None:
    cursor: str | None = None
    first = True
    while True:
        params = {"timeout": str(LONG_POLL_S), **({"cursor": cursor} if cursor else {})}
        request = http.get(url, params=params, headers={"Authorization": f"Bearer {key}"})
        if first:
            receipts.connected += 1  # its request is out; the gateway answers when a change comes
            first = False
        async with request as resp:
            resp.raise_for_status()
            page = await resp.json()
        for d in page["deltas"]:
            if d.get("object"):
                receipts.add(d["object"]["message_key"])
        cursor = page["next_cursor"]


async def _change_time(router: ShardRouter, account_id: int, key: str) -> float | None:
    """When persist wrote the first change of the message ``key`` (the server's clock, which is
    this machine's)."""
    shard = shard_of(account_id)
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT UNIX_TIMESTAMP(c.created_at) FROM {router.table(shard, 'changes')} c"
            f" JOIN {router.table(shard, 'messages')} m ON m.id = c.object_id"
            " WHERE m.account_id = %s AND m.message_key = %s ORDER BY c.id LIMIT 1",
            (account_id, key.encode()),
        )
        row = await cur.fetchone()
        await conn.commit()
    return None if row is None else float(row[0])


async def _questions(db: DatabaseSettings, ports: list[int]) -> int:
    total = 0
    for port in ports:
        async with connect(db, "127.0.0.1", port) as conn, conn.cursor() as cur:
            await cur.execute("SHOW GLOBAL STATUS LIKE 'Questions'")
            (_, value) = await cur.fetchone()
            total += int(value)
    return total


async def _gateway_counters(http: aiohttp.ClientSession, gateway_url: str) -> dict[str, float]:
    async with http.get(f"{management_address(gateway_url)}/metrics") as resp:
        body = await resp.read()
    return {name: float(m.group(1)) for name, pattern in _COUNTERS.items() if (m := pattern.search(body))}


async def _window(
    pids: dict[str, list[int]], window_s: float, questions: Callable[[], Awaitable[int]]
) -> tuple[dict[str, float], float]:
    """Each group's CPU as a share of one core over ``window_s``, and the servers' Questions/s."""
    q0 = await questions()
    cpu0 = {name: sum(_cpu_seconds(p) for p in group) for name, group in pids.items()}
    t0 = time.monotonic()
    await asyncio.sleep(window_s)
    cpu1 = {name: sum(_cpu_seconds(p) for p in group) for name, group in pids.items()}
    elapsed = time.monotonic() - t0
    q1 = await questions()
    return {name: (cpu1[name] - cpu0[name]) / elapsed for name in pids}, (q1 - q0) / elapsed


async def bench_streams(
    db: DatabaseSettings,
    gateway_url: str,
    ingest_url: str,
    *,
    streams: int = 1_000,
    long_polls: int = 100,
    accounts: int = 100,
    window_s: float = 60.0,
    baseline_s: float = 20.0,
    settle_s: float = 10.0,
    rounds: int = 50,
    deliver_timeout_s: float = 10.0,
    connect_timeout_s: float = 120.0,
) -> StreamsBench:
    raise_open_files_limit()  # one socket per stream
    gateway_pid = LocalServices().services["gateway"].proc.pid()
    if gateway_pid is None:
        raise RuntimeError("the gateway is not running (flightlog services up)")
    stack = Stack()
    primaries = [pid for m in stack.mariadb if (pid := m.proc.pid()) is not None]
    ports = [m.port for m in stack.mariadb]
    pids = {"gateway": [gateway_pid], "mariadb": primaries}

    async def questions() -> int:
        return await _questions(db, ports)

    await asyncio.sleep(settle_s)  # the services `flightlog bench` just started settle first
    base_cpu, base_q = await _window(pids, baseline_s, questions)
    receipts = _Receipts()
    tasks: list[asyncio.Task[None]] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with ShardRouter(db) as router, aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        application, api_key = await create_application(router, f"bench-streams-{uuid.uuid4().hex[:6]}")
        shards = router.shard_map.shards
        ids = [
            (
                await create_account(
                    router, application.id, f"s{i}@example.test", shard=shards[i % len(shards)]
                )
            ).id
            for i in range(accounts)
        ]
        started = time.monotonic()
        per_account: dict[int, int] = {a: 0 for a in ids}
        for i in range(streams):
            account = ids[i % accounts]
            per_account[account] += 1
            url = f"{gateway_url}/v1/accounts/{account}/delta/stream"
            tasks.append(asyncio.create_task(_sse(http, url, api_key, receipts)))
        for i in range(long_polls):
            account = ids[i % accounts]
            per_account[account] += 1
            url = f"{gateway_url}/v1/accounts/{account}/delta"
            tasks.append(asyncio.create_task(_long_poll(http, url, api_key, receipts)))
        try:
            while receipts.connected < streams + long_polls:
                failed = [t for t in tasks if t.done()]
                if failed:
                    failed[0].result()
                    raise RuntimeError("a stream ended before the bench did")
                if time.monotonic() - started > connect_timeout_s:
                    raise RuntimeError(
                        f"only {receipts.connected} of {streams + long_polls} streams open after"
                        f" {connect_timeout_s:.0f} s"
                    )
                await asyncio.sleep(0.2)
            connect_s = time.monotonic() - started
            await asyncio.sleep(settle_s)
            counters0 = await _gateway_counters(http, gateway_url)
            idle_cpu, idle_q = await _window(pids, window_s, questions)
            counters1 = await _gateway_counters(http, gateway_url)
            per_s = {n: (counters1[n] - counters0[n]) / window_s for n in counters1 if n in counters0}

            latencies: list[float] = []
            event_latencies: list[float] = []
            missed = 0
            for r in range(rounds):
                account = ids[r % accounts]
                key = f"sb{uuid.uuid4().hex[:12]}"
                # Through the pipeline, as in production: persist's commit wakes its change relay.
                # The whole lifecycle: a message reaches postflight (and the database) once final.
                posted = time.time()
                await post_events(http, ingest_url, api_key, lifecycle(account, key, datetime.now(UTC)))
                expected = per_account[account]
                await receipts.wait_for(key, expected, deliver_timeout_s)
                got = receipts.got.pop(key, [])
                committed = await _change_time(router, account, key)
                if committed is not None:
                    latencies += [max(0.0, t - committed) * 1000 for t in got]
                event_latencies += [max(0.0, t - posted) * 1000 for t in got]
                missed += max(0, expected - len(got))
                await asyncio.sleep(0.1)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
    return StreamsBench(
        streams,
        long_polls,
        accounts,
        window_s,
        base_cpu["gateway"],
        idle_cpu["gateway"],
        base_cpu["mariadb"],
        idle_cpu["mariadb"],
        base_q,
        idle_q,
        per_s.get("reads"),
        per_s.get("checks"),
        latencies,
        event_latencies,
        missed,
        connect_s,
    )


async def streams_stage(ctx: StageContext) -> None:
    """Run :func:`bench_streams` and add its figures."""
    report, progress = ctx.report, ctx.progress
    quick = ctx.quick
    r = await bench_streams(
        ctx.db,
        ctx.gateway_url,
        ctx.ingest_url,
        streams=200 if quick else 1_000,
        long_polls=20 if quick else 100,
        accounts=20 if quick else 100,
        window_s=15.0 if quick else 60.0,
        baseline_s=10.0 if quick else 20.0,
        rounds=20 if quick else 50,
    )
    label = f"{r.streams:,} SSE streams + {r.long_polls:,} long-polls on {r.accounts:,} accounts"
    reads = "no read counter" if r.reads_per_s is None else f"{r.reads_per_s:,.1f} delta reads/s"
    if r.checks_per_s is not None:
        reads += f" and {r.checks_per_s:,.2f} notifier checks/s"
    report.add(
        Figure(
            f"idle delta streams, gateway CPU ({label})",
            r.gateway_idle * 100,
            "% of a core",
            note=f"the whole gateway process over {r.window_s:.0f} s with every stream open and nothing "
            f"changing (an upper bound of the streams' cost), {r.gateway_baseline:.1%} before the streams "
            f"opened; {reads}; target <= 5 % at 1,000 streams",
        ),
        progress,
    )
    report.add(
        Figure(
            f"idle delta streams, MariaDB CPU ({label})",
            (r.mariadb_idle - r.mariadb_baseline) * 100,
            "% of a core",
            note=f"the primaries' CPU with the streams idle minus before them (the rest of the stack's "
            f"load moves it either way): {r.mariadb_idle:.1%} vs {r.mariadb_baseline:.1%}; "
            f"Questions {r.questions_idle_per_s:,.0f}/s idle, {r.questions_baseline_per_s:,.0f}/s before "
            "(every client of the stack)",
        ),
        progress,
    )
    n = len(r.latencies_ms)
    report.add(
        Figure(
            "change to stream latency, p50",
            r.percentile_ms(0.5) if n else float("nan"),
            "ms",
            note=f"{n:,} deliveries of changes written to accounts with open streams; {r.missed} missed; "
            f"all streams open in {r.connect_s:.1f} s; target <= 100 ms",
        ),
        progress,
    )
    report.add(
        Figure(
            "change to stream latency, p99",
            r.percentile_ms(0.99),
            "ms",
            note=f"mean {statistics.fmean(r.latencies_ms) if n else float('nan'):.1f} ms",
        ),
        progress,
    )
    for q in (0.5, 0.99):
        report.add(
            Figure(
                f"event to stream latency (POST /v1/events to every stream), p{int(q * 100)}",
                r.percentile_ms(q, from_event=True),
                "ms",
                note="through ingest, transform and persist, whose commit wakes the change relay",
            ),
            progress,
        )


STAGE = Stage(
    "streams",
    "idle delta streams",
    "gateway and MariaDB CPU of 1,000 idle SSE streams, and change-to-stream latency",
    "services",
    streams_stage,
)
