"""A fleet of IMAP accounts through the running ingest: ``flightlog bench``'s idle stage, which
measures both what 1,000 idle accounts cost and how fast they come back after a restart.

1. Ingest is restarted, so what follows is the growth of a freshly started process, not a share
   of an already large heap. Its own idle CPU is measured (the stack's other IMAP accounts, left
   by tests, are synced by it too: they are part of this baseline).
2. ``accounts`` fresh Dovecot users with one message each are connected through the gateway
   (POST /v1/accounts, plaintext on loopback, 16 requests at a time); the clock runs until every
   account's message is queryable.
3. Once the syncs have settled into IDLE on INBOX (polling the other folders every
   ``FLIGHTLOG_IMAP_POLL_INTERVAL_S``), the ingest process's CPU time (``/proc/<pid>/stat``) is
   read over a window and its resident memory compared with before the accounts were added; both
   are divided by the number of accounts, after subtracting the baseline. The IMAP connections
   held are counted in ``/proc/net/tcp``.
4. Ingest is restarted again (SIGTERM, drain, start): the clock runs from the new process's
   start until every account has logged in and resynced every folder (its ``last_sync_at`` in
   ``imap_accounts`` moved past the start, written after the full pass); the new process's CPU
   time over that span is divided by the accounts. With ``profile_dir``, py-spy samples the new
   ingest over the first seconds of the reconnect.

At the end every account is disconnected (DELETE /v1/accounts/{id}/credentials), which stops its
sync.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp

from cli.bench import cpu
from cli.bench.drive import create_imap_account_via_gateway, disconnect_via_gateway
from cli.bench.profile import ServiceProfile, profile_services
from cli.bench.report import Figure, Stage, StageContext
from cli.mailbox_gen import DOMAIN, fill_maildir
from cli.services import LocalService, LocalServices, dev_env
from cli.stack import Dovecot, Stack
from libs.accounts import create_application
from libs.config import DatabaseSettings
from libs.shards import ShardRouter
from services.ingest.imap.settings import ImapSettings

__all__ = ["STAGE", "IdleBench", "Reconnect", "bench_idle_accounts"]


@dataclass(frozen=True, slots=True)
class Reconnect:
    stop_s: float  # SIGTERM until the old ingest exited (its drain)
    ready_s: float  # the new process's start until /readyz answered
    resynced_s: float | None  # the new process's start until every account resynced; None: timeout
    resynced: int  # accounts resynced by then
    cpu_s: float  # the new ingest's CPU time over that span
    machine_cores: float  # the whole machine's average busy cores over that span (other work too)
    profile: ServiceProfile | None = None


@dataclass(frozen=True, slots=True)
class IdleBench:
    accounts: int
    connections: int  # established client connections to Dovecot's port, all processes
    window_s: float
    baseline_core_share: float  # the fresh ingest's own CPU before the accounts, share of one core
    core_share: float  # with the accounts connected
    rss_before_bytes: int  # the fresh ingest, before the accounts
    rss_after_bytes: int
    connect_s: float  # from the first POST until every account's message was queryable
    reconnect: Reconnect | None = None

    @property
    def core_share_per_account(self) -> float:
        return max(0.0, self.core_share - self.baseline_core_share) / self.accounts

    @property
    def rss_per_account_bytes(self) -> float:
        return max(0, self.rss_after_bytes - self.rss_before_bytes) / self.accounts


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def established_to(port: int) -> int:
    """Established IPv4 connections whose remote end is ``port`` on this machine."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[3] == "01" and int(parts[2].rsplit(":", 1)[1], 16) == port:
            count += 1
    return count


async def _core_share(pid: int, window_s: float) -> float:
    before = cpu.sample({"ingest": [pid]})
    await asyncio.sleep(window_s)
    used = cpu.usage(before, cpu.sample({"ingest": [pid]}))
    if "ingest" not in used.seconds:
        raise RuntimeError(f"ingest (pid {pid}) stopped while its CPU time was measured")
    return used.cores()["ingest"]


