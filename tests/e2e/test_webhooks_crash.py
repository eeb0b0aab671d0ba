"""SIGKILL of the dispatcher (a process of its own) and of persist (which runs the change relay)
while changes stream in: the receiver still gets every change of every account, in order per
account; what was in flight at a kill may come twice, always with the same webhook-id."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import standardwebhooks

from cli.procs import ManagedProcess, wait_until
from cli.stack import Stack
from libs.config import REPO_ROOT
from libs.shards import ShardRouter
from tests.e2e.conftest import E2E_PORT_OFFSET, Pipeline
from tests.e2e.webhook_harness import FAST, api_server, fast_settings
from tests.e2e.webhook_helpers import Receiver, change_ids, first_seen, metric_line, write_change
from tests.polling import eventually

pytestmark = pytest.mark.e2e

DISPATCHER_PORT = 8084 + E2E_PORT_OFFSET


class DispatcherProcess:
    def __init__(self, stack: Stack) -> None:
        state = stack.settings.state_dir
        self.proc = ManagedProcess(
            "webhooks-e2e", state / "services" / "webhooks-e2e.pid", state / "logs" / "webhooks-e2e.log",
            "services.gateway.webhooks",
        )  # fmt: skip
        self.env = {"FLIGHTLOG_ENVIRONMENT": "development", "FLIGHTLOG_HTTP_PORT": str(DISPATCHER_PORT)}
        self.env |= {f"FLIGHTLOG_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
                     for k, v in FAST.items()}  # fmt: skip

    def start(self) -> None:
        self.proc.start([sys.executable, "-m", "services.gateway.webhooks"], env=self.env, cwd=REPO_ROOT)
        wait_until(
            lambda: metric_line(DISPATCHER_PORT, b"flightlog_webhook_dispatcher_active 1.0"),
            60,
            f"the dispatcher to deliver:\n{self.proc.log_tail(20)}",
        )


@pytest.fixture
def dispatcher_process(stack: Stack) -> Iterator[DispatcherProcess]:
    d = DispatcherProcess(stack)
    try:
        d.start()  # inside the try: a start that times out must not leave the process behind
        yield d
    finally:
        d.proc.stop(timeout_s=20)


async def test_kill_dispatcher_and_relay_mid_stream(
    pipeline: Pipeline, router: ShardRouter, tenant_factory: Any, dispatcher_process: DispatcherProcess
) -> None:
    persist_port = pipeline.services["persist"].port
    assert await asyncio.to_thread(metric_line, persist_port, b"flightlog_relay_active 1.0"), (
        "persist's relay is idle"
    )
    tenant = await tenant_factory(router.shard_map.shards[:4])
    rx = Receiver()
    await rx.start()
    try:
        async with api_server(router, fast_settings(), tenant.api_key) as h:
            created = await h.subscribe(rx.url)
        written = 0
        stop = asyncio.Event()

        async def writer() -> None:
            # keeps writing until both kills are behind: each kill lands mid-stream
            nonlocal written
            while not stop.is_set():
                n = written
                await asyncio.gather(
                    *(write_change(router, a.id, f"k{n % 9}", n // 9 + 1) for a in tenant.accounts)
                )
                written += 1
                await asyncio.sleep(0.06)  # pacing

        task = asyncio.create_task(writer())
        try:
            await eventually(lambda: len(rx.ok) > 0, 60, "the first deliveries")
            assert dispatcher_process.proc.kill()
            await asyncio.to_thread(dispatcher_process.start)
            delivered = len(rx.ok)
            await eventually(lambda: len(rx.ok) > delivered, 60, "deliveries by the restarted dispatcher")
            persist = pipeline.services["persist"]
            assert persist.proc.kill()
            killed_at = written
            await asyncio.to_thread(persist.start, wait_s=90)
            await eventually(lambda: written >= killed_at + 5, 60, "changes written after the restart")
        finally:
            stop.set()
            await task
        rounds = written

        expected = {a.id: await change_ids(router, a.id) for a in tenant.accounts}
        total = sum(len(v) for v in expected.values())
        assert total == rounds * len(tenant.accounts)

        def got() -> dict[int, list[int]]:
            out: dict[int, list[int]] = {}
            for r in rx.ok:
                d = r.json["data"]
                out.setdefault(int(d["account_id"]), []).append(int(d["change_id"]))
            return out

        await eventually(lambda: sum(len(set(v)) for v in got().values()) >= total, 120, "every change")
        received = got()
        for account, ids in expected.items():
            assert first_seen(received[account]) == ids, f"account {account}: lost or reordered"
        for r in rx.received:
            assert r.headers["webhook-id"] == f"evt_{r.json['data']['change_id']}"
        hook = standardwebhooks.Webhook(created["secret"])
        for r in rx.received:
            hook.verify(r.body, r.headers)
        duplicates = len(rx.ok) - total
        print(
            f"\n{total} changes delivered across 2 kills; {duplicates} re-sent duplicates (same webhook-id)"
        )
    finally:
        await rx.stop()
