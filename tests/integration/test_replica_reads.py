"""Message lists read from the shard's replica when FLIGHTLOG_GATEWAY_REPLICA_READS is on; a get
by id stays on the primary, and a replica that cannot be reached sends the list back there.

Which server answered is told by a row changed on the replica alone (outside replication, put
back afterwards): the list shows the replica's subject, the get the primary's.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cli.stack import MariaDB, Stack
from libs.accounts import create_account, create_application
from libs.config import ServiceSettings
from libs.db import shard_schema
from libs.events import Direction, MessageDoc, PostflightRecord, Status
from libs.ids import shard_of
from libs.service import build_app
from libs.shards import ShardMap, ShardRouter
from services.gateway.service import DEFINITION as GATEWAY
from services.persist.writer import write_shard
from tests.scratch import app_name

pytestmark = pytest.mark.integration


@asynccontextmanager
async def gateway(
    monkeypatch: pytest.MonkeyPatch, *, replica_reads: bool
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    monkeypatch.setenv("FLIGHTLOG_GATEWAY_REPLICA_READS", str(replica_reads).lower())
    ctx = build_app(GATEWAY, ServiceSettings())
    server = TestServer(ctx.app)
    client: TestClient[web.Request, web.Application] = TestClient(server)
    async with server, client:
        ctx.set_ready()
        yield client


@pytest.fixture
def replica_of_shard_1(stack: Stack, shard_map: ShardMap) -> Iterator[MariaDB]:
    cluster = shard_map.cluster_of(1)
    replica = next(
        r for r in stack.replicas if r.primary is not None and r.primary.port == cluster.primary[1]
    )
    assert cluster.replica == (cluster.replica[0], replica.port), "the map names the stack's replica"
    yield replica


async def _on_replica(replica: MariaDB, sql: str) -> list[list[str]]:
    return await asyncio.to_thread(replica.query, sql)


async def test_lists_read_the_replica_and_gets_the_primary(
    router: ShardRouter, replica_of_shard_1: MariaDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, key = await create_application(router, app_name("replica"))
    account = await create_account(router, app.id, f"{uuid.uuid4().hex[:8]}@example.test", shard=1)
    doc = MessageDoc(
        status=Status.DELIVERED,
        direction=Direction.OUTBOUND,
        subject="on the primary",
        occurred_at=datetime.now(UTC),
    )
    await write_shard(
        router, 1, [PostflightRecord(account_id=account.id, message_key="m", version=1, message=doc)]
    )
    table = f"`{shard_schema(shard_of(account.id))}`.messages"
    where = f"account_id = {account.id} AND message_key = 'm'"
    for _ in range(200):  # replication applies it within milliseconds
        if await _on_replica(replica_of_shard_1, f"SELECT id FROM {table} WHERE {where}"):
            break
        await asyncio.sleep(0.05)
    (row_id,) = (await _on_replica(replica_of_shard_1, f"SELECT id FROM {table} WHERE {where}"))[0]
    alone = "SET SESSION sql_log_bin = 0;"  # out of replication: the replica's binlog never sees it
    await _on_replica(
        replica_of_shard_1, f"{alone} UPDATE {table} SET subject = 'on the replica' WHERE {where}"
    )
    auth = {"Authorization": f"Bearer {key}"}
    try:
        async with gateway(monkeypatch, replica_reads=True) as client:
            async with client.get(f"/v1/accounts/{account.id}/messages", headers=auth) as resp:
                assert resp.status == 200, await resp.text()
                assert [m["subject"] for m in (await resp.json())["data"]] == ["on the replica"]
            async with client.get(f"/v1/messages/{row_id}", headers=auth) as resp:
                assert resp.status == 200 and (await resp.json())["subject"] == "on the primary"
        async with gateway(monkeypatch, replica_reads=False) as client:
            async with client.get(f"/v1/accounts/{account.id}/messages", headers=auth) as resp:
                assert [m["subject"] for m in (await resp.json())["data"]] == ["on the primary"]
    finally:
        await _on_replica(
            replica_of_shard_1, f"{alone} UPDATE {table} SET subject = 'on the primary' WHERE {where}"
        )
