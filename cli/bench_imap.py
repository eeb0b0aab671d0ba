"""IMAP through the running services: ``flightlog bench``'s IMAP stage.

Initial sync: a fresh Dovecot user's maildir is filled with ``messages`` generated messages
(:mod:`cli.mailbox_gen`), the account is created through the gateway (POST /v1/accounts,
provider imap, plaintext on loopback), and the clock runs from that POST's start until the
account's shard ``messages`` table holds every message. The ingest service started by
``flightlog dev`` runs the sync workers.

New mail: messages APPENDed over IMAP on a fixed clock (1 s apart, then 20 s apart, the latter
with the connection idle in between); each one's latency is from the start of its APPEND to its
row's insert time in the shard table (``created_at``, the server's clock on this same machine).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from cli.bench import BenchReport, Figure
from cli.bench_stats import LatencySummary, summarize
from cli.mailbox_gen import DOMAIN, fill_maildir
from cli.stack import IMAP_TEST_PASSWORD, Dovecot, Stack
from libs.accounts import create_application
from libs.config import DatabaseSettings
from libs.shards import ShardRouter
from services.ingest.imap.client import Imap4

__all__ = ["ImapBench", "bench_imap", "imap_stage", "live_message"]


@dataclass(frozen=True, slots=True)
class ImapBench:
    messages: int
    fill_s: float  # writing the maildir (not part of the sync time)
    initial_sync_s: float | None  # None: not complete within the timeout
    synced: int
    new_mail: dict[float, LatencySummary]  # seconds apart -> latencies of the mail that landed
    new_mail_missed: dict[float, int]  # seconds apart -> mail not queryable within the timeout

    @property
    def sync_rate(self) -> float:
        return self.synced / self.initial_sync_s if self.initial_sync_s else 0.0


def live_message(tag: str, user: str) -> bytes:
    """A small new message whose Subject is ``tag`` (how its row is found again)."""
    return (
        f"From: live@example.org\r\nTo: {user}@{DOMAIN}\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@example.org>\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\nnew mail {tag}\r\n"
    ).encode()


async def _count(router: ShardRouter, account_id: int) -> int:
    shard = account_id >> 48
    pool = await router.pool(shard, write=False)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT COUNT(*) FROM {router.table(shard, 'messages')} WHERE account_id = %s", (account_id,)
        )
        (n,) = await cur.fetchone()
        await conn.commit()
    return int(n)


async def _landed_at(router: ShardRouter, account_id: int, prefix: str) -> dict[str, float]:
    shard = account_id >> 48
    pool = await router.pool(shard, write=False)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT subject, UNIX_TIMESTAMP(created_at) FROM {router.table(shard, 'messages')}"
            " WHERE account_id = %s AND subject LIKE %s",
            (account_id, prefix + "%"),
        )
        rows = {str(subject): float(at) for subject, at in await cur.fetchall()}
        await conn.commit()
    return rows


async def _create_account(gateway_url: str, api_key: str, user: str, server: Dovecot) -> int:
    body = {
        "provider": "imap",
        "email": f"{user}@{DOMAIN}",
        "host": "127.0.0.1",
        "port": server.port,
        "tls_mode": "none",
        "username": f"{user}@{DOMAIN}",
        "password": IMAP_TEST_PASSWORD,
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gateway_url}/v1/accounts", json=body, headers={"Authorization": f"Bearer {api_key}"}
        ) as resp,
    ):
        if resp.status != 201:
            raise RuntimeError(f"POST /v1/accounts: gateway answered {resp.status}: {await resp.text()}")
        return int((await resp.json())["id"])


async def _new_mail(
    router: ShardRouter, account_id: int, server: Dovecot, user: str, gap_s: float, samples: int,
    timeout_s: float,
) -> tuple[LatencySummary | None, int]:  # fmt: skip
    """APPEND ``samples`` messages ``gap_s`` apart; (their latencies, how many never landed)."""
    prefix = f"bench-live-{uuid.uuid4().hex[:6]}-"
    appended_at: dict[str, float] = {}
    client = Imap4("127.0.0.1", server.port, timeout=30)
    await client.wait_hello_from_server()
    if (await client.login(f"{user}@{DOMAIN}", IMAP_TEST_PASSWORD)).result != "OK":
        raise RuntimeError(f"IMAP login of {user} refused")
    try:
        start = time.monotonic()
        for j in range(samples):
            # every APPEND, the first included, comes gap_s after the last one: 20 s apart is
            # 20 s of an idle connection each time
            await asyncio.sleep(max(0.0, start + (j + 1) * gap_s - time.monotonic()))
            tag = f"{prefix}{j}"
            appended_at[tag] = time.time()
            if (await client.append(live_message(tag, user), mailbox="INBOX")).result != "OK":
                raise RuntimeError(f"IMAP APPEND of {tag} refused")
    finally:
        await client.logout()
    deadline = time.monotonic() + timeout_s
    while True:
        landed = await _landed_at(router, account_id, prefix)
        if len(landed) >= samples or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.2)
    latencies = [landed[t] - appended_at[t] for t in appended_at if t in landed]
    return (summarize(latencies) if latencies else None), samples - len(latencies)


async def bench_imap(
    db: DatabaseSettings,
    gateway_url: str,
    *,
    messages: int = 10_000,
    new_mail: tuple[tuple[float, int], ...] = ((1.0, 20), (20.0, 5)),
    sync_timeout_s: float = 300.0,
    new_mail_timeout_s: float = 30.0,
    server: Dovecot | None = None,
) -> ImapBench:
    """Initial sync of ``messages``, then ``new_mail`` as (seconds apart, samples) pairs."""
    server = server or Stack().dovecot
    user = f"bench{uuid.uuid4().hex[:8]}"
    server.add_user(f"{user}@{DOMAIN}")
    began = time.monotonic()
    await asyncio.to_thread(fill_maildir, server, user, messages)
    fill_s = time.monotonic() - began
    async with ShardRouter(db) as router:
        _, api_key = await create_application(router, f"bench-imap-{uuid.uuid4().hex[:6]}")
        started = time.monotonic()
        account_id = await _create_account(gateway_url, api_key, user, server)
        synced, sync_s = 0, None
        while time.monotonic() - started < sync_timeout_s:
            synced = await _count(router, account_id)
            if synced >= messages:
                sync_s = time.monotonic() - started
                break
            await asyncio.sleep(0.1)
        live: dict[float, LatencySummary] = {}
        missed: dict[float, int] = {}
        if sync_s is not None:
            await asyncio.sleep(2.0)  # the sync settles into IDLE after its first full pass
            for gap_s, samples in new_mail:
                lat, missed[gap_s] = await _new_mail(
                    router, account_id, server, user, gap_s, samples, new_mail_timeout_s
                )
                if lat is not None:
                    live[gap_s] = lat
    return ImapBench(messages, fill_s, sync_s, synced, live, missed)


async def imap_stage(
    report: BenchReport,
    progress: Callable[[str], None],
    db: DatabaseSettings,
    gateway_url: str,
    *,
    quick: bool,
) -> ImapBench:
    """Run :func:`bench_imap` and add its figures (beside the DESIGN.md targets) to ``report``."""
    messages = 1_000 if quick else 10_000
    gaps = ((1.0, 5), (20.0, 2)) if quick else ((1.0, 20), (20.0, 5))
    result = await bench_imap(db, gateway_url, messages=messages, new_mail=gaps)
    if result.initial_sync_s is None:
        report.add(
            Figure(
                f"IMAP initial sync of {messages:,} messages to queryable",
                float("nan"),
                "s",
                note=f"incomplete: {result.synced:,} of {messages:,} rows within the timeout",
            ),
            progress,
        )
        return result
    report.add(
        Figure(
            f"IMAP initial sync of {messages:,} messages to queryable",
            result.initial_sync_s,
            "s",
            note=f"{result.sync_rate:,.0f} msgs/s, POST /v1/accounts to the last row; "
            "target <= 10 s for 10,000 (DESIGN.md)",
        ),
        progress,
    )
    for gap_s, lost in result.new_mail_missed.items():
        if lost:
            report.add(
                Figure(
                    f"IMAP new mail not queryable within 30 s, {gap_s:g} s apart",
                    lost,
                    "messages",
                    note="counted out of the latencies; target 0",
                ),
                progress,
            )
    for gap_s, lat in result.new_mail.items():
        report.add(
            Figure(
                f"IMAP new mail to queryable p50, {gap_s:g} s apart",
                lat.p50_ms,
                "ms",
                note=f"APPEND start to row insert; n={lat.count}, target p50 <= 800 ms",
            ),
            progress,
        )
        report.add(
            Figure(
                f"IMAP new mail to queryable p99, {gap_s:g} s apart",
                lat.p99_ms,
                "ms",
                note=f"n={lat.count} (p99 of few samples is their max); target p99 <= 1,500 ms",
            ),
            progress,
        )
    return result
