"""libs.http: which errors answer 503 (a database that cannot be reached) and which stay 500s."""

from __future__ import annotations

import asyncmy.errors
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.errors import KafkaConnectionError

from libs.http import is_unavailable, problem_middleware
from libs.shards import ShardMoved, ShardReadOnly, UnknownShard


class Wrapped(Exception):
    pass


def _raised_from(cause: BaseException) -> Wrapped:
    try:
        raise Wrapped("wrapped") from cause
    except Wrapped as exc:
        return exc


@pytest.mark.parametrize(
    "exc",
    [
        asyncmy.errors.OperationalError(2003, "Can't connect to MySQL server on '127.0.0.1'"),
        asyncmy.errors.OperationalError(2013, "Lost connection to MySQL server during query"),
        asyncmy.errors.OperationalError(2006, "MySQL server has gone away"),
        asyncmy.errors.OperationalError(1040, "Too many connections"),
        asyncmy.errors.OperationalError(1053, "Server shutdown in progress"),
        asyncmy.errors.OperationalError(1927, "Connection was killed"),
        asyncmy.errors.OperationalError(1205, "Lock wait timeout exceeded"),
        asyncmy.errors.InterfaceError(0, "Not connected"),
        ConnectionRefusedError(111, "Connection refused"),
        ShardReadOnly("shard 3 is read-only while it moves"),
        # a read through a map older than a finished move, which dropped the old copy
        asyncmy.errors.ProgrammingError(1146, "Table 'flightlog_shard_0016.accounts' doesn't exist"),
        asyncmy.errors.OperationalError(1049, "Unknown database 'flightlog_shard_0016'"),
        ShardMoved("shard 16 is not where the shard map says"),
        KafkaConnectionError(),
        _raised_from(asyncmy.errors.OperationalError(2013, "Lost connection")),
    ],
)
def test_unavailable(exc: BaseException) -> None:
    assert is_unavailable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        asyncmy.errors.OperationalError(1054, "Unknown column 'x' in 'field list'"),
        asyncmy.errors.ProgrammingError(1064, "You have an error in your SQL syntax"),
        asyncmy.errors.IntegrityError(1062, "Duplicate entry"),
        asyncmy.errors.DataError(1406, "Data too long"),
        UnknownShard("shard 99 is not in the shard map"),
        KeyError("id"),
        AssertionError(),
        FileNotFoundError(2, "No such file"),
    ],
)
def test_a_bug_is_not_unavailable(exc: BaseException) -> None:
    assert not is_unavailable(exc)


async def _client(exc: Exception) -> TestClient[web.Request, web.Application]:
    async def handler(_: web.Request) -> web.Response:
        raise exc

    app = web.Application(middlewares=[problem_middleware])
    app.router.add_get("/", handler)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_middleware_answers_503_with_retry_after_and_no_address() -> None:
    client = await _client(
        asyncmy.errors.OperationalError(2003, "Can't connect to MySQL server on '10.1.2.3'")
    )
    try:
        resp = await client.get("/")
        doc = await resp.json(content_type=None)
        assert (resp.status, resp.content_type, resp.headers["Retry-After"]) == (
            503,
            "application/problem+json",
            "1",
        )
        assert doc["status"] == 503 and "10.1.2.3" not in doc["detail"]
    finally:
        await client.close()


async def test_middleware_keeps_a_bug_a_500() -> None:
    client = await _client(asyncmy.errors.OperationalError(1054, "Unknown column 'x'"))
    try:
        resp = await client.get("/")
        assert (resp.status, resp.content_type) == (500, "application/problem+json")
        assert "Retry-After" not in resp.headers
    finally:
        await client.close()
