"""Webhook target URLs: syntax, and the refusal of private and loopback addresses.

The check runs when a subscription is written and again before every delivery (a DNS name may
change what it points to).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Final
from urllib.parse import urlsplit

__all__ = ["MAX_URL_LENGTH", "TargetRefused", "check_target", "check_url_syntax", "is_public_address"]

MAX_URL_LENGTH: Final = 2048


class TargetRefused(ValueError):
    """The URL is malformed, or points where deliveries must not go."""


def check_url_syntax(url: str) -> tuple[str, int]:
    """(host, port) of a valid http(s) URL without credentials; raises :class:`TargetRefused`."""
    if len(url) > MAX_URL_LENGTH:
        raise TargetRefused(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"the URL is not valid: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise TargetRefused("the URL must be http or https")
    if not parts.hostname:
        raise TargetRefused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("the URL must not carry credentials")
    if parts.fragment:
        raise TargetRefused("the URL must not have a fragment")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def check_target(url: str, *, allow_private: bool) -> None:
    """Validate ``url`` and, unless ``allow_private``, refuse it when any address of its host is
    not public."""
    host, port = check_url_syntax(url)
    if allow_private:
        return
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise TargetRefused(f"the host {host!r} does not resolve: {exc}") from None
    for info in infos:
        address = str(info[4][0])
        if not is_public_address(address):
            raise TargetRefused(f"the host {host!r} resolves to {address}, a private or loopback address")
