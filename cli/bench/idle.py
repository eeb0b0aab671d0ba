"""Idle IMAP accounts through the running ingest: ``flightlog bench``'s idle-accounts stage.

``accounts`` fresh Dovecot users with one message each are connected through the gateway
(POST /v1/accounts, plaintext on loopback). Once every account's message is queryable and the
syncs have settled into IDLE on INBOX (polling the other folders every
``FLIGHTLOG_IMAP_POLL_INTERVAL_S``), the ingest process's CPU time (``/proc/<pid>/stat``) is read
over a window and its resident memory compared with before the accounts were added; both are
divided by the number of accounts, after subtracting ingest's own idle CPU measured first. The
IMAP connections held are counted in ``/proc/net/tcp``. At the end every account is
disconnected (DELETE /v1/accounts/{id}/credentials), which stops its sync.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from cli.bench import cpu
from cli.bench.drive import create_imap_account_via_gateway, disconnect_via_gateway
from cli.bench.report import Figure, Stage, StageContext
from cli.mailbox_gen import DOMAIN, fill_maildir
from cli.services import LocalServices
from cli.stack import Dovecot, Stack
from libs.accounts import create_application
from libs.config import DatabaseSettings
from libs.shards import ShardRouter

__all__ = ["STAGE", "IdleBench", "bench_idle_accounts"]


@dataclass(frozen=True, slots=True)
class IdleBench:
    accounts: int
    connections: int  # established client connections to Dovecot's port, all processes
    window_s: float
    baseline_core_share: float  # ingest's own CPU before the accounts, share of one core
    core_share: float  # with the accounts connected
    rss_before_bytes: int
    rss_after_bytes: int
    connect_s: float  # from the first POST until every account's message was queryable

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


async def bench_idle_accounts(
    db: DatabaseSettings,
    gateway_url: str,
    *,
    accounts: int = 1_000,
    window_s: float = 60.0,
    settle_s: float = 15.0,
    connect_timeout_s: float = 300.0,
    server: Dovecot | None = None,
) -> IdleBench:
    """Connect ``accounts`` one-message mailboxes, then measure ingest over ``window_s``."""
    server = server or Stack().dovecot
    pid = LocalServices().services["ingest"].proc.pid()
    if pid is None:
        raise RuntimeError("the ingest service is not running (flightlog services up)")
    users = [f"idle{uuid.uuid4().hex[:10]}" for _ in range(accounts)]
    await asyncio.to_thread(server.add_users, [f"{u}@{DOMAIN}" for u in users])
    for u in users:
        await asyncio.to_thread(fill_maildir, server, u, 1)
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
        finally:
            for account_id in ids:
                await disconnect_via_gateway(http, gateway_url, api_key, account_id)
    return IdleBench(accounts, connections, window_s, baseline, share, rss_before, rss_after, connect_s)


async def idle_stage(ctx: StageContext) -> None:
    """Run :func:`bench_idle_accounts` and add its figures (beside the target in docs/architecture.md)."""
    report, progress = ctx.report, ctx.progress
    result = await bench_idle_accounts(
        ctx.db, ctx.gateway_url, accounts=100 if ctx.quick else 1_000, window_s=15.0 if ctx.quick else 60.0
    )
    n = result.accounts
    report.add(
        Figure(
            f"idle IMAP account, CPU ({n:,} accounts in IDLE)",
            result.core_share_per_account * 100,
            "% of a core",
            note=f"ingest used {result.core_share:.2%} of a core over {result.window_s:.0f} s "
            f"({result.baseline_core_share:.2%} before the accounts); {result.connections:,} IMAP "
            "connections held; target <= 0.02 % each at 1,000 accounts (docs/architecture.md)",
        ),
        progress,
    )
    report.add(
        Figure(
            f"idle IMAP account, memory ({n:,} accounts in IDLE)",
            result.rss_per_account_bytes / 1024,
            "KiB",
            note=f"ingest RSS {result.rss_before_bytes / 2**20:,.0f} -> "
            f"{result.rss_after_bytes / 2**20:,.0f} MiB (growth / accounts; the whole RSS / accounts, "
            f"an upper bound: {result.rss_after_bytes / n / 1024:,.0f} KiB); all {n:,} connected and "
            f"synced in {result.connect_s:.1f} s; target <= 1 MB each",
        ),
        progress,
    )


STAGE = Stage(
    "idle",
    "idle imap accounts",
    "CPU and memory of the ingest process per IMAP account idling in IDLE",
    "services",
    idle_stage,
)
