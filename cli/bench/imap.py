"""IMAP through the running services: ``flightlog bench``'s IMAP stage.

Initial sync: a fresh Dovecot user's maildir is filled with ``messages`` generated messages
(:mod:`cli.mailbox_gen`), the account is created through the gateway (POST /v1/accounts,
provider imap, plaintext on loopback), and the clock runs from that POST's start until the
account's shard ``messages`` table holds every message. The ingest service started by
``flightlog dev`` runs the sync workers.

New mail: messages APPENDed over IMAP on a fixed clock (1 s apart, then 20 s apart, the latter
with the connection idle in between); each one's latency is from the start of its APPEND to its
row's insert time in the shard table (``created_at``, the server's clock on this same machine),
and to its ``message.created`` webhook reaching a receiver in the bench process (subscribed
through the gateway once the initial sync is done; signatures verified, see
:mod:`cli.bench.webhooks`), beside the targets in docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import aiohttp

from cli.bench import cpu
from cli.bench.drive import (
    WebhookReceiver,
    count_messages,
    create_imap_account_via_gateway,
    disconnect_via_gateway,
    gateway_request,
    landed_at,
)
from cli.bench.report import Figure, Stage, StageContext
from cli.bench.stats import LatencySummary, summarize
from cli.mailbox_gen import DOMAIN, fill_maildir, live_message
from cli.services import LocalServices
from cli.stack import IMAP_TEST_PASSWORD, Dovecot, Stack
from libs.accounts import create_application
from libs.config import DatabaseSettings
from libs.imap.client import Imap4
from libs.shards import ShardRouter
from services.transform.settings import TransformSettings

__all__ = ["STAGE", "ImapBench", "bench_imap"]


@dataclass(frozen=True, slots=True)
class ImapBench:
    messages: int
    fill_s: float  # writing the maildir (not part of the sync time)
    initial_sync_s: float | None  # None: not complete within the timeout
    synced: int
    new_mail: dict[float, LatencySummary]  # seconds apart -> latencies of the mail that landed
    new_mail_missed: dict[float, int]  # seconds apart -> mail not queryable within the timeout
    # seconds apart -> APPEND to webhook delivered, of the mail whose webhook arrived in time
    new_mail_webhook: dict[float, LatencySummary] = field(default_factory=dict)
    webhook_missed: dict[float, int] = field(default_factory=dict)  # queryable, never delivered
    # CPU seconds of each pipeline service (its parse workers included) over the initial sync,
    # and the machine's average busy cores meanwhile (everyone's work on it)
    sync_cpu_s: dict[str, float] = field(default_factory=dict)
    machine_cores: float = 0.0

    @property
    def sync_rate(self) -> float:
        return self.synced / self.initial_sync_s if self.initial_sync_s else 0.0


@dataclass(frozen=True, slots=True)
class NewMail:
    queryable: LatencySummary | None
    missed: int  # never queryable within the timeout
    webhook: LatencySummary | None
    webhook_missed: int  # queryable, but no webhook within the timeout


async def _new_mail(
    router: ShardRouter, account_id: int, server: Dovecot, user: str, gap_s: float, samples: int,
    timeout_s: float, receiver: WebhookReceiver,
) -> NewMail:  # fmt: skip
    """APPEND ``samples`` messages ``gap_s`` apart and time each to its row and to its webhook."""
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
        landed = await landed_at(router, account_id, prefix)
        if len(landed) >= samples or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.2)
    latencies = [landed[t][1] - appended_at[t] for t in appended_at if t in landed]
    ids = {landed[t][0]: t for t in landed}
    while not ids.keys() <= receiver.delivered_at.keys() and time.monotonic() < deadline:
        await receiver.wait_for(len(receiver.delivered_at) + 1, deadline - time.monotonic())
    hooked = [receiver.delivered_at[i] - appended_at[t] for i, t in ids.items() if i in receiver.delivered_at]
    return NewMail(
        summarize(latencies) if latencies else None,
        samples - len(latencies),
        summarize(hooked) if hooked else None,
        len(ids) - len(hooked),
    )


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
        async with aiohttp.ClientSession() as http:
            services = LocalServices().services
            pids = {
                n: [p]
                for n in ("ingest", "transform", "persist")
                if (p := services[n].proc.pid()) is not None
            }
            before = cpu.sample(pids)
            started = time.monotonic()
            account_id = await create_imap_account_via_gateway(http, gateway_url, api_key, user, server)
            try:
                synced, sync_s = 0, None
                while time.monotonic() - started < sync_timeout_s:
                    synced = await count_messages(router, account_id)
                    if synced >= messages:
                        sync_s = time.monotonic() - started
                        break
                    await asyncio.sleep(0.1)
                used = cpu.usage(before, cpu.sample(pids))
                result = ImapBench(
                    messages, fill_s, sync_s, synced, {}, {}, sync_cpu_s=used.seconds,
                    machine_cores=used.machine_s / used.wall_s if used.wall_s else 0.0,
                )  # fmt: skip
                if sync_s is not None and new_mail:
                    await _new_mail_stage(result, router, http, gateway_url, api_key, account_id,
                                          server, user, new_mail, new_mail_timeout_s)  # fmt: skip
            finally:
                await disconnect_via_gateway(http, gateway_url, api_key, account_id)
    return result


async def _new_mail_stage(
    result: ImapBench, router: ShardRouter, http: aiohttp.ClientSession, gateway_url: str, api_key: str,
    account_id: int,
    server: Dovecot, user: str, new_mail: tuple[tuple[float, int], ...], timeout_s: float,
) -> None:  # fmt: skip
    receiver = WebhookReceiver()
    await receiver.start()
    try:
        endpoint = await gateway_request(
            http, "POST", f"{gateway_url}/v1/webhooks", api_key,
            {"url": receiver.url, "description": "flightlog bench (IMAP new mail)",
             "event_types": ["message.created"], "account_ids": [str(account_id)]},
        )  # fmt: skip
        receiver.secret = endpoint["secret"]
        try:
            await asyncio.sleep(2.0)  # the sync settles into IDLE after its first full pass
            for gap_s, samples in new_mail:
                got = await _new_mail(router, account_id, server, user, gap_s, samples, timeout_s, receiver)
                result.new_mail_missed[gap_s] = got.missed
                result.webhook_missed[gap_s] = got.webhook_missed
                if got.queryable is not None:
                    result.new_mail[gap_s] = got.queryable
                if got.webhook is not None:
                    result.new_mail_webhook[gap_s] = got.webhook
        finally:
            await gateway_request(http, "DELETE", f"{gateway_url}/v1/webhooks/{endpoint['id']}", api_key)
    finally:
        await receiver.stop()


async def imap_stage(ctx: StageContext) -> None:
    """Run :func:`bench_imap` and add its figures (beside the targets in docs/architecture.md)."""
    report, progress = ctx.report, ctx.progress
    messages = 1_000 if ctx.quick else 10_000
    gaps = ((1.0, 5), (20.0, 2)) if ctx.quick else ((1.0, 20), (20.0, 5))
    result = await bench_imap(ctx.db, ctx.gateway_url, messages=messages, new_mail=gaps)
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
        return
    report.add(
        Figure(
            f"IMAP initial sync of {messages:,} messages to queryable",
            result.initial_sync_s,
            "s",
            note=f"{result.sync_rate:,.0f} msgs/s, POST /v1/accounts to the last row; CPU per message: "
            + ", ".join(f"{n} {s / messages * 1e6:,.0f} us" for n, s in result.sync_cpu_s.items())
            + f" ({TransformSettings().transform_parse_workers} parse workers); the machine was "
            f"{result.machine_cores:.1f} cores busy (all its work); "
            "target <= 5 s for 10,000 (docs/architecture.md)",
        ),
        progress,
    )
    missed = (("queryable but without a webhook", "webhook latencies", result.webhook_missed),
              ("not queryable", "latencies", result.new_mail_missed))  # fmt: skip
    for what, counted_out_of, lost_by_gap in missed:
        for gap_s, lost in lost_by_gap.items():
            if lost:
                report.add(
                    Figure(
                        f"IMAP new mail {what} within 30 s, {gap_s:g} s apart",
                        lost,
                        "messages",
                        note=f"counted out of the {counted_out_of}; target 0",
                    ),
                    progress,
                )
    # docs/architecture.md sets the webhook targets; queryable comes before the webhook, so the
    # same bounds hold for it a fortiori.
    timed = (("queryable", "APPEND start to row insert", result.new_mail),
             ("webhook delivered", "APPEND start to the receiver", result.new_mail_webhook))  # fmt: skip
    for what, span, by_gap in timed:
        for gap_s, lat in by_gap.items():
            report.add(
                Figure(
                    f"IMAP new mail to {what} p50, {gap_s:g} s apart",
                    lat.p50_ms,
                    "ms",
                    note=f"{span}; n={lat.count}, target p50 <= 650 ms (docs/architecture.md)",
                ),
                progress,
            )
            report.add(
                Figure(
                    f"IMAP new mail to {what} p99, {gap_s:g} s apart",
                    lat.p99_ms,
                    "ms",
                    note=f"n={lat.count} (p99 of few samples is their max); "
                    f"target p99 <= 900 ms (docs/architecture.md)",
                ),
                progress,
            )


STAGE = Stage(
    "imap",
    "imap",
    "IMAP initial sync to queryable; new mail to queryable and to its webhook",
    "services",
    imap_stage,
)
