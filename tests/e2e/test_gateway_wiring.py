"""What `make dev` runs as one gateway process: the webhook API and dispatcher in-process, and the
IMAP account API with its Kafka producer, behind the gateway's own API keys.

The gateway here is a process of its own with the dispatcher on (the other e2e gateways run
without one, so the webhook tests' dispatchers can hold the delivery lock); the change relay runs
in-process, or is persist's if a pipeline is up.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Final

import aiohttp
import orjson
import pytest
import standardwebhooks
from aiokafka import TopicPartition

from cli.services import LocalService, local_imap_env
from cli.stack import Stack
from libs.config import KafkaSettings
from libs.kafka import IMAP_ACCOUNTS, TOPICS, make_consumer
from libs.shards import ShardMap, ShardRouter
from tests.e2e.checks import offsets_since
from tests.e2e.conftest import E2E_INSTANCE, E2E_PORT_OFFSET
from tests.e2e.gateway_helpers import bearer
from tests.e2e.webhook_harness import FAST, fast_settings, relay
from tests.e2e.webhook_helpers import Receiver, metric_line, write_change
from tests.polling import eventually

pytestmark = pytest.mark.e2e

PORT: Final = 8080 + E2E_PORT_OFFSET + 20
PROBLEM: Final = "application/problem+json"


@pytest.fixture(scope="module")
def wired_gateway(stack: Stack, shard_map: ShardMap) -> Iterator[str]:
    env = {
        f"FLIGHTLOG_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in FAST.items()
    } | local_imap_env()  # accounts on the stack's Dovecot
    svc = LocalService("gateway", PORT, stack.settings.state_dir, env=env, instance=f"{E2E_INSTANCE}-wired")
    svc.start(wait_s=60)
    try:
        yield svc.address
    finally:
        svc.proc.stop(timeout_s=20)


async def call(
    http: aiohttp.ClientSession, method: str, url: str, key: str, json: Any = None
) -> tuple[int, Any, str]:
    async with http.request(method, url, json=json, headers=bearer(key)) as resp:
        body = await resp.json(content_type=None) if resp.status != 204 else None
        return resp.status, body, resp.content_type


async def test_webhooks_are_served_and_delivered_by_the_gateway(
    wired_gateway: str, http: aiohttp.ClientSession, router: ShardRouter, tenant_factory: Any
) -> None:
    async with http.get(f"{wired_gateway}/readyz") as resp:
        assert resp.status == 200
    await eventually(
        lambda: metric_line(PORT, b"flightlog_webhook_dispatcher_active 1.0"), 30, "the dispatcher to lead"
    )
    tenant = await tenant_factory(router.shard_map.shards[:2])
    other = await tenant_factory(router.shard_map.shards[:1])
    hooks = f"{wired_gateway}/v1/webhooks"

    # the gateway's own authentication: a problem document with the Bearer challenge
    async with http.get(hooks, headers={"Authorization": "Basic abc"}) as resp:
        assert resp.status == 401 and resp.content_type == PROBLEM
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await call(http, "GET", hooks, "x" * 500))[0] == 401

    rx = Receiver()
    await rx.start()
    try:
        status, created, _ = await call(http, "POST", hooks, tenant.api_key, {"url": rx.url})
        assert status == 201 and created["secret"].startswith("whsec_"), created
        wid = created["id"]
        status, body, ctype = await call(http, "GET", f"{hooks}/{wid}", other.api_key)
        assert status == 404 and ctype == PROBLEM
        status, body, ctype = await call(http, "POST", hooks, tenant.api_key, {"url": rx.url, "x": 1})
        assert status == 422 and ctype == PROBLEM

        started = time.monotonic()
        async with relay(router, fast_settings()):
            for account in tenant.accounts:
                await write_change(router, account.id, "hooked", 1)
            await eventually(lambda: len(rx.ok) >= 2, 30, "two deliveries")
        print(f"\ntwo changes delivered by the gateway's dispatcher in {time.monotonic() - started:.2f} s")
        hook = standardwebhooks.Webhook(created["secret"])
        for r in rx.ok:
            hook.verify(r.body, r.headers)
        assert {r.json["data"]["account_id"] for r in rx.ok} == {str(a.id) for a in tenant.accounts}

        status, page, _ = await call(http, "GET", f"{hooks}/{wid}/deliveries", tenant.api_key)
        assert status == 200 and len(page["data"]) == 2
        assert {d["state"] for d in page["data"]} == {"delivered"}
        for bad in ("limit=0", "limit=x", "before=-1", "state=lost"):
            assert (await call(http, "GET", f"{hooks}/{wid}/deliveries?{bad}", tenant.api_key))[0] == 400
        delivery_id = page["data"][0]["id"]
        status, body, _ = await call(
            http, "POST", f"{hooks}/{wid}/deliveries/{delivery_id}/replay", tenant.api_key
        )
        assert status == 202 and body == {"replayed": 1}
        await eventually(lambda: len(rx.ok) >= 3, 30, "the replayed delivery")
        assert rx.ok[-1].headers["webhook-id"] == page["data"][0]["webhook_id"]  # the same event id
        status, body, _ = await call(http, "DELETE", f"{hooks}/{wid}", tenant.api_key)
        assert status == 204
    finally:
        await rx.stop()


async def imap_record(
    settings: KafkaSettings, account_id: str, version: int | None, timeout_s: float, since_ms: int
) -> bool:
    """Whether flightlog.imap-accounts carries ``version`` of the account, or with None its
    tombstone (read from ``since_ms``, before the account was made)."""
    consumer = make_consumer(settings, group_id=None)
    async with consumer:
        partitions = next(spec.partitions for spec in TOPICS if spec.name == IMAP_ACCOUNTS)
        tps = [TopicPartition(IMAP_ACCOUNTS, p) for p in range(partitions)]
        consumer.assign(tps)
        for tp, offset in (await offsets_since(consumer, tps, since_ms)).items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for records in batch.values():
                for r in records:
                    if r.key != account_id.encode():
                        continue
                    if (
                        r.value is None
                        if version is None
                        else orjson.loads(r.value)["credentials_version"] == version
                    ):
                        return True
    return False


async def test_imap_accounts_are_created_and_their_credentials_changed(
    wired_gateway: str,
    http: aiohttp.ClientSession,
    router: ShardRouter,
    tenant_factory: Any,
    kafka_settings: KafkaSettings,
) -> None:
    tenant = await tenant_factory(router.shard_map.shards[:1])
    other = await tenant_factory(router.shard_map.shards[:1])
    base = f"{wired_gateway}/v1/accounts"
    new = {
        "email": "nobody@example.test", "host": "127.0.0.1", "port": 1144, "tls_mode": "none",
        "username": "nobody", "password": "wrong",
    }  # fmt: skip
    for bad in (
        {**new, "port": "1144"}, {**new, "tls_mode": "none", "host": "imap.example.com"},
        {**new, "surprise": 1}, {**new, "shard": 65535}, {k: v for k, v in new.items() if k != "password"},
    ):  # fmt: skip
        status, body, ctype = await call(http, "POST", base, tenant.api_key, bad)
        assert status == 422 and ctype == PROBLEM, (bad, body)

    status, created, _ = await call(http, "POST", base, tenant.api_key, new)
    assert status == 201, created
    assert created["provider"] == "imap" and created["credentials_version"] == 1
    assert "password" not in created and "wrong" not in str(created)
    account_id = created["id"]
    assert await imap_record(kafka_settings, account_id, 1, 10, tenant.created_ms)

    status, sync, _ = await call(http, "GET", f"{base}/{account_id}/sync", tenant.api_key)
    assert status == 200 and sync["id"] == account_id and sync["username"] == "nobody"

    creds = f"{base}/{account_id}/credentials"
    status, body, _ = await call(http, "PATCH", creds, tenant.api_key, {"password": "still wrong"})
    assert status == 200 and body["credentials_version"] == 2 and body["username"] == "nobody", body
    status, body, _ = await call(http, "PATCH", creds, tenant.api_key, {"username": "u2", "password": "p"})
    assert status == 200 and body["credentials_version"] == 3 and body["username"] == "u2"
    assert await imap_record(kafka_settings, account_id, 3, 10, tenant.created_ms)
    bad_credentials: list[dict[str, Any]] = [
        {},
        {"password": ""},
        {"password": 5},
        {"password": "p", "host": "x"},
    ]
    for bad in bad_credentials:
        status, body, ctype = await call(http, "PATCH", creds, tenant.api_key, bad)
        assert status == 422 and ctype == PROBLEM, (bad, body)

    # another application's key: exactly the answer of an account that does not exist
    missing = str(int(account_id) + 1_000_000)
    for method, path, payload in (
        ("GET", "sync", None), ("PATCH", "credentials", {"password": "p"}), ("DELETE", "credentials", None),
    ):  # fmt: skip
        status, reference, _ = await call(http, method, f"{base}/{missing}/{path}", other.api_key, payload)
        assert status == 404
        status, body, ctype = await call(http, method, f"{base}/{account_id}/{path}", other.api_key, payload)
        assert status == 404 and ctype == PROBLEM
        assert body["detail"].replace(account_id, "<id>") == reference["detail"].replace(missing, "<id>")
    # an account of the application that is not an IMAP account
    events_account = str(tenant.accounts[0].id)
    status, body, _ = await call(http, "PATCH", f"{base}/{events_account}/credentials", tenant.api_key,
                                 {"password": "p"})  # fmt: skip
    assert status == 404 and "not an IMAP account" in body["detail"]

    # disconnect: the sync stops (a tombstone on the accounts topic) and the password is forgotten
    status, body, _ = await call(http, "DELETE", creds, tenant.api_key)
    assert status == 200 and body["state"] == "disconnected" and body["credentials_version"] == 4, body
    assert await imap_record(kafka_settings, account_id, None, 10, tenant.created_ms)
    status, body, _ = await call(http, "PATCH", creds, tenant.api_key, {"password": "back"})
    assert status == 200 and body["state"] == "pending" and body["credentials_version"] == 5
