"""Outbound connections a tenant points somewhere cannot be turned inward: a name that resolves
to a public address when it is checked and to 127.0.0.1 when it is connected to (DNS rebinding)
is refused at the connection, for webhook deliveries and IMAP alike, and nothing reaches the
local server; CR/LF never reach an IMAP command. Resolvers here are fakes that change their
answer; no traffic leaves the machine (the public answer is only ever checked, never dialled)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from libs.imap.client import AuthFailed, HostRefused, ImapConnection, ImapError, parse_list, quote_mailbox
from libs.outbound import AddressRefused, PublicResolver, resolve_public
from services.gateway.webhooks.targets import TargetRefused, check_target

PUBLIC = "93.184.216.34"  # answered to the check only; never connected to


class Rebinding(AbstractResolver):
    """Answers a public address once, then 127.0.0.1: what a rebinding attacker's DNS does."""

    def __init__(self) -> None:
        self.answers = [PUBLIC, "127.0.0.1"]

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[ResolveResult]:
        address = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return [
            {"hostname": host, "host": address, "port": port, "family": socket.AF_INET, "proto": 0,
             "flags": socket.AI_NUMERICHOST}
        ]  # fmt: skip

    async def close(self) -> None:
        pass


@pytest.fixture
async def local_receiver() -> AsyncIterator[tuple[int, list[str]]]:
    """An HTTP server on 127.0.0.1 standing for an internal service; it records what reaches it."""
    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="internal secrets")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield port, hits
    finally:
        await runner.cleanup()


async def post(resolver: AbstractResolver, port: int) -> int:
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.post(f"http://rebind.test:{port}/hook", data=b"{}") as resp,
    ):
        return resp.status


async def test_a_webhook_name_rebound_to_loopback_is_refused_at_the_connection(
    local_receiver: tuple[int, list[str]],
) -> None:
    port, hits = local_receiver
    rebinding = Rebinding()
    # the check a name gets first sees the public answer and passes ...
    assert (await rebinding.resolve("rebind.test", port))[0]["host"] == PUBLIC
    # ... and the delivery's own resolution, which now says 127.0.0.1, is refused before connecting
    with pytest.raises(aiohttp.ClientConnectorError) as refused:
        await post(PublicResolver(allow_private=False, inner=rebinding), port)
    assert isinstance(refused.value.os_error, AddressRefused)
    assert "127.0.0.1" in str(refused.value.os_error)
    assert hits == []


async def test_the_same_delivery_reaches_a_private_receiver_when_allowed(
    local_receiver: tuple[int, list[str]],
) -> None:
    """The control: what the refusal above prevents does happen without it."""
    port, hits = local_receiver
    rebinding = Rebinding()
    rebinding.answers = ["127.0.0.1"]
    assert await post(PublicResolver(allow_private=True, inner=rebinding), port) == 200
    assert hits == ["/hook"]


async def test_ip_literals_are_checked_without_resolving() -> None:
    with pytest.raises(TargetRefused, match="private or loopback"):
        await check_target("http://127.0.0.1:8080/x", allow_private=False, resolve=False)
    with pytest.raises(TargetRefused, match="private or loopback"):
        await check_target("http://[::ffff:10.0.0.1]/x", allow_private=False, resolve=False)
    await check_target("http://rebind.test/x", allow_private=False, resolve=False)  # the resolver's job


async def test_imap_connects_to_the_address_it_checked(
    monkeypatch: pytest.MonkeyPatch, local_receiver: tuple[int, list[str]]
) -> None:
    port, hits = local_receiver
    loop = asyncio.get_running_loop()
    answers = iter([PUBLIC, "127.0.0.1", "127.0.0.1"])

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    # The API's check of the account sees the public answer ...
    assert await resolve_public("imap.rebind.test", port, allow_private=False) == [PUBLIC]
    # ... the sync's connection resolves again, sees 127.0.0.1 and never connects.
    conn = ImapConnection("imap.rebind.test", port, "none", 5)
    with pytest.raises(HostRefused, match=r"127\.0\.0\.1"):
        await conn.connect("user", "password")
    assert hits == []
    with pytest.raises(AddressRefused):
        await resolve_public("imap.rebind.test", port, allow_private=False)


async def test_crlf_never_reaches_an_imap_command() -> None:
    conn = ImapConnection("127.0.0.1", 9, "none", 5, allow_private=True)  # never dialled
    for username, password in (("user\r\nA1 DELETE INBOX", "pw"), ("user", "pw\nA1 LOGOUT"), ("u\x00", "pw")):
        with pytest.raises(AuthFailed, match="control characters"):
            await conn.connect(username, password)
    assert conn.client is None
    with pytest.raises(ImapError, match="control characters"):
        quote_mailbox("INBOX\r\nA2 DELETE Sent")
    listed = parse_list([b'(\\HasNoChildren) "/" "Bad\x07Name"', b'(\\HasNoChildren) "/" "Good"'])
    assert [f.name for f in listed] == ["Good"]
