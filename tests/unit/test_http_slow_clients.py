"""Slow clients against a service's HTTP server on loopback, built as the runner builds it
(:func:`libs.service.build_app` and :func:`libs.service.make_runner`): a request whose head or
body arrives byte by byte is cut off with a 408, an idle keep-alive connection is not."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from libs.config import ServiceSettings
from libs.http import read_json
from libs.service import ServiceContext, ServiceDefinition, build_app, make_runner

HEAD_TIMEOUT_S = 0.5
BODY_TIMEOUT_S = 0.5
TRICKLE_INTERVAL_S = 0.05
# What a slow client would take to send everything: far beyond either timeout.
TRICKLE_BYTES = 400


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"got": await read_json(request, max_bytes=1 << 20)})


def _setup(app: web.Application) -> None:
    app.router.add_post("/echo", _echo)


async def _main(ctx: ServiceContext) -> None:  # never run: the test serves the app only
    raise AssertionError


DEFINITION = ServiceDefinition(name="slow-test", default_port=0, main=_main, setup_app=_setup)


@pytest.fixture
async def port() -> AsyncIterator[int]:
    settings = ServiceSettings(
        environment="development",
        http_head_timeout_s=HEAD_TIMEOUT_S,
        http_body_timeout_s=BODY_TIMEOUT_S,
        http_keepalive_timeout_s=60,
    )
    ctx = build_app(DEFINITION, settings)
    ctx.set_ready()
    runner = make_runner(ctx.app, settings)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def _trickle(writer: asyncio.StreamWriter, data: bytes) -> bool:
    """Send ``data`` a byte at a time; False when the server closed the connection first."""
    for i in range(len(data)):
        try:
            writer.write(data[i : i + 1])
            await writer.drain()
        except ConnectionError:
            return False
        await asyncio.sleep(TRICKLE_INTERVAL_S)
    return True


async def _cut_off(port: int, start: bytes, slow: bytes) -> tuple[bytes, bytes]:
    """Send ``start`` at once and ``slow`` byte by byte; the server's whole answer (head, body),
    read until it closed the connection, which must come before ``slow`` is all sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(start)
        trickling = asyncio.create_task(_trickle(writer, slow))
        answer = await reader.read()  # until EOF: the server closed the connection
        finished = trickling.done() and trickling.result()
        trickling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trickling
    finally:
        writer.close()
    assert not finished, "the slow client was never cut off"
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


async def test_a_head_sent_byte_by_byte_is_cut_off_with_408(port: int) -> None:
    head, body = await _cut_off(
        port, b"POST /echo HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " + b"a" * TRICKLE_BYTES + b"\r\n\r\n"
    )
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"Content-Type: application/problem+json" in head
    doc = orjson.loads(body)
    assert doc["status"] == 408 and "headers did not arrive" in doc["detail"]


async def test_a_connection_that_sends_nothing_is_cut_off(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        answer = await reader.read()  # the server closes it: nothing was asked
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_a_body_sent_byte_by_byte_is_cut_off_with_408(port: int) -> None:
    body_bytes = b'{"x": "' + b"a" * TRICKLE_BYTES + b'"}'
    head, body = await _cut_off(
        port,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body_bytes),
        body_bytes,
    )
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in head
    doc = orjson.loads(body)
    assert (
        doc["status"] == 408
        and doc["detail"] == f"the request body did not arrive within {BODY_TIMEOUT_S:g} s"
    )


async def test_a_prompt_request_after_an_idle_keep_alive_spell_is_answered(port: int) -> None:
    """The head's deadline runs from its first byte: idling between requests longer than it is
    the keep-alive timeout's business, not a slow head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    try:
        for _ in range(2):
            writer.write(request)
            status = await reader.readline()
            assert status.startswith(b"HTTP/1.1 200 "), status
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            assert orjson.loads(await reader.readexactly(length)) == {"got": {}}
            await asyncio.sleep(HEAD_TIMEOUT_S * 3)  # idle, the connection kept alive
    finally:
        writer.close()
