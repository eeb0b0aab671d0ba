"""The one error model: Bearer keys, validation errors and the backoff, without a server."""

from __future__ import annotations

import asyncio
import random
from typing import Annotated

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from libs.backoff import backoff_s
from libs.http import (
    MAX_VALIDATION_ERRORS,
    ProblemAppRunner,
    Unauthorized,
    bearer_token,
    invalid_body,
    validation_errors,
)


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("BEARER flk_1", "flk_1")],
)
def test_bearer_token_is_read_in_any_case(header: str, token: str) -> None:
    assert bearer_token(make_mocked_request("GET", "/", headers={"Authorization": header})) == token


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer", "Bearer   ", "abc"])
def test_anything_else_is_a_401_with_the_challenge(header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    with pytest.raises(Unauthorized) as caught:
        bearer_token(make_mocked_request("GET", "/", headers=headers))
    response = caught.value.response()
    assert response.status == 401 and response.content_type == "application/problem+json"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="flightlog"'


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, Field(min_length=1)]
    port: int = 1


def _error(data: object) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        Model.model_validate(data)
    return caught.value


def test_validation_errors_name_the_field_and_never_echo_the_input() -> None:
    problem = invalid_body(_error({"name": "", "port": "secret-993", "x": 1}), "Invalid thing")
    doc = orjson.loads(problem.response().body)  # type: ignore[arg-type]
    assert doc["status"] == 422 and doc["title"] == "Invalid thing"
    assert {e["field"] for e in doc["errors"]} == {"name", "port", "x"}
    assert "secret-993" not in orjson.dumps(doc).decode()
    assert all(f"{e['field']}: {e['message']}" in doc["detail"] for e in doc["errors"])


def test_the_document_itself_has_a_name_and_the_list_is_bounded() -> None:
    assert validation_errors(_error([1]))[0]["field"] == "(body)"
    assert validation_errors(_error("x"), whole="(item)")[0]["field"] == "(item)"

    class Many(BaseModel):
        values: list[int]

    with pytest.raises(ValidationError) as caught:
        Many.model_validate({"values": ["a"] * 100})
    assert len(validation_errors(caught.value)) == MAX_VALIDATION_ERRORS


def test_backoff_doubles_to_its_cap_and_jitters_as_asked() -> None:
    assert [backoff_s(n, 0.5, 30) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff_s(10_000, 1, 300) == 300  # no overflow however long it failed
    rng = random.Random(1)
    full = [backoff_s(4, 1, 300, jitter="full", rand=rng.random) for _ in range(200)]
    assert all(0 <= d < 8 for d in full) and min(full) < 1 < 7 < max(full)
    spread = [backoff_s(4, 1, 300, jitter="spread", rand=rng.random) for _ in range(200)]
    assert all(6 <= d < 10 for d in spread)


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # request line over 8 KiB
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    ],
)
async def test_what_the_http_parser_refuses_is_a_problem_document_too(request_head: bytes) -> None:
    """No middleware sees these requests: the runner's connection handler answers them."""

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = ProblemAppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_head)
        head, _, body = (await reader.read()).partition(b"\r\n\r\n")
        writer.close()
    finally:
        await runner.cleanup()
    assert head.split(b" ")[1] == b"400"
    assert b"Content-Type: application/problem+json" in head
    doc = orjson.loads(body)
    assert doc["status"] == 400 and doc["title"] == "Bad Request" and doc["detail"]
