"""Webhooks at a steady rate across many accounts: every change is delivered once per account lane,
in commit order, signed. How fast (event to delivery, p50/p99) is a figure of ``flightlog bench``'s
webhook stage (cli/bench/webhooks.py), not a test: a loaded machine is slow without a fault."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import standardwebhooks

from libs.shards import ShardRouter
from tests.e2e.webhook_harness import fast_settings, stack
from tests.e2e.webhook_helpers import Receiver, change_ids, write_change
from tests.polling import eventually

pytestmark = pytest.mark.e2e

RATE_PER_S = 100
DURATION_S = 15


async def test_steady_rate_delivers_every_change_in_order_and_signed(
    router: ShardRouter, tenant_factory: Any
) -> None:
    tenant = await tenant_factory(router.shard_map.shards[:8])
    rx = Receiver()
    await rx.start()
    try:
        async with stack(router, fast_settings(), tenant.api_key) as (h, _):
            created = await h.subscribe(rx.url)
            total = RATE_PER_S * DURATION_S
            start = time.monotonic()
            pending: set[asyncio.Task[None]] = set()
            for n in range(total):
                acc = tenant.accounts[n % len(tenant.accounts)].id
                t = asyncio.create_task(write_change(router, acc, f"m{n}", 1))
                pending.add(t)
                t.add_done_callback(pending.discard)
                # pacing the writers, not waiting for anything
                await asyncio.sleep(max(0.0, start + (n + 1) / RATE_PER_S - time.monotonic()))
            await asyncio.gather(*pending)
            await eventually(lambda: len(rx.ok) >= total, 120, f"{total} deliveries")
    finally:
        await rx.stop()
    got: dict[int, list[int]] = {}
    for r in rx.ok:
        got.setdefault(int(r.json["data"]["account_id"]), []).append(int(r.json["data"]["change_id"]))
    expected = {acc.id: await change_ids(router, acc.id) for acc in tenant.accounts}
    assert got == expected, "lost, duplicated or reordered deliveries"
    hook = standardwebhooks.Webhook(created["secret"])
    for r in rx.received:
        hook.verify(r.body, r.headers)
