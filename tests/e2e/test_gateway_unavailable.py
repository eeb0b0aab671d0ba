"""A shard's MariaDB server stops: every read path answers 503 problem+json with Retry-After.

The outage is real (the server process is stopped, then started again) but it is not the shared
stack's: the test runs a MariaDB server of its own (its own port and data directory under the
stack's state directory) holding a deployment of its own (global schema and two shards), with a
gateway and an ingest pointed at it. Other tests on the shared servers never see it go down.

The global schema sits on the same server, so key look-ups fail too. The gateway caches keys and
accounts for an hour here: a key and an account used before the outage still reach the shard
paths (list, get, delta ...), while a key and an account never looked up show the look-up's own
503.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Final

import aiohttp
import pytest

from cli.services import LocalService
from cli.stack import HOST, MariaDB, Stack
from libs.accounts import Account, create_account, create_api_key, create_application
from libs.config import DatabaseSettings, StackSettings
from libs.db import connect
from libs.db.migrate import migrate_global, migrate_shard
from libs.http import PROBLEM_CONTENT_TYPE
from libs.shards import ShardRouter, register_clusters
from tests.e2e.conftest import E2E_ENV, E2E_INSTANCE, E2E_PORT_OFFSET, GATEWAY_ENV
from tests.e2e.gateway_helpers import bearer, message_ids, record, seed

pytestmark = pytest.mark.e2e

GATEWAY_PORT: Final = 8080 + E2E_PORT_OFFSET + 20
INGEST_PORT: Final = 8081 + E2E_PORT_OFFSET + 20
GLOBAL_SCHEMA: Final = "flightlog_global_outage"
SHARDS: Final = 2
RECOVERY_WAIT_S: Final = 90.0  # the server's restart plus the pools' reconnect, on a busy machine
POLL_INTERVAL_S: Final = 0.2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server(stack: Stack) -> Iterator[MariaDB]:
    settings = StackSettings(
        state_dir=stack.settings.state_dir / "e2e-outage",
        mariadb_ports=(_free_port(),),
        mariadb_buffer_pool_mb=32,
    )
    server = MariaDB(settings, 0)
    server.up()  # creates its data directory the first time
    try:
        yield server
    finally:
        server.down()


@pytest.fixture(scope="module")
def db(server: MariaDB) -> DatabaseSettings:
    return DatabaseSettings(
        global_db_port=server.port, global_db_name=GLOBAL_SCHEMA, db_connect_timeout_s=2.0
    )


@pytest.fixture(scope="module")
async def private_router(server: MariaDB, db: DatabaseSettings) -> AsyncIterator[ShardRouter]:
    async with connect(db, HOST, server.port) as conn:
        await migrate_global(conn, GLOBAL_SCHEMA)
    shard_map = await register_clusters(db, [("outage", HOST, server.port)], SHARDS)
    for shard in shard_map.shards:
        async with connect(db, *shard_map.cluster_of(shard).primary) as conn:
            await migrate_shard(conn, shard)
    async with ShardRouter(db) as router:
        yield router


def _env(db: DatabaseSettings) -> dict[str, str]:
    return {
        **E2E_ENV,
        "FLIGHTLOG_GLOBAL_DB_PORT": str(db.global_db_port),
        "FLIGHTLOG_GLOBAL_DB_NAME": db.global_db_name,
        "FLIGHTLOG_DB_CONNECT_TIMEOUT_S": "2",
    }


@pytest.fixture(scope="module")
def services(stack: Stack, db: DatabaseSettings, private_router: ShardRouter) -> Iterator[dict[str, str]]:
    gateway = LocalService(
        "gateway",
        GATEWAY_PORT,
        stack.settings.state_dir,
        env={**_env(db), **GATEWAY_ENV, "FLIGHTLOG_GATEWAY_KEY_CACHE_TTL_S": "3600"},
        instance=f"{E2E_INSTANCE}-outage",
    )
    ingest = LocalService(
        "ingest",
        INGEST_PORT,
        stack.settings.state_dir,
        env={**_env(db), "FLIGHTLOG_IMAP_SYNC_ENABLED": "false"},
        instance=f"{E2E_INSTANCE}-outage",
    )
    started = []
    try:
        for svc in (gateway, ingest):
            svc.start(wait_s=0)
            started.append(svc)
        for svc in started:
            svc.wait_ready(90)
        yield {"gateway": gateway.address, "ingest": ingest.address}
    finally:
        for svc in started:
            svc.proc.stop(timeout_s=30)


@dataclass(frozen=True, slots=True)
class World:
    warm_key: str  # used before the outage: cached by the gateway
    cold_key: str  # never used before the outage
    warm: Account  # looked up before the outage
    cold: Account  # never looked up
    message_id: int


async def _world(router: ShardRouter) -> World:
    app, warm_key = await create_application(router, f"outage-{uuid.uuid4().hex[:8]}")
    _, cold_key = await create_api_key(router, app.id)
    warm = await create_account(router, app.id, f"warm-{uuid.uuid4().hex[:8]}@example.test", shard=1)
    cold = await create_account(router, app.id, f"cold-{uuid.uuid4().hex[:8]}@example.test", shard=2)
    await seed(router, [record(warm.id, "m1")])
    message_id = (await message_ids(router, warm.id))["m1"]
    return World(warm_key, cold_key, warm, cold, message_id)


@dataclass(frozen=True, slots=True)
class ReadPath:
    what: str
    path: str
    headers: dict[str, str]
    up_status: int = 200  # the answer while the server is up
    warm_up: bool = True  # asked before the outage (which caches its key and account)


def _read_paths(w: World) -> list[ReadPath]:
    """Every read path; the warm key and account reach the shard, the cold ones their look-ups."""
    a, warm, cold = w.warm.id, bearer(w.warm_key), bearer(w.cold_key)
    sse = {**warm, "Accept": "text/event-stream"}
    return [
        ReadPath("list messages", f"/v1/accounts/{a}/messages", warm),
        ReadPath("get message", f"/v1/messages/{w.message_id}", warm),
        ReadPath("delta", f"/v1/accounts/{a}/delta", warm),
        ReadPath("delta long-poll", f"/v1/accounts/{a}/delta?timeout=5", warm),
        ReadPath("delta SSE start", f"/v1/accounts/{a}/delta/stream", sse),
        ReadPath("latest cursor", f"/v1/accounts/{a}/delta/latest_cursor", warm),
        ReadPath("list accounts", "/v1/accounts", warm),
        ReadPath("list API keys", "/v1/api-keys", warm),
        ReadPath("list webhooks", "/v1/webhooks", warm),
        # Not an IMAP account: the store's answer is a 404, from the database.
        ReadPath("IMAP sync state", f"/v1/accounts/{a}/sync", warm, up_status=404),
        ReadPath("account look-up", f"/v1/accounts/{w.cold.id}", warm, warm_up=False),
        ReadPath("key look-up", f"/v1/accounts/{a}/messages", cold, warm_up=False),
    ]


async def _answer(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[int, str, str | None, int | None]:
    """(status, content type, Retry-After, the problem document's status) of a GET; an event stream
    that starts is not read further."""
    async with http.get(url, headers=headers) as resp:
        doc = await resp.json(content_type=None) if resp.content_type != "text/event-stream" else {}
        return resp.status, resp.content_type, resp.headers.get("Retry-After"), doc.get("status")


async def _wait_until(http: aiohttp.ClientSession, url: str, headers: dict[str, str], status: int) -> None:
    """Poll until the path answers ``status`` again (the pools reconnect on their own)."""
    async with asyncio.timeout(RECOVERY_WAIT_S):
        while True:
            if (await _answer(http, url, headers))[0] == status:
                return
            await asyncio.sleep(POLL_INTERVAL_S)


async def test_every_read_path_answers_503_while_the_shard_server_is_down(
    server: MariaDB, private_router: ShardRouter, services: dict[str, str]
) -> None:
    w = await _world(private_router)
    gateway, ingest = services["gateway"], services["ingest"]
    paths = _read_paths(w)
    event = {"account_id": str(w.warm.id), "message_key": "k", "type": "message.queued",
             "occurred_at": "2026-11-01T09:00:00Z"}  # fmt: skip
    unavailable = (503, PROBLEM_CONTENT_TYPE, "1", 503)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for p in paths:  # every path answers while the server is up, and the caches are warm
            if p.warm_up:
                assert (await _answer(http, gateway + p.path, p.headers))[0] == p.up_status, p.what

        await asyncio.to_thread(server.down)
        try:
            answers = {p.what: await _answer(http, gateway + p.path, p.headers) for p in paths}
            async with http.post(
                f"{ingest}/v1/events", json={"events": [event]}, headers=bearer(w.cold_key)
            ) as resp:
                doc = await resp.json(content_type=None)
                answers["ingest key look-up"] = (
                    resp.status, resp.content_type, resp.headers.get("Retry-After"), doc.get("status")
                )  # fmt: skip
        finally:
            await asyncio.to_thread(server.up)
        wrong = {what: answer for what, answer in answers.items() if answer != unavailable}
        assert not wrong, f"not 503 problem+json with Retry-After: {wrong}"

        # Back to normal without restarting the services.
        for p in paths:
            if "timeout=" not in p.path:
                await _wait_until(http, gateway + p.path, p.headers, p.up_status)
