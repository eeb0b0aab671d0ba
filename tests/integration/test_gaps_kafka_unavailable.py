"""Ingest and the gateway when Kafka is down or slow: 503 problem+json with Retry-After, nothing
accepted, ingest's rate-limit tokens given back, and a service that still stops on SIGTERM.

The shared Kafka is never stopped. The apps run in-process (as tests/integration/
test_apps_in_process.py serves them) with their producer bootstrapped from a broker stand-in on a
real socket: it answers what a producer needs to start (ApiVersions, Metadata and InitProducerId,
encoded with aiokafka's own protocol classes) and names the partitions' leader, but the leader is
either a broker at a port where nothing listens ("down") or the stand-in itself, which reads every
produce request and never answers ("slow").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.protocol.admin import ApiVersionResponse_v0
from aiokafka.protocol.metadata import MetadataResponse_v0
from aiokafka.protocol.produce import ProduceRequest_v3, ProduceResponse_v3
from aiokafka.protocol.transaction import InitProducerIdResponse_v0

from libs.accounts import create_account, create_application
from libs.config import ServiceSettings
from libs.http import PROBLEM_CONTENT_TYPE
from libs.service import ServiceContext, ServiceDefinition, build_app, serve
from libs.shards import ShardMap, ShardRouter
from services.gateway.service import DEFINITION as GATEWAY
from services.ingest.routes import LIMITER
from services.ingest.service import DEFINITION as INGEST
from tests.e2e.gateway_helpers import bearer, message_ids, record, seed
from tests.polling import eventually
from tests.scratch import app_name

pytestmark = pytest.mark.integration

HOST: Final = "127.0.0.1"
BURST: Final = 500  # the smallest burst ingest allows: one full batch
PRODUCE: Final = 0
API_VERSIONS: Final = 18
METADATA: Final = 3
INIT_PRODUCER_ID: Final = 22
# What the stand-in claims to speak: enough for the producer to start and to try to send.
SUPPORTED: Final = [(PRODUCE, 3, 3), (METADATA, 0, 0), (API_VERSIONS, 0, 0), (INIT_PRODUCER_ID, 0, 0)]


def _free_port() -> int:
    """A port where nothing listens (bound once, then released)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class StandInBroker:
    """A TCP server that lets a producer start and acknowledges no record until :meth:`recover`.

    :param leader_port: where the metadata puts the leader of every partition (broker 1): a port
        where nothing listens makes Kafka down; ``None`` makes the stand-in itself (broker 0) the
        leader, a slow one that reads produce requests and never answers them.
    """

    def __init__(self, leader_port: int | None) -> None:
        self._leader_port = leader_port
        self._servers: list[asyncio.Server] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._acknowledging = False
        self.unanswered = 0  # produce requests read and never answered

    @property
    def slow(self) -> bool:
        return self._leader_port is None

    @property
    def port(self) -> int:
        port: int = self._servers[0].sockets[0].getsockname()[1]
        return port

    async def __aenter__(self) -> StandInBroker:
        self._servers.append(await asyncio.start_server(self._serve, HOST, 0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self._servers:
            server.close()
        for writer in self._writers:
            writer.close()
        for server in self._servers:
            await server.wait_closed()

    async def recover(self) -> None:
        """Kafka is back: the leader answers produce requests (an idempotent producer retries its
        batches for ever, so without this its stop would wait for ever too)."""
        self._acknowledging = True
        if self._leader_port is not None:
            self._servers.append(await asyncio.start_server(self._serve, HOST, self._leader_port))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (size,) = struct.unpack(">i", await reader.readexactly(4))
                request = await reader.readexactly(size)
                api_key, _version, correlation_id = struct.unpack(">hhi", request[:8])
                body = self._answer(api_key, request)
                if body is None:
                    self.unanswered += 1
                    continue
                writer.write(struct.pack(">ii", len(body) + 4, correlation_id) + body)
                await writer.drain()

    def _answer(self, api_key: int, request: bytes) -> bytes | None:
        if api_key == API_VERSIONS:
            return bytes(ApiVersionResponse_v0(error_code=0, api_versions=SUPPORTED).encode())
        if api_key == METADATA:
            brokers = [(0, HOST, self.port)]
            leader = 0
            if self._leader_port is not None:
                brokers.append((1, HOST, self._leader_port))
                leader = 1
            topics = [(0, t, [(0, 0, leader, [leader], [leader])]) for t in _metadata_topics(request)]
            return bytes(MetadataResponse_v0(brokers=brokers, topics=topics).encode())
        if api_key == INIT_PRODUCER_ID:
            return bytes(
                InitProducerIdResponse_v0(
                    throttle_time_ms=0, error_code=0, producer_id=1, producer_epoch=0
                ).encode()
            )
        if api_key == PRODUCE and self._acknowledging:
            produce = ProduceRequest_v3.decode(request[10 + _string_length(request, 8) :])
            acknowledged = [(t, [(p, 0, 0, -1) for p, _ in parts]) for t, parts in produce.topics]
            return bytes(ProduceResponse_v3(topics=acknowledged, throttle_time_ms=0).encode())
        return None


def _string_length(data: bytes, at: int) -> int:
    (length,) = struct.unpack(">h", data[at : at + 2])
    return max(int(length), 0)


def _metadata_topics(request: bytes) -> list[str]:
    """The topic names of a MetadataRequest v0 (after the header: an array of strings)."""
    at = 10 + _string_length(request, 8)
    (count,) = struct.unpack(">i", request[at : at + 4])
    at += 4
    names = []
    for _ in range(max(count, 0)):
        (length,) = struct.unpack(">h", request[at : at + 2])
        names.append(request[at + 2 : at + 2 + length].decode())
        at += 2 + length
    return names


@pytest.fixture(params=["down", "slow"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[StandInBroker]:
    async with StandInBroker(_free_port() if request.param == "down" else None) as stand_in:
        yield stand_in


@pytest.fixture
def kafka_env(broker: StandInBroker, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("FLIGHTLOG_KAFKA_BOOTSTRAP_SERVERS", f"{HOST}:{broker.port}")
    # Short patience, so the app answers soon and its producer's stop gives up on the batches.
    monkeypatch.setenv("FLIGHTLOG_KAFKA_REQUEST_TIMEOUT_MS", "1000")
    monkeypatch.setenv("FLIGHTLOG_INGEST_PRODUCE_TIMEOUT_S", "1")
    monkeypatch.setenv("FLIGHTLOG_GATEWAY_PRODUCE_TIMEOUT_S", "1")
    # One full batch of tokens and next to no refill: a second batch goes through only if the
    # first one's tokens were given back.
    monkeypatch.setenv("FLIGHTLOG_INGEST_BURST_PER_ACCOUNT", str(BURST))
    monkeypatch.setenv("FLIGHTLOG_INGEST_RATE_PER_ACCOUNT_S", "0.001")
    yield


@asynccontextmanager
async def served(
    defn: ServiceDefinition, broker: StandInBroker
) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], ServiceContext]]:
    ctx = build_app(defn, ServiceSettings())
    server = TestServer(ctx.app)
    client: TestClient[web.Request, web.Application] = TestClient(server)
    async with server, client:
        ctx.set_ready()
        try:
            yield client, ctx
        finally:
            await broker.recover()


@pytest.fixture
async def tenant(router: ShardRouter, shard_map: ShardMap) -> tuple[str, int]:
    app, key = await create_application(router, app_name("kafka-down"))
    account = await create_account(router, app.id, f"{uuid.uuid4().hex[:8]}@example.test", shard=1)
    return key, account.id


async def unavailable(resp: Any) -> dict[str, Any]:
    assert resp.status == 503 and resp.content_type == PROBLEM_CONTENT_TYPE, (resp.status, await resp.text())
    assert int(resp.headers["Retry-After"]) >= 1
    doc: dict[str, Any] = await resp.json(content_type=PROBLEM_CONTENT_TYPE)
    assert doc["status"] == 503
    return doc


def batch(account_id: int, n: int) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat()
    return {
        "events": [
            {
                "account_id": str(account_id),
                "message_key": f"k{i}",
                "type": "message.queued",
                "occurred_at": now,
            }
            for i in range(n)
        ]
    }


async def test_ingest_answers_503_and_refunds_the_tokens(
    kafka_env: None, broker: StandInBroker, tenant: tuple[str, int]
) -> None:
    key, account_id = tenant
    async with served(INGEST, broker) as (client, ctx):
        limiter = ctx.app[LIMITER]
        for _ in range(2):  # the second full batch is affordable only if the first was refunded
            async with client.post("/v1/events", json=batch(account_id, BURST), headers=bearer(key)) as resp:
                doc = await unavailable(resp)
            assert "nothing was accepted" in doc["detail"]
            assert limiter.available(account_id) >= BURST
    if broker.slow:
        assert broker.unanswered > 0  # the producer did reach the leader


async def test_gateway_answers_503_when_kafka_does_not_acknowledge_a_change(
    kafka_env: None, broker: StandInBroker, tenant: tuple[str, int], router: ShardRouter
) -> None:
    key, account_id = tenant
    await seed(router, [record(account_id, "m1")])
    message_id = (await message_ids(router, account_id))["m1"]
    async with served(GATEWAY, broker) as (client, _):
        url = f"/v1/messages/{message_id}"
        async with client.patch(url, json={"unread": False}, headers=bearer(key)) as resp:
            doc = await unavailable(resp)
        assert "sending it again is safe" in doc["detail"]
        async with client.delete(url, headers=bearer(key)) as resp:
            await unavailable(resp)
        async with client.get(url, headers=bearer(key)) as resp:  # nothing changed
            assert resp.status == 200
            assert (await resp.json())["unread"] is True


async def test_a_service_stops_while_kafka_holds_its_batches(
    kafka_env: None,
    broker: StandInBroker,
    tenant: tuple[str, int],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGTERM while ingest's producer holds a batch Kafka never acknowledged (answered 503): the
    service drains, gives up on closing the producer after ``close_timeout_s`` and stops. An
    idempotent producer's stop() retries such a batch for as long as Kafka stays away."""
    monkeypatch.setenv("FLIGHTLOG_HTTP_PORT", str(_free_port()))
    monkeypatch.setenv("FLIGHTLOG_IMAP_SYNC_ENABLED", "false")
    monkeypatch.setenv("FLIGHTLOG_DRAIN_TIMEOUT_S", "1")
    monkeypatch.setenv("FLIGHTLOG_CLOSE_TIMEOUT_S", "1")
    settings = ServiceSettings()
    key, account_id = tenant
    base = f"http://{HOST}:{settings.http_port}"
    before = asyncio.all_tasks()
    service = asyncio.create_task(serve(INGEST, settings))
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with http.get(f"{base}/readyz") as resp:
                        return resp.status == 200
                return False

            await eventually(ready, 60, "ingest to be ready")
            async with http.post(
                f"{base}/v1/events", json=batch(account_id, 10), headers=bearer(key)
            ) as resp:
                await unavailable(resp)
        os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it on this loop
        await eventually(service.done, 60, "ingest to stop")
        await service  # it stopped cleanly, not by an error
    finally:
        if not service.done():  # a hang: let the producer finish, so the test ends either way
            await broker.recover()
            await service
        # what a process would end by exiting: the abandoned producer's tasks
        left = asyncio.all_tasks() - before - {asyncio.current_task()}
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
    assert "closing resources timed out" in caplog.text
