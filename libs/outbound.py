"""Outbound connections a tenant chooses the target of (webhook receivers, IMAP servers): resolve
once, refuse what is not a public address, and connect to the address that was checked.

Checking a name and then letting the client resolve it again is open to DNS rebinding: a name
that answers a public address to the check and 127.0.0.1 to the connection reaches the inside.
So the check *is* the resolution: :func:`resolve_public` returns the addresses to connect to, and
:class:`PublicResolver` is the resolver of the webhook dispatcher's aiohttp connector, which
connects only to the addresses it returned. An address is public when it is globally routable and
not multicast (an IPv4-mapped IPv6 address is judged as its IPv4 address); every address of a name
must be, or the name is refused, so a name cannot mix an inside address among public ones.

Exceptions::

    OSError
    └── AddressRefused   the target resolves to an address that is not public (or not at all)
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

__all__ = [
    "AddressRefused",
    "PublicResolver",
    "has_control_characters",
    "is_public_address",
    "resolve_public",
]


class AddressRefused(OSError):
    """The host is not public (or does not resolve); ``str()`` says which address and why."""


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id is not a global address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _refuse_private(host: str, addresses: list[str]) -> None:
    for address in addresses:
        if not is_public_address(address):
            raise AddressRefused(f"the host {host!r} resolves to {address}, a private or loopback address")


async def resolve_public(host: str, port: int, *, allow_private: bool) -> list[str]:
    """The addresses to connect to for ``host``, each checked (unless ``allow_private``)."""
    try:
        ipaddress.ip_address(host)
        addresses = [host]
    except ValueError:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise AddressRefused(f"the host {host!r} does not resolve: {exc}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise AddressRefused(f"the host {host!r} has no address")
    if not allow_private:
        _refuse_private(host, addresses)
    return addresses


class PublicResolver(AbstractResolver):
    """aiohttp's resolver, refusing a name with any non-public address (:class:`AddressRefused`,
    an ``OSError``, so the request fails as a connection error). aiohttp does not resolve an IP
    literal: check those with :func:`is_public_address` before the request."""

    def __init__(self, *, allow_private: bool, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()
        self._allow_private = allow_private

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not self._allow_private:
            _refuse_private(host, [str(r["host"]) for r in results])
        return results

    async def close(self) -> None:
        await self._inner.close()


def has_control_characters(text: str) -> bool:
    """True when ``text`` holds a C0 control character or DEL: a CR or LF in an IMAP command's
    argument would end the command and start another (command injection)."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
