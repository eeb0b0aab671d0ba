"""Webhook delivery rules against real HTTP receivers on 127.0.0.1 and the real global database:
the event-type and account filters, the private-address check made again at delivery time, the
per-attempt timeout, the cap on endpoints per application, and the end of the old secret's
overlap after a rotation."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
import standardwebhooks
from aiohttp import web

from libs.shards import ShardRouter
from services.gateway.webhooks.store import utcnow
from tests.e2e.webhook_harness import Harness, api_server, dispatcher, fast_settings, relay, stack
from tests.e2e.webhook_helpers import Receiver, write_change
from tests.polling import eventually

pytestmark = pytest.mark.e2e

WAIT_S = 30.0  # an upper bound for each condition on a busy shared machine, not a measurement


async def deliveries(h: Harness, endpoint_id: str) -> list[dict[str, Any]]:
    status, log = await h.call("GET", f"/v1/webhooks/{endpoint_id}/deliveries?limit=500")
    assert status == 200, log
    found: list[dict[str, Any]] = log["data"]
    return found


def seen(receiver: Receiver) -> list[tuple[int, str]]:
    """(account, event type) of every delivery the receiver accepted, in arrival order."""
    return [(int(r.json["data"]["account_id"]), r.json["type"]) for r in receiver.ok]


async def test_event_type_and_account_filters(router: ShardRouter, tenant_factory: Any) -> None:
    tenant = await tenant_factory(router.shard_map.shards[:2])
    one, two = (a.id for a in tenant.accounts)
    created_only, first_account, everything = Receiver(), Receiver(), Receiver()
    for rx in (created_only, first_account, everything):
        await rx.start()
    try:
        async with stack(router, fast_settings(), tenant.api_key) as (h, _):
            by_type = await h.subscribe(created_only.url, event_types=["message.created"])
            by_account = await h.subscribe(first_account.url, account_ids=[str(one)])
            await h.subscribe(everything.url)
            for account in (one, two):
                await write_change(router, account, "m", 1)  # message.created
                await write_change(router, account, "m", 2)  # message.updated
                # A marker after them: a lane delivers in change order, and intake routes a change
                # to every endpoint at once, so once the markers are in nothing more can follow.
                await write_change(router, account, "marker", 1)
            created, updated = "message.created", "message.updated"
            await eventually(lambda: len(everything.ok) >= 6, WAIT_S, "the unfiltered endpoint's deliveries")
            await eventually(lambda: len(created_only.ok) >= 4, WAIT_S, "the created-only deliveries")
            await eventually(lambda: len(first_account.ok) >= 3, WAIT_S, "the one account's deliveries")

            assert sorted(seen(everything)) == sorted(
                [(a, t) for a in (one, two) for t in (created, updated, created)]
            )
            assert sorted(seen(created_only)) == sorted([(a, created) for a in (one, two) for _ in (1, 2)])
            assert seen(first_account) == [(one, created), (one, updated), (one, created)]
            # and nothing filtered out was even queued, to go out later
            assert {d["event_type"] for d in await deliveries(h, by_type["id"])} == {created}
            assert {d["account_id"] for d in await deliveries(h, by_account["id"])} == {str(one)}
            assert len(await deliveries(h, by_type["id"])) == 4
            assert len(await deliveries(h, by_account["id"])) == 3
    finally:
        for rx in (created_only, first_account, everything):
            await rx.stop()


async def test_a_status_change_goes_as_its_status_type_to_the_endpoints_that_ask(
    router: ShardRouter, tenant_factory: Any
) -> None:
    tenant = await tenant_factory(router.shard_map.shards[:1])
    (account,) = (a.id for a in tenant.accounts)
    by_status, default = Receiver(), Receiver()
    for rx in (by_status, default):
        await rx.start()
    try:
        async with stack(router, fast_settings(), tenant.api_key) as (h, _):
            await h.subscribe(
                by_status.url, event_types=["message.sent", "message.delivered", "message.updated"]
            )
            await h.subscribe(default.url)
            await write_change(router, account, "m", 1, status="sent")  # stored when sent
            await write_change(router, account, "m", 2, status="sent")  # new content, same status
            await write_change(router, account, "m", 3, status="delivered")  # the delivery report
            await eventually(lambda: len(by_status.ok) >= 3, WAIT_S, "the status endpoint's deliveries")
            await eventually(lambda: len(default.ok) >= 3, WAIT_S, "the default endpoint's deliveries")
            got = [
                (r.json["type"], r.json["data"]["change_type"], r.json["data"].get("status"))
                for r in by_status.ok
            ]
            assert got == [
                ("message.sent", "created", "sent"),
                ("message.updated", "updated", None),
                ("message.delivered", "updated", "delivered"),
            ]
            # Without asking: the change types as ever, the status in the data.
            plain = [(r.json["type"], r.json["data"].get("status")) for r in default.ok]
            assert plain == [
                ("message.created", "sent"),
                ("message.updated", None),
                ("message.updated", "delivered"),
            ]
    finally:
        for rx in (by_status, default):
            await rx.stop()


async def test_a_target_resolving_to_loopback_is_refused_at_delivery(
    router: ShardRouter, tenant_factory: Any
) -> None:
    """The API that took the subscription allowed private targets; the dispatcher does not. The
    host is a name (``localhost``), which is why the check is made again before every attempt:
    what a name resolves to can change after the subscription was checked."""
    tenant = await tenant_factory(router.shard_map.shards[:1])
    rx = Receiver()
    await rx.start()
    strict = fast_settings(webhooks_allow_private_targets=False)
    try:
        async with (
            api_server(router, fast_settings(), tenant.api_key) as h,
            relay(router, strict),
            dispatcher(router, strict),
        ):
            created = await h.subscribe(f"http://localhost:{rx.port}/hook")
            await write_change(router, tenant.accounts[0].id, "m", 1)

            async def tried_twice_or_reached() -> bool:
                log = await deliveries(h, created["id"])
                return bool(rx.received) or (bool(log) and log[0]["attempts"] >= 2)

            await eventually(tried_twice_or_reached, WAIT_S, "two attempts of the delivery")
            (delivery,) = await deliveries(h, created["id"])
            assert delivery["state"] == "pending" and delivery["last_status"] is None
            assert "target refused" in delivery["last_error"], delivery
            assert "private or loopback" in delivery["last_error"], delivery
            assert rx.received == [], "a request went to a loopback address"
    finally:
        await rx.stop()


async def test_a_receiver_that_never_answers_is_timed_out_and_retried(
    router: ShardRouter, tenant_factory: Any
) -> None:
    tenant = await tenant_factory(router.shard_map.shards[:1])
    release = asyncio.Event()

    async def silent(_: Receiver, __: web.Request) -> int:
        await release.wait()
        return 200

    rx = Receiver(silent)
    await rx.start()
    try:
        settings = fast_settings(webhooks_request_timeout_s=0.5)
        async with stack(router, settings, tenant.api_key) as (h, _):
            created = await h.subscribe(rx.url)
            await write_change(router, tenant.accounts[0].id, "m", 1)

            async def timed_out_twice() -> bool:
                log = await deliveries(h, created["id"])
                return bool(log) and log[0]["attempts"] >= 2

            await eventually(timed_out_twice, WAIT_S, "two timed-out attempts")
            (delivery,) = await deliveries(h, created["id"])
            assert delivery["state"] == "pending" and delivery["last_status"] is None
            assert "timed out" in delivery["last_error"], delivery
            assert len(rx.received) >= 2 and len({r.headers["webhook-id"] for r in rx.received}) == 1

            release.set()  # answering again: the next attempt is delivered

            async def delivered() -> bool:
                return bool((await deliveries(h, created["id"]))[0]["state"] == "delivered")

            await eventually(delivered, WAIT_S, "the delivery once the receiver answers")
    finally:
        release.set()
        await rx.stop()


async def test_at_most_50_endpoints_per_application(router: ShardRouter, tenant_factory: Any) -> None:
    tenant = await tenant_factory(router.shard_map.shards[:1])
    other = await tenant_factory(router.shard_map.shards[:1])
    settings = fast_settings()
    assert settings.webhooks_max_endpoints_per_application == 50
    async with api_server(router, settings, tenant.api_key) as h:
        made = [await h.subscribe(f"https://example.com/hook/{n}") for n in range(50)]
        status, body = await h.call("POST", "/v1/webhooks", {"url": "https://example.com/hook/50"})
        assert status == 409 and body["status"] == 409 and body["title"] == "Too many webhooks", body
        _, listed = await h.call("GET", "/v1/webhooks")
        assert len(listed["data"]) == 50
        # the cap is per application, and a deleted endpoint frees its place
        status, _ = await h.call("POST", "/v1/webhooks", {"url": "https://example.com/x"}, key=other.api_key)
        assert status == 201
        assert (await h.call("DELETE", f"/v1/webhooks/{made[0]['id']}"))[0] == 204
        await h.subscribe("https://example.com/hook/50")


async def _expire_previous_secret(router: ShardRouter, endpoint_id: str) -> None:
    """Move the end of the old secret's grace period (a day by default) into the past, as the clock
    would; bumping the endpoints' version like every write of the store, so dispatchers reload."""
    g = f"`{router.global_schema}`"
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"UPDATE {g}.webhook_endpoints SET previous_secret_expires_at = %s WHERE id = %s",
            (utcnow() - timedelta(seconds=1), int(endpoint_id)),
        )
        await cur.execute(f"UPDATE {g}.webhook_endpoints_version SET version = version + 1")
        await conn.commit()


