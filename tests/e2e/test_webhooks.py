"""Webhooks against real HTTP receivers on 127.0.0.1: the subscription API, delivery in order per
account through outages with the same webhook-id on retries, signatures checked by the
independent Standard Webhooks implementation, isolation from a slow endpoint, secret rotation,
replay, and disabling after the retry window."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import standardwebhooks
from aiohttp import web

from libs.shards import ShardRouter
from tests.e2e.webhook_harness import api_server, fast_settings, stack
from tests.e2e.webhook_helpers import Receiver, accept, change_ids, write_change
from tests.polling import eventually

pytestmark = pytest.mark.e2e


def verify_all(receiver: Receiver, *secrets: str) -> None:
    """Every request the receiver got verifies, with every given secret, by the reference code."""
    for secret in secrets:
        hook = standardwebhooks.Webhook(secret)
        for r in receiver.received:
            hook.verify(r.body, r.headers)


def per_account(received: list[Any]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for r in received:
        data = r.json["data"]
        out.setdefault(int(data["account_id"]), []).append(int(data["change_id"]))
    return out


async def test_subscription_api(router: ShardRouter, tenant_factory: Any) -> None:
    tenant = await tenant_factory(router.shard_map.shards[:2])
    other = await tenant_factory(router.shard_map.shards[:1])
    strict = fast_settings(webhooks_allow_private_targets=False)
    async with api_server(router, strict, tenant.api_key) as h:
        status, body = await h.call("POST", "/v1/webhooks", {"url": "http://127.0.0.1:9/hook"})
        assert status == 422 and "private or loopback" in body["detail"], body
        status, body = await h.call("POST", "/v1/webhooks", {"url": "http://10.1.2.3/hook"})
        assert status == 422, body
    async with api_server(router, fast_settings(), tenant.api_key) as h:
        for bad in ({"url": "ftp://example.com/x"}, {"url": "http://user:pw@example.com/x"},
                    {"url": "https://example.com/x", "event_types": ["message.exploded"]},
                    {"url": "https://example.com/x", "account_ids": [str(other.accounts[0].id)]},
                    {"url": "https://example.com/x", "surprise": 1}):  # fmt: skip
            status, body = await h.call("POST", "/v1/webhooks", bad)
            assert status == 422, (bad, body)
        assert (await h.call("POST", "/v1/webhooks", {"url": "https://example.com/x"}, key="flk_nope"))[
            0
        ] == 401

        created = await h.subscribe(
            "https://example.com/hook", event_types=["message.created"],
            account_ids=[str(tenant.accounts[0].id)], description="crm sync",
        )  # fmt: skip
        secret = created["secret"]
        assert secret.startswith("whsec_")
        wid = created["id"]
        status, got = await h.call("GET", f"/v1/webhooks/{wid}")
        assert status == 200 and "secret" not in got and got["account_ids"] == [str(tenant.accounts[0].id)]
        status, listed = await h.call("GET", "/v1/webhooks")
        assert [e["id"] for e in listed["data"]] == [wid]
        # another application sees nothing of it
        assert (await h.call("GET", f"/v1/webhooks/{wid}", key=other.api_key))[0] == 404
        assert (await h.call("DELETE", f"/v1/webhooks/{wid}", key=other.api_key))[0] == 404

        status, patched = await h.call(
            "PATCH", f"/v1/webhooks/{wid}", {"event_types": ["message.deleted", "message.updated"],
                                             "account_ids": None, "enabled": False})  # fmt: skip
        assert status == 200, patched
        assert patched["event_types"] == ["message.deleted", "message.updated"]
        assert patched["account_ids"] is None and patched["enabled"] is False

        status, rotated = await h.call("POST", f"/v1/webhooks/{wid}/rotate-secret")
        assert status == 200 and rotated["secret"] != secret and rotated["previous_secret_expires_at"]

        assert (await h.call("DELETE", f"/v1/webhooks/{wid}"))[0] == 204
        assert (await h.call("GET", f"/v1/webhooks/{wid}"))[0] == 404


async def test_receiver_down_then_flaky_gets_everything_in_order(
    router: ShardRouter, tenant_factory: Any
) -> None:
    """Down (connection refused) for 3 s, then 500 for its first 15 requests, then healthy: it
    gets every change of every account in commit order, with one webhook-id per event on all of
    that event's attempts."""
    tenant = await tenant_factory(router.shard_map.shards[:3])
    failures = {"left": 15}

    async def flaky(_: Receiver, __: web.Request) -> int:
        if failures["left"] > 0:
            failures["left"] -= 1
            return 500
        return 200

    receiver = Receiver(flaky)
    await receiver.start()
    port = receiver.port
    await receiver.stop()  # down: its port refuses connections
    settings = fast_settings()
    async with stack(router, settings, tenant.api_key) as (h, _):
        created = await h.subscribe(f"http://127.0.0.1:{port}/hook")
        for version in (1, 2, 3, 4):
            for acc in tenant.accounts:
                for n in range(3):
                    await write_change(router, acc.id, f"m{n}", version)
        expected = {acc.id: await change_ids(router, acc.id) for acc in tenant.accounts}
        total = sum(len(v) for v in expected.values())

        async def refused_twice() -> bool:
            _, log = await h.call("GET", f"/v1/webhooks/{created['id']}/deliveries?limit=500")
            return any(d["attempts"] >= 2 for d in log["data"])

        await eventually(refused_twice, 60, "a delivery refused twice while the receiver is down")
        receiver = Receiver(flaky, port=port)
        await receiver.start()
        try:
            await eventually(lambda: len(receiver.ok) >= total, 60, f"{total} deliveries")
            # A marker per account after the changes under test: a lane delivers in order, so once
            # every marker is in, nothing of the changes under test is still on its way.
            for acc in tenant.accounts:
                await write_change(router, acc.id, "marker", 1)
            markers = {acc.id: (await change_ids(router, acc.id))[-1] for acc in tenant.accounts}
            await eventually(
                lambda: set(markers.values()) <= {int(r.json["data"]["change_id"]) for r in receiver.ok},
                60, "every account's marker",
            )  # fmt: skip
            under_test = [r for r in receiver.ok if int(r.json["data"]["change_id"]) not in markers.values()]
            assert per_account(under_test) == expected, "lost, duplicated or reordered deliveries"
            verify_all(receiver, created["secret"])
            ids_by_change: dict[int, set[str]] = {}
            for r in receiver.received:
                ids_by_change.setdefault(int(r.json["data"]["change_id"]), set()).add(r.headers["webhook-id"])
            assert all(len(ids) == 1 for ids in ids_by_change.values()), "webhook-id changed on a retry"
            assert len(receiver.received) == total + len(markers) + 15

            # the delivery log shows the refused connections and the 500s of a retried event
            status, log = await h.call("GET", f"/v1/webhooks/{created['id']}/deliveries?limit=500")
            assert status == 200
            retried = [d for d in log["data"] if d["attempts"] > 1]
            assert retried and all(d["state"] == "delivered" for d in log["data"])
            # some were retried for the 500s alone, others for the refused connections too
            details = [
                (await h.call("GET", f"/v1/webhooks/{created['id']}/deliveries/{d['id']}"))[1]["attempts"]
                for d in retried
            ]
            assert all(a[-1]["status_code"] == 200 and a[-1]["response_excerpt"] == "thanks" for a in details)
            refused = [x for a in details for x in a if x["error"] and x["status_code"] is None]
            assert refused, "no refused attempt logged"
        finally:
            await receiver.stop()


