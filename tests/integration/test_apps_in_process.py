"""The gateway's and ingest's HTTP apps served in-process, exactly as the runner builds them
(:func:`libs.service.build_app`: the problem middleware, the readiness gate, the service's routes
and the cleanup contexts that open its resources against the real MariaDB and Kafka).

Handler behaviour that needs no pipeline is checked here in milliseconds instead of through a
service process; the e2e tests keep what needs processes (signals, the pipeline, crashes).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaProducer

from libs.accounts import AccountDirectory, create_account, create_application
from libs.config import ServiceSettings
from libs.openapi import route_operations
from libs.resources import DIRECTORY, PRODUCER, ROUTER
from libs.service import ServiceContext, ServiceDefinition, build_app
from libs.shards import ShardMap, ShardRouter
from services.gateway.admin import ADMIN_PREFIX
from services.gateway.openapi import DOC_PATHS, RUNNER_PATHS
from services.gateway.service import DEFINITION as GATEWAY
from services.ingest.routes import INTAKE
from services.ingest.service import DEFINITION as INGEST

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"
ADMIN = {"Authorization": "Bearer flightlog-dev-admin-key"}


@asynccontextmanager
async def served(
    defn: ServiceDefinition, *, ready: bool = True, management: bool = False
) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], ServiceContext]]:
    """The app on a test server: its public port, or with ``management`` its management port."""
    ctx = build_app(defn, ServiceSettings())
    server = TestServer(ctx.app)
    client: TestClient[web.Request, web.Application] = TestClient(server)
    async with server, client:
        if management:
            ctx.management_port = server.port or 0
        if ready:
            ctx.set_ready()
        yield client, ctx


@pytest.fixture
async def tenant(router: ShardRouter, shard_map: ShardMap, topics: None) -> tuple[str, int]:
    app, key = await create_application(router, f"in-process-{uuid.uuid4().hex[:8]}")
    account = await create_account(router, app.id, f"{uuid.uuid4().hex[:8]}@example.test", shard=1)
    return key, account.id


async def problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status and resp.content_type == PROBLEM, (resp.status, await resp.text())
    doc: dict[str, Any] = await resp.json(content_type=PROBLEM)
    assert doc["status"] == status
    return doc


async def test_gateway_resources_are_open_before_the_first_request(tenant: tuple[str, int]) -> None:
    async with served(GATEWAY, ready=False) as (client, ctx):
        app = ctx.app
        assert app[ROUTER].shard_map.shards
        assert isinstance(app[DIRECTORY], AccountDirectory)
        assert isinstance(app[PRODUCER], AIOKafkaProducer)
        async with client.get("/v1/accounts", headers={"Authorization": f"Bearer {tenant[0]}"}) as resp:
            await problem(resp, 503)  # the readiness gate, until main says ready
            assert resp.headers["Retry-After"] == "1"
        async with client.get("/healthz") as resp:
            assert resp.status == 200
        ctx.set_ready()
        async with client.get("/v1/accounts", headers={"Authorization": f"Bearer {tenant[0]}"}) as resp:
            assert resp.status == 200
            assert [a["id"] for a in (await resp.json())["data"]] == [str(tenant[1])]


async def test_gateway_errors_are_problem_documents(tenant: tuple[str, int]) -> None:
    key = {"Authorization": f"Bearer {tenant[0]}"}
    async with served(GATEWAY) as (client, _):
        for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer flk_unknown"}):
            for path in ("/v1/accounts", "/v1/webhooks", f"/v1/accounts/{tenant[1]}/sync"):
                async with client.get(path, headers=headers) as resp:
                    await problem(resp, 401)
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        async with client.get("/v1/nowhere", headers=key) as resp:
            await problem(resp, 404)
        async with client.put("/v1/accounts", headers=key) as resp:
            await problem(resp, 405)
        async with client.get("/v1/accounts?" + "x" * 5000, headers=key) as resp:
            await problem(resp, 414)
        async with client.get(f"/v1/accounts/{tenant[1] + 1}/sync", headers=key) as resp:
            assert (await problem(resp, 404))["detail"] == f"account {tenant[1] + 1} not found"
        async with client.get(f"/v1/accounts/{tenant[1]}/sync", headers=key) as resp:
            assert "not an IMAP account" in (await problem(resp, 404))["detail"]


async def test_management_routes_answer_on_the_management_port_only(tenant: tuple[str, int]) -> None:
    key = {"Authorization": f"Bearer {tenant[0]}"}
    management = ("/metrics", "/docs", "/openapi.json", "/v1/admin/applications")
    async with served(GATEWAY) as (client, _):
        for path in management:
            async with client.get(path, headers=ADMIN) as resp:
                assert (await problem(resp, 404))["detail"] == f"no resource at {path}"
        async with client.post("/v1/admin/applications", json={"name": "x"}, headers=ADMIN) as resp:
            await problem(resp, 404)
        async with client.get("/v1/accounts", headers=key) as resp:
            assert resp.status == 200
        async with client.get("/readyz") as resp:
            assert resp.status == 200
    async with served(GATEWAY, management=True) as (client, _):
        for path in ("/metrics", "/docs", "/openapi.json"):
            async with client.get(path) as resp:
                assert resp.status == 200, path
        async with client.post("/v1/admin/applications", json={"name": "x"}, headers=key) as resp:
            await problem(resp, 401)  # an application key is not the admin key
        async with client.get("/v1/accounts", headers=key) as resp:
            await problem(resp, 404)  # the public API is not on the management port
        async with client.get("/readyz") as resp:
            assert resp.status == 200
    async with served(INGEST) as (client, _):
        async with client.get("/metrics") as resp:
            await problem(resp, 404)
    async with served(INGEST, management=True) as (client, _):
        async with client.get("/metrics") as resp:
            assert resp.status == 200


async def test_the_served_document_lists_exactly_the_served_routes() -> None:
    async with served(GATEWAY, management=True) as (client, ctx):
        async with client.get("/openapi.json") as resp:
            assert resp.status == 200
            spec = await resp.json()
        async with client.get("/docs") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            page = await resp.text()
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    routes = route_operations(ctx.app, ())
    assert documented == {r for r in routes if r[1] not in (*DOC_PATHS, *RUNNER_PATHS)}
    assert {p for _, p in routes} >= {*DOC_PATHS, *RUNNER_PATHS}
    assert all(path in page for path in spec["paths"])


async def test_every_invalid_body_is_answered_alike(tenant: tuple[str, int]) -> None:
    key = {"Authorization": f"Bearer {tenant[0]}"}
    secret = "do-not-echo-me"
    cases = [
        ("/v1/admin/applications", {"name": "", "nme": secret}, ADMIN, "Invalid request body"),
        ("/v1/webhooks", {"url": 5, "surprise": secret}, key, "Invalid webhook"),
        ("/v1/accounts", {"email": "a@b.c", "host": "h", "username": "u", "password": 5, "port": secret},
         key, "Invalid account"),
    ]  # fmt: skip
    async with served(GATEWAY) as (client, ctx):
        for path, body, headers, title in cases:
            # the admin path on the management port (this server's, while it is asked)
            ctx.management_port = (client.port or 0) if path.startswith(ADMIN_PREFIX) else -1
            async with client.post(path, json=body, headers=headers) as resp:
                doc = await problem(resp, 422)
            assert doc["title"] == title and doc["errors"], doc
            assert all(set(e) == {"field", "message"} and e["field"] in doc["detail"] for e in doc["errors"])
            assert secret not in str(doc)


async def test_a_long_poll_ends_when_the_service_stops(tenant: tuple[str, int]) -> None:
    key = {"Authorization": f"Bearer {tenant[0]}"}
    async with served(GATEWAY) as (client, ctx):
        poll = asyncio.ensure_future(client.get(f"/v1/accounts/{tenant[1]}/delta?timeout=30", headers=key))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        ctx.stopping.set()
        async with await poll as resp:
            assert resp.status == 200 and (await resp.json())["deltas"] == []
        assert time.monotonic() - started < 5


async def test_ingest_errors_are_problem_documents_and_a_drain_refuses_new_batches(
    tenant: tuple[str, int],
) -> None:
    key = {"Authorization": f"Bearer {tenant[0]}"}
    async with served(INGEST) as (client, ctx):
        async with client.get("/v1/events/limits") as resp:
            assert resp.status == 200 and (await resp.json())["max_events_per_request"] == 500
        async with client.post("/v1/events", json={"events": []}) as resp:
            await problem(resp, 401)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        async with client.post("/v1/events", data=b"{}", headers=key) as resp:
            await problem(resp, 415)
        async with client.post(
            "/v1/events", data=b"{", headers={**key, "Content-Type": "application/json"}
        ) as resp:
            await problem(resp, 400)
        async with client.post("/v1/events", json={"events": []}, headers=key) as resp:
            assert (await problem(resp, 422))["title"] == "Invalid batch"
        await ctx.app[INTAKE].drain(1)
        async with client.post("/v1/events", json={"events": []}, headers=key) as resp:
            assert (await problem(resp, 503))["title"] == "Shutting down"


async def test_imap_accounts_are_refused_on_other_ports_private_hosts_and_control_characters(
    tenant: tuple[str, int],
) -> None:
    """With the production defaults (ports 143 and 993, public hosts only)."""
    key = {"Authorization": f"Bearer {tenant[0]}"}
    account = {"email": "a@example.test", "username": "a", "password": "secret", "tls_mode": "implicit"}
    async with served(GATEWAY) as (client, _):
        refusals = [
            ("127.0.0.1", 993, "Host not allowed"),
            ("10.1.2.3", 143, "Host not allowed"),
            ("127.0.0.1", 22, "Port not allowed"),
            ("imap.example.com", 6379, "Port not allowed"),  # refused before any resolution
        ]
        for host, port, title in refusals:
            async with client.post(
                "/v1/accounts", json={**account, "host": host, "port": port}, headers=key
            ) as resp:
                doc = await problem(resp, 422)
            assert doc["title"] == title, doc
        sneaky = {**account, "host": "imap.example.com", "password": "pw\r\nA1 DELETE INBOX"}
        async with client.post("/v1/accounts", json=sneaky, headers=key) as resp:
            doc = await problem(resp, 422)
        assert doc["title"] == "Invalid account" and doc["errors"][0]["field"] == "password", doc


async def test_oauth_accounts_are_validated_with_problem_documents(tenant: tuple[str, int]) -> None:
    """OAuth2 grants: one secret (a password or a grant), a known and configured provider (none
    is configured here), tokens without control characters and within their lengths."""
    key = {"Authorization": f"Bearer {tenant[0]}"}
    account = {"email": "a@example.test", "host": "imap.example.com", "username": "a"}
    grant = {"provider": "generic", "refresh_token": "rt-1"}
    invalid = [
        ({**account}, "(body)"),  # neither
        ({**account, "password": "pw", "oauth": grant}, "(body)"),  # both
        ({**account, "oauth": {**grant, "provider": "yahoo"}}, "oauth.provider"),
        ({**account, "oauth": {**grant, "refresh_token": "rt\r\nA1 LOGOUT"}}, "oauth.refresh_token"),
        ({**account, "oauth": {**grant, "refresh_token": "r" * 4097}}, "oauth.refresh_token"),
        ({**account, "oauth": {**grant, "access_token": "a b"}}, "oauth.access_token"),
        ({**account, "oauth": {**grant, "access_token": "a\x01auth=x"}}, "oauth.access_token"),
        ({**account, "oauth": {**grant, "access_token": "a" * 8193}}, "oauth.access_token"),
        ({**account, "oauth": {**grant, "sasl_mechanism": "plain"}}, "oauth.sasl_mechanism"),
        ({**account, "oauth": {**grant, "access_token_expires_in": 0}}, "oauth.access_token_expires_in"),
        ({**account, "oauth": {**grant, "client_secret": "x"}}, "oauth.client_secret"),
    ]
    async with served(GATEWAY) as (client, _):
        for body, field in invalid:
            async with client.post("/v1/accounts", json=body, headers=key) as resp:
                doc = await problem(resp, 422)
            assert doc["title"] == "Invalid account", doc
            assert any(e["field"].startswith(field) for e in doc["errors"]), (field, doc)
            assert "rt\r\n" not in str(doc) and "a" * 100 not in str(doc)  # no secret echoed
        for provider in ("google", "microsoft", "generic"):  # no client registered with any here
            body = {**account, "oauth": {**grant, "provider": provider}}
            async with client.post("/v1/accounts", json=body, headers=key) as resp:
                doc = await problem(resp, 422)
            assert doc["title"] == "OAuth2 provider not configured", doc