async def _queryable_accounts(router: ShardRouter, account_ids: list[int]) -> int:
    by_shard: dict[int, list[int]] = {}
    for a in account_ids:
        by_shard.setdefault(a >> 48, []).append(a)
    total = 0
    for shard, ids in by_shard.items():
        pool = await router.pool(shard, write=False)
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT COUNT(DISTINCT account_id) FROM {router.table(shard, 'messages')}"
                f" WHERE account_id IN ({', '.join(['%s'] * len(ids))})",
                tuple(ids),
            )
            (n,) = await cur.fetchone()
            await conn.commit()
        total += int(n)
    return total


async def _global_query(router: ShardRouter, sql: str, args: tuple[object, ...] = ()) -> tuple[object, ...]:
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(sql, args)
        row = await cur.fetchone()
        await conn.commit()
    return tuple(row)


async def _resynced_since(router: ShardRouter, account_ids: list[int], since: datetime) -> int:
    (n,) = await _global_query(
        router,
        f"SELECT COUNT(*) FROM `{router.global_schema}`.imap_accounts WHERE last_sync_at >= %s"
        f" AND account_id IN ({', '.join(['%s'] * len(account_ids))})",
        (since, *account_ids),
    )
    return int(str(n))


async def _start(ingest: LocalService) -> int:
    await asyncio.to_thread(ingest.start)
    pid = ingest.proc.pid()
    if pid is None:
        raise RuntimeError("ingest did not start")
    return pid


async def _restart_and_time(
    router: ShardRouter, ingest: LocalService, account_ids: list[int], timeout_s: float,
    profile_dir: Path | None, profile_s: float,
) -> Reconnect:  # fmt: skip
    began = time.monotonic()
    await asyncio.to_thread(ingest.stop)
    stop_s = time.monotonic() - began
    (since,) = await _global_query(router, "SELECT CURRENT_TIMESTAMP(6)")
    assert isinstance(since, datetime)
    machine = cpu.sample({})
    started = time.monotonic()
    pid = await _start(ingest)
    ready_s = time.monotonic() - started
    profiling = (
        asyncio.create_task(profile_services({"ingest": pid}, profile_s, profile_dir / "reconnect"))
        if profile_dir is not None
        else None
    )
    resynced_s: float | None = None
    while (done := await _resynced_since(router, account_ids, since)) < len(account_ids):
        if time.monotonic() - started > timeout_s:
            break
        await asyncio.sleep(0.25)
    else:
        resynced_s = time.monotonic() - started
    # a new process: all its CPU time is the restart's, start-up (imports, Kafka) included
    cpu_s = (cpu.tree_ticks(cpu.read_stats(), pid) or 0) / cpu.CLOCK_TICKS_PER_S
    busy = cpu.usage(machine, cpu.sample({}))
    profile = (await profiling)[0] if profiling is not None else None
    return Reconnect(stop_s, ready_s, resynced_s, done, cpu_s, busy.machine_s / busy.wall_s, profile)