async def test_slow_endpoint_does_not_delay_another(router: ShardRouter, tenant_factory: Any) -> None:
    tenant = await tenant_factory(router.shard_map.shards[:1])

    """The slow endpoint holds its first request until the fast one has every delivery: the fast
    one cannot have waited for it. (How fast is a figure of ``flightlog bench``.)"""
    release = asyncio.Event()

    async def slow(_: Receiver, __: web.Request) -> int:
        await release.wait()
        return 200

    slow_rx, fast_rx = Receiver(slow), Receiver()
    await slow_rx.start()
    await fast_rx.start()
    try:
        async with stack(router, fast_settings(), tenant.api_key) as (h, _):
            await h.subscribe(slow_rx.url)
            await h.subscribe(fast_rx.url)
            account = tenant.accounts[0].id
            for n in range(10):
                await write_change(router, account, f"m{n}", 1)
            await eventually(lambda: len(fast_rx.ok) == 10, 60, "the fast endpoint's deliveries")
            assert len(slow_rx.ok) == 0 and len(slow_rx.received) == 1  # one in flight, the rest queued
            assert per_account(fast_rx.ok) == {account: await change_ids(router, account)}
            release.set()
            await eventually(lambda: len(slow_rx.ok) == 10, 60, "the slow endpoint's deliveries")
            assert per_account(slow_rx.ok) == per_account(fast_rx.ok)
    finally:
        release.set()
        await fast_rx.stop()
        await slow_rx.stop()