async def test_the_old_secret_signs_until_its_grace_period_ends(
    router: ShardRouter, tenant_factory: Any
) -> None:
    tenant = await tenant_factory(router.shard_map.shards[:1])
    account = tenant.accounts[0].id
    rx = Receiver()
    await rx.start()
    try:
        async with stack(router, fast_settings(), tenant.api_key) as (h, _):
            created = await h.subscribe(rx.url)
            old = standardwebhooks.Webhook(created["secret"])
            status, rotated = await h.call("POST", f"/v1/webhooks/{created['id']}/rotate-secret")
            assert status == 200 and rotated["previous_secret_expires_at"]
            new = standardwebhooks.Webhook(rotated["secret"])

            await write_change(router, account, "a", 1)
            await eventually(lambda: len(rx.ok) == 1, WAIT_S, "the delivery during the overlap")
            overlap = rx.ok[0]
            assert len(overlap.headers["webhook-signature"].split()) == 2
            old.verify(overlap.body, overlap.headers)  # a receiver still holding the old secret
            new.verify(overlap.body, overlap.headers)

            await _expire_previous_secret(router, created["id"])
            await write_change(router, account, "a", 2)
            await eventually(lambda: len(rx.ok) == 2, WAIT_S, "the delivery after the expiry")
            after = rx.ok[1]
            assert len(after.headers["webhook-signature"].split()) == 1
            new.verify(after.body, after.headers)
            with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
                old.verify(after.body, after.headers)
    finally:
        await rx.stop()
