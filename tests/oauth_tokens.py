"""Tokens from the stack's OAuth2 server (:mod:`cli.oauth_server`), obtained as a mail
application would: the authorization code grant, then the token endpoint. And the settings that
make flightlog's ``generic`` provider that server."""

from __future__ import annotations

import ssl
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import aiohttp

from cli.oauth_server import REDIRECT_URI
from cli.stack import OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, OAuthServer
from libs.oauth import OAuthSettings

__all__ = ["grant", "oauth_settings", "refresh", "revoke"]

_CLIENT: Final = {"client_id": OAUTH_CLIENT_ID, "client_secret": OAUTH_CLIENT_SECRET}  # client_secret_post


def oauth_settings(server: OAuthServer, **overrides: Any) -> OAuthSettings:
    values: dict[str, Any] = {
        "oauth_generic_authorization_url": f"{server.url}/authorize",
        "oauth_generic_token_url": f"{server.url}/token",
        "oauth_generic_client_id": OAUTH_CLIENT_ID,
        "oauth_generic_client_secret": OAUTH_CLIENT_SECRET,
        "oauth_tls_ca_file": str(server.tls_cert),
        **overrides,
    }
    return OAuthSettings(**values)


def _session(server: OAuthServer) -> aiohttp.ClientSession:
    tls = ssl.create_default_context(cafile=str(server.tls_cert))
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls))


async def grant(server: OAuthServer, username: str, lifetime_s: int | None = None) -> dict[str, Any]:
    """A user's consent and its first tokens (``access_token``, ``refresh_token``, ``expires_in``);
    ``lifetime_s`` sets the lifetime of every access token of the grant."""
    query = {
        "response_type": "code", "client_id": OAUTH_CLIENT_ID, "redirect_uri": REDIRECT_URI,
        "login_hint": username, "scope": "mail",
    }  # fmt: skip
    if lifetime_s is not None:
        query["access_token_lifetime_s"] = str(lifetime_s)
    async with _session(server) as http:
        async with http.get(f"{server.url}/authorize", params=query, allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            code = parse_qs(urlsplit(resp.headers["Location"]).query)["code"][0]
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI, **_CLIENT}
        async with http.post(f"{server.url}/token", data=form) as resp:
            assert resp.status == 200, await resp.text()
            tokens: dict[str, Any] = await resp.json()
    return tokens


async def refresh(server: OAuthServer, refresh_token: str) -> tuple[int, dict[str, Any]]:
    """What the token endpoint answers to a refresh (status and JSON body)."""
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, **_CLIENT}
    async with _session(server) as http, http.post(f"{server.url}/token", data=form) as resp:
        body: dict[str, Any] = await resp.json()
        return resp.status, body


async def revoke(server: OAuthServer, refresh_token: str) -> None:
    """Revoke a grant by its refresh token (RFC 7009), as a user removing the app's access does."""
    form = {"token": refresh_token, "token_type_hint": "refresh_token", **_CLIENT}
    async with _session(server) as http, http.post(f"{server.url}/revoke", data=form) as resp:
        assert resp.status == 200, await resp.text()