async def test_rotation_signs_with_both_secrets_and_replay(router: ShardRouter, tenant_factory: Any) -> None:
    tenant = await tenant_factory(router.shard_map.shards[:1])
    account = tenant.accounts[0].id
    rx = Receiver()
    await rx.start()
    try:
        async with stack(router, fast_settings(), tenant.api_key) as (h, _):
            created = await h.subscribe(rx.url)
            await write_change(router, account, "a", 1)
            await eventually(lambda: len(rx.ok) == 1, 20, "the first delivery")
            assert len(rx.ok[0].headers["webhook-signature"].split()) == 1
            status, rotated = await h.call("POST", f"/v1/webhooks/{created['id']}/rotate-secret")
            assert status == 200
            await write_change(router, account, "a", 2)
            await eventually(lambda: len(rx.ok) == 2, 20, "the second delivery")
            assert len(rx.ok[1].headers["webhook-signature"].split()) == 2
            rx.received = rx.received[1:]
            verify_all(rx, created["secret"], rotated["secret"])  # either secret verifies

            # replay one delivery: same webhook-id and body, at the end of the lane
            status, log = await h.call("GET", f"/v1/webhooks/{created['id']}/deliveries")
            first = log["data"][-1]
            status, body = await h.call(
                "POST", f"/v1/webhooks/{created['id']}/deliveries/{first['id']}/replay"
            )
            assert status == 202 and body == {"replayed": 1}
            await eventually(lambda: len(rx.ok) == 3, 20, "the replayed delivery")
            assert rx.ok[2].headers["webhook-id"] == rx.ok[0].headers["webhook-id"]
            assert rx.ok[2].body == rx.ok[0].body
            # replay a time range: both originals again, in order
            since = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
            until = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
            status, body = await h.call("POST", f"/v1/webhooks/{created['id']}/replay",
                                        {"since": since, "until": until})  # fmt: skip
            assert status == 202 and body == {"replayed": 2}, body
            await eventually(lambda: len(rx.ok) == 5, 20, "the replayed range")
            assert [r.headers["webhook-id"] for r in rx.ok[3:]] == [
                r.headers["webhook-id"] for r in rx.ok[:2]
            ]
    finally:
        await rx.stop()


async def test_endpoint_disabled_after_the_retry_window(router: ShardRouter, tenant_factory: Any) -> None:
    tenant = await tenant_factory(router.shard_map.shards[:1])

    async def broken(_: Receiver, __: web.Request) -> int:
        return 503

    rx = Receiver(broken)
    await rx.start()
    try:
        async with stack(router, fast_settings(webhooks_retry_window_s=1.5), tenant.api_key) as (h, _):
            created = await h.subscribe(rx.url)
            await write_change(router, tenant.accounts[0].id, "x", 1)
            await write_change(router, tenant.accounts[0].id, "y", 1)

            async def disabled() -> bool:
                _, got = await h.call("GET", f"/v1/webhooks/{created['id']}")
                return got["enabled"] is False

            await eventually(disabled, 20, "the endpoint to be disabled")
            _, got = await h.call("GET", f"/v1/webhooks/{created['id']}")
            assert "HTTP 503" in got["disabled_reason"] and got["disabled_at"]
            _, log = await h.call("GET", f"/v1/webhooks/{created['id']}/deliveries")
            states = sorted(d["state"] for d in log["data"])
            assert states == ["failed", "pending"], states  # the second one waits for re-enabling
            assert {r.headers["webhook-id"] for r in rx.received} == {log["data"][-1]["webhook_id"]}

            # a change while disabled is kept for later, not sent
            sent = len(rx.received)
            await write_change(router, tenant.accounts[0].id, "z", 1)

            async def both_pending() -> bool:
                _, log = await h.call("GET", f"/v1/webhooks/{created['id']}/deliveries?state=pending")
                return len(log["data"]) == 2

            await eventually(both_pending, 20, "the change made while disabled to be queued")
            assert len(rx.received) == sent

            # re-enabled and healthy again: the waiting ones go out, in order
            rx.behaviour = accept
            status, _ = await h.call("PATCH", f"/v1/webhooks/{created['id']}", {"enabled": True})
            assert status == 200
            await eventually(lambda: len(rx.ok) == 2, 20, "the deliveries after re-enabling")
            assert len(rx.received) == sent + 2
            ids = await change_ids(router, tenant.accounts[0].id)
            assert [int(r.json["data"]["change_id"]) for r in rx.ok] == ids[1:]
    finally:
        await rx.stop()
