"""Webhook target URLs: syntax, and the refusal of private and loopback addresses.

The check runs when a subscription is written, with a resolution of the name for an early answer;
each delivery connects only to addresses checked as it resolves them (libs/outbound.py), since a
DNS name may change what it points to between the check and the connection.
"""

from __future__ import annotations

import ipaddress
from typing import Final
from urllib.parse import urlsplit

from libs.outbound import AddressRefused, resolve_public

__all__ = ["MAX_URL_LENGTH", "TargetRefused", "check_target", "check_url_syntax"]

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


async def check_target(url: str, *, allow_private: bool, resolve: bool = True) -> None:
    """Validate ``url`` and, unless ``allow_private``, refuse it when its host is an address that
    is not public or (``resolve``) a name with any such address. A delivery checks the syntax
    and IP literals only (``resolve=False``): the dispatcher's connector resolves names through
    :class:`libs.outbound.PublicResolver` and connects to the addresses it checked."""
    host, port = check_url_syntax(url)
    if allow_private:
        return
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not resolve:
            return
    try:
        await resolve_public(host, port, allow_private=False)
    except AddressRefused as exc:
        raise TargetRefused(str(exc)) from None
