"""Sending through the running services: ``flightlog bench``'s send stage.

Two fresh Dovecot users are synced accounts of one application (POST /v1/accounts); the first
sends through the stack's Postfix (PUT .../smtp, reusing its IMAP login). ``messages`` sends are
posted at once (within an account's send burst), each to the second user; each one's latency is
from the start of its POST to its row's insert time in the recipient's shard (``created_at``):
the gateway, the outbox, the sender's SMTP conversation, Postfix's LMTP delivery into Dovecot,
ingest's IMAP sync (IDLE on INBOX), transform and persist. Sends per second is the messages over
the time from the first POST to the last arrival.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import aiohttp

from cli.bench.drive import (
    count_messages,
    create_imap_account_via_gateway,
    disconnect_via_gateway,
    gateway_request,
    landed_at,
)
from cli.bench.report import Figure, Stage, StageContext
from cli.bench.stats import LatencySummary, summarize
from cli.mailbox_gen import DOMAIN, fill_maildir
from cli.stack import HOST, Stack
from libs.accounts import create_application
from libs.config import DatabaseSettings
from libs.shards import ShardRouter

__all__ = ["STAGE", "SendBench", "bench_send"]

SYNC_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class SendBench:
    messages: int
    arrived: int
    latency: LatencySummary | None  # POST start to the recipient's row
    span_s: float  # first POST to the last arrival (or the timeout)

    @property
    def sends_per_s(self) -> float:
        return self.arrived / self.span_s if self.span_s else 0.0


async def _synced_account(
    http: aiohttp.ClientSession, router: ShardRouter, gateway_url: str, api_key: str, stack: Stack
) -> tuple[str, int]:
    user = f"benchsend{uuid.uuid4().hex[:8]}"
    stack.dovecot.add_user(f"{user}@{DOMAIN}")
    await asyncio.to_thread(fill_maildir, stack.dovecot, user, 1)
    account_id = await create_imap_account_via_gateway(http, gateway_url, api_key, user, stack.dovecot)
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while await count_messages(router, account_id) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"account {account_id} not synced within {SYNC_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.1)
    return f"{user}@{DOMAIN}", account_id


async def bench_send(
    db: DatabaseSettings, gateway_url: str, *, messages: int = 50, timeout_s: float = 120.0
) -> SendBench:
    stack = Stack()
    async with ShardRouter(db) as router, aiohttp.ClientSession() as http:
        _, api_key = await create_application(router, f"bench-send-{uuid.uuid4().hex[:6]}")
        accounts: list[int] = []
        try:
            _, sender = await _synced_account(http, router, gateway_url, api_key, stack)
            accounts.append(sender)
            recipient, inbox = await _synced_account(http, router, gateway_url, api_key, stack)
            accounts.append(inbox)
            await gateway_request(
                http, "PUT", f"{gateway_url}/v1/accounts/{sender}/smtp", api_key,
                {"host": HOST, "port": stack.settings.submission_port, "tls_mode": "starttls"},
            )  # fmt: skip
            prefix = f"bench-send-{uuid.uuid4().hex[:6]}-"
            posted_at: dict[str, float] = {}
            began = time.monotonic()

            async def send(n: int) -> None:
                subject = f"{prefix}{n}"
                posted_at[subject] = time.time()
                await gateway_request(
                    http, "POST", f"{gateway_url}/v1/accounts/{sender}/messages/send", api_key,
                    {"to": [{"email": recipient}], "subject": subject, "text": "bench"},
                )  # fmt: skip

            await asyncio.gather(*(send(n) for n in range(messages)))
            deadline = time.monotonic() + timeout_s
            while True:
                landed = await landed_at(router, inbox, prefix)
                if len(landed) >= messages or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.1)
            span_s = time.monotonic() - began
        finally:
            for account_id in accounts:
                await disconnect_via_gateway(http, gateway_url, api_key, account_id)
    latencies = [landed[s][1] - posted_at[s] for s in posted_at if s in landed]
    return SendBench(messages, len(latencies), summarize(latencies) if latencies else None, span_s)


async def send_stage(ctx: StageContext) -> None:
    report, progress = ctx.report, ctx.progress
    messages = 20 if ctx.quick else 60  # within an account's send burst (60): no 429 to wait out
    result = await bench_send(ctx.db, ctx.gateway_url, messages=messages)
    if result.arrived < messages:
        report.add(
            Figure(
                "send: messages not arrived within 120 s",
                messages - result.arrived,
                "messages",
                note=f"out of {messages}; target 0",
            ),
            progress,
        )
    if result.latency is not None:
        lat = result.latency
        span = "POST .../messages/send start to the row in the recipient's synced account"
        report.add(Figure("send to arrival p50", lat.p50_ms, "ms", note=f"{span}; n={lat.count}"), progress)
        report.add(Figure("send to arrival p99", lat.p99_ms, "ms", note=f"n={lat.count}"), progress)
    report.add(
        Figure(
            "sends per second, send to arrival",
            result.sends_per_s,
            "msgs/s",
            note=f"{result.arrived} messages posted at once, first POST to the last arrival"
            f" ({result.span_s:.1f} s); one sending account, sender concurrency 8",
        ),
        progress,
    )


STAGE = Stage(
    "send",
    "send",
    "sending mail: POST .../messages/send to arrival in the recipient's synced account",
    "services",
    send_stage,
)