async def bench_idle_accounts(
    db: DatabaseSettings,
    gateway_url: str,
    *,
    accounts: int = 1_000,
    window_s: float = 60.0,
    settle_s: float = 15.0,
    connect_timeout_s: float = 300.0,
    reconnect: bool = True,
    profile_dir: Path | None = None,
    server: Dovecot | None = None,
) -> IdleBench:
    """Restart ingest, connect ``accounts`` one-message mailboxes, measure ingest over
    ``window_s``, then (``reconnect``) restart it and time the fleet's return."""
    server = server or Stack().dovecot
    ingest = LocalServices(env=dev_env()).services["ingest"]
    await asyncio.to_thread(ingest.stop)
    pid = await _start(ingest)
    users = [f"idle{uuid.uuid4().hex[:10]}" for _ in range(accounts)]
    await asyncio.to_thread(server.add_users, [f"{u}@{DOMAIN}" for u in users])
    for u in users:
        await asyncio.to_thread(fill_maildir, server, u, 1)
    await asyncio.sleep(settle_s)  # the fresh ingest's start-up and the stack's other accounts
    baseline = await _core_share(pid, min(window_s, 15.0))
    rss_before = _rss_bytes(pid)
    ids: list[int] = []
    async with ShardRouter(db) as router, aiohttp.ClientSession() as http:
        _, api_key = await create_application(router, f"bench-idle-{uuid.uuid4().hex[:6]}")
        started = time.monotonic()
        gate = asyncio.Semaphore(16)

        async def connect(user: str) -> int:
            async with gate:
                return await create_imap_account_via_gateway(http, gateway_url, api_key, user, server)

        try:
            ids = list(await asyncio.gather(*(connect(u) for u in users)))
            while (landed := await _queryable_accounts(router, ids)) < accounts:
                if time.monotonic() - started > connect_timeout_s:
                    raise RuntimeError(
                        f"only {landed} of {accounts} idle accounts synced after {connect_timeout_s:.0f} s"
                    )
                await asyncio.sleep(1.0)
            connect_s = time.monotonic() - started
            await asyncio.sleep(settle_s)  # the last initial syncs end and enter IDLE
            connections = established_to(server.port)
            share = await _core_share(pid, window_s)
            rss_after = _rss_bytes(pid)
            again = (
                await _restart_and_time(
                    router, ingest, ids, connect_timeout_s, profile_dir, min(20.0, window_s)
                )
                if reconnect
                else None
            )
        finally:
            for account_id in ids:
                await disconnect_via_gateway(http, gateway_url, api_key, account_id)
    return IdleBench(
        accounts, connections, window_s, baseline, share, rss_before, rss_after, connect_s, again
    )


async def idle_stage(ctx: StageContext) -> None:
    """Run :func:`bench_idle_accounts` and add its figures beside the targets (docs/architecture.md)."""
    report, progress = ctx.report, ctx.progress
    result = await bench_idle_accounts(
        ctx.db, ctx.gateway_url, accounts=100 if ctx.quick else 1_000, window_s=15.0 if ctx.quick else 60.0,
        profile_dir=ctx.profile_dir,
    )  # fmt: skip
    n = result.accounts
    report.add(
        Figure(
            f"idle IMAP account, CPU ({n:,} accounts in IDLE)",
            result.core_share_per_account * 100,
            "% of a core",
            note=f"a freshly started ingest used {result.core_share:.2%} of a core over "
            f"{result.window_s:.0f} s ({result.baseline_core_share:.2%} before the accounts); "
            f"{result.connections:,} IMAP connections held; target <= 0.02 % each at 1,000 accounts",
        ),
        progress,
    )
    report.add(
        Figure(
            f"idle IMAP account, memory ({n:,} accounts in IDLE)",
            result.rss_per_account_bytes / 1024,
            "KiB",
            note=f"growth of a freshly started ingest: RSS {result.rss_before_bytes / 2**20:,.0f} -> "
            f"{result.rss_after_bytes / 2**20:,.0f} MiB / accounts; all {n:,} connected and "
            f"synced in {result.connect_s:.1f} s; target <= 128 KiB each at 1,000 accounts",
        ),
        progress,
    )
    again = result.reconnect
    if again is None:
        return
    report.add(
        Figure(
            f"IMAP fleet reconnect and resync after an ingest restart ({n:,} accounts)",
            again.resynced_s if again.resynced_s is not None else float("nan"),
            "s",
            note=(
                f"the new process's start to every account logged in and every folder resynced "
                f"(ready after {again.ready_s:.1f} s; the old one drained in {again.stop_s:.1f} s); "
                if again.resynced_s is not None
                else f"incomplete: {again.resynced:,} of {n:,} resynced within the timeout; "
            )
            + f"{again.cpu_s / n * 1000:.1f} ms of ingest CPU per account ({again.cpu_s:.1f} s, start-up "
            f"included); the machine was {again.machine_cores:.1f} cores busy meanwhile (all its work); "
            f"at most {ImapSettings().imap_max_concurrent_logins_per_host} logins at once per host; "
            "target <= 15 s at 1,000 accounts",
        ),
        progress,
    )
    if again.profile is not None:
        report.profiles.append(f"reconnect, {again.profile.line()}")


STAGE = Stage(
    "idle",
    "idle imap accounts and fleet reconnect",
    "CPU and memory per IMAP account idling in IDLE (fresh ingest); reconnect of the fleet after a restart",
    "services",
    idle_stage,
)
