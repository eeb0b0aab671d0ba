"""One event a receiver always refuses (its parser rejects that payload with a 400), against real
HTTP receivers on 127.0.0.1: with the default ordering (skip_refused) the account's later events
go out after a bounded number of attempts instead of waiting out the 28-hour retry window, and the
refused one is failed in the delivery log and replayable; with ordering strict they wait. And a
receiver answering 410 Gone gets its endpoint disabled, the delivery kept.

Nothing here waits on the clock: each test waits for a count of requests or a state, and the
retry window is left at its default (28 h), so without the bounded refusals the later events
never arrive and the waits time out."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web

from libs.shards import ShardRouter
from services.gateway.webhooks.settings import WebhookSettings
from tests.e2e.webhook_harness import Harness, fast_settings, stack
from tests.e2e.webhook_helpers import Receiver, accept, change_ids, write_change
from tests.polling import eventually

pytestmark = pytest.mark.e2e

MAX_REFUSALS = WebhookSettings().webhooks_refused_max_attempts


class RefuseFirstEvent:
    """Answers 400 to every attempt of the first event it sees (the account's first, as lanes go
    in change order) and 200 to everything else."""

    def __init__(self) -> None:
        self.poison: str | None = None

    async def __call__(self, rx: Receiver, request: web.Request) -> int:
        webhook_id = request.headers["webhook-id"]
        if self.poison is None:
            self.poison = webhook_id
        return 400 if webhook_id == self.poison else 200


def change_of(r: Any) -> int:
    return int(r.json["data"]["change_id"])


async def deliveries(h: Harness, endpoint_id: str, query: str = "") -> list[dict[str, Any]]:
    status, log = await h.call("GET", f"/v1/webhooks/{endpoint_id}/deliveries?limit=500{query}")
    assert status == 200, log
    found: list[dict[str, Any]] = log["data"]
    return found


async def test_a_refused_event_no_longer_holds_back_its_account(
    router: ShardRouter, tenant_factory: Any
) -> None:
    tenant = await tenant_factory(router.shard_map.shards[:1])
    account = tenant.accounts[0].id
    refuse = RefuseFirstEvent()
    rx = Receiver(refuse)
    await rx.start()
    try:
        async with stack(router, fast_settings(), tenant.api_key) as (h, _):
            created = await h.subscribe(rx.url)
            assert created["ordering"] == "skip_refused"  # the default
            for n in range(4):
                await write_change(router, account, f"m{n}", 1)
            ids = await change_ids(router, account)

            # the later three arrive, in order, with the refused one's 28-hour window still open
            await eventually(lambda: len(rx.ok) == 3, 60, "the events after the refused one")
            assert [change_of(r) for r in rx.ok] == ids[1:]
            poisoned = [r for r in rx.received if r.headers["webhook-id"] == refuse.poison]
            assert len(poisoned) == MAX_REFUSALS and {change_of(r) for r in poisoned} == {ids[0]}
            # every refusal came before the lane moved on: order is kept, only the refused is skipped
            assert rx.received[:MAX_REFUSALS] == poisoned

            # failed in the log with its last status and the reason; the endpoint stays enabled
            failed = await deliveries(h, created["id"], "&state=failed")
            assert len(failed) == 1, failed
            bad = failed[0]
            assert bad["webhook_id"] == refuse.poison and int(bad["change_id"]) == ids[0]
            assert bad["attempts"] == MAX_REFUSALS and bad["last_status"] == 400
            assert "HTTP 400" in bad["last_error"] and "skip_refused" in bad["last_error"]
            assert bad["next_attempt_at"] is None and bad["finished_at"]
            status, detail = await h.call("GET", f"/v1/webhooks/{created['id']}/deliveries/{bad['id']}")
            assert status == 200
            assert [a["status_code"] for a in detail["attempts"]] == [400] * MAX_REFUSALS
            assert detail["attempts"][-1]["response_excerpt"] == "not now"
            status, endpoint = await h.call("GET", f"/v1/webhooks/{created['id']}")
            assert endpoint["enabled"] is True and endpoint["disabled_reason"] is None
            states = sorted(d["state"] for d in await deliveries(h, created["id"]))
            assert states == ["delivered"] * 3 + ["failed"]

            # the receiver is fixed: the failed one replays, same webhook-id and body
            rx.behaviour = accept
            status, body = await h.call("POST", f"/v1/webhooks/{created['id']}/deliveries/{bad['id']}/replay")
            assert status == 202 and body == {"replayed": 1}
            await eventually(lambda: len(rx.ok) == 4, 60, "the replayed delivery")
            assert rx.ok[3].headers["webhook-id"] == refuse.poison and rx.ok[3].body == poisoned[0].body
            replays = [d for d in await deliveries(h, created["id"]) if d["replay_of"] is not None]
            assert len(replays) == 1 and replays[0]["replay_of"] == bad["id"]
            assert replays[0]["state"] == "delivered" and replays[0]["attempts"] == 1
    finally:
        await rx.stop()


async def test_strict_ordering_holds_the_account_back(router: ShardRouter, tenant_factory: Any) -> None:
    tenant = await tenant_factory(router.shard_map.shards[:1])
    account = tenant.accounts[0].id
    refuse = RefuseFirstEvent()
    rx = Receiver(refuse)
    await rx.start()
    try:
        async with stack(router, fast_settings(), tenant.api_key) as (h, _):
            status, bad = await h.call("POST", "/v1/webhooks", {"url": rx.url, "ordering": "sequential"})
            assert status == 422, bad
            created = await h.subscribe(rx.url, ordering="strict")
            assert created["ordering"] == "strict"
            for n in range(3):
                await write_change(router, account, f"m{n}", 1)
            ids = await change_ids(router, account)

            # refused more often than skip_refused allows, and still nothing after it went out
            beyond = MAX_REFUSALS + 2
            await eventually(lambda: len(rx.received) >= beyond, 60, f"{beyond} refused attempts")
            assert rx.ok == []
            assert {r.headers["webhook-id"] for r in rx.received} == {refuse.poison}
            log = await deliveries(h, created["id"])
            assert sorted(d["state"] for d in log) == ["pending"] * 3
            head = next(d for d in log if int(d["change_id"]) == ids[0])
            assert head["attempts"] >= beyond and head["last_status"] == 400 and head["next_attempt_at"]
            status, endpoint = await h.call("GET", f"/v1/webhooks/{created['id']}")
            assert endpoint["enabled"] is True  # its 28-hour window is far from over

            # the application chooses to skip refused events after all: the lane moves on
            status, patched = await h.call(
                "PATCH", f"/v1/webhooks/{created['id']}", {"ordering": "skip_refused"}
            )
            assert status == 200 and patched["ordering"] == "skip_refused", patched
            await eventually(lambda: len(rx.ok) == 2, 60, "the events after the refused one")
            assert [change_of(r) for r in rx.ok] == ids[1:]
            failed = await deliveries(h, created["id"], "&state=failed")
            assert [int(d["change_id"]) for d in failed] == [ids[0]]
    finally:
        await rx.stop()


async def test_gone_disables_the_endpoint_and_keeps_the_delivery(
    router: ShardRouter, tenant_factory: Any
) -> None:
    tenant = await tenant_factory(router.shard_map.shards[:1])
    account = tenant.accounts[0].id

    async def gone(_: Receiver, __: web.Request) -> int:
        return 410

    rx = Receiver(gone)
    await rx.start()
    try:
        async with stack(router, fast_settings(), tenant.api_key) as (h, _):
            created = await h.subscribe(rx.url)
            await write_change(router, account, "a", 1)
            await write_change(router, account, "b", 1)
            ids = await change_ids(router, account)
            await eventually(lambda: len(rx.received) >= MAX_REFUSALS, 60, "the 410 answers")
            deadline = time.monotonic() + 60
            while (endpoint := (await h.call("GET", f"/v1/webhooks/{created['id']}"))[1])["enabled"]:
                assert time.monotonic() < deadline, "the endpoint was never disabled"
                await asyncio.sleep(0.2)
            assert "410 Gone" in endpoint["disabled_reason"] and endpoint["disabled_at"]
            assert len(rx.received) == MAX_REFUSALS
            log = await deliveries(h, created["id"])
            assert sorted(d["state"] for d in log) == ["pending", "pending"]  # nothing skipped

            # back again: both go out, in order, the first one included
            rx.behaviour = accept
            status, _ = await h.call("PATCH", f"/v1/webhooks/{created['id']}", {"enabled": True})
            assert status == 200
            await eventually(lambda: len(rx.ok) == 2, 60, "the deliveries after re-enabling")
            assert [change_of(r) for r in rx.ok] == ids
    finally:
        await rx.stop()
