"""A small OAuth2 authorization server for the local stack: what Google or Microsoft are to a
real mailbox, for the stack's OAuth2 Dovecot (``dovecot-oauth``) and the tests.

Built on authlib's server side (the framework-neutral ``AuthorizationServer``, its grants and the
RFC 7009 and RFC 7662 endpoints) with aiohttp underneath; everything is kept in memory, so a
restart forgets every grant. It lives in ``cli`` beside the stack that starts it (``flightlog
stack up`` runs it as a plain process, ``python -m cli.oauth_server``), not in ``tests``: a
developer's ``make dev`` has it too, and the CLI does not import the tests.

Endpoints, over TLS with a self-signed certificate:

- ``GET /authorize``: the authorization code grant. There is no login page: the user is the
  ``login_hint`` (an IMAP username) and consent is given at once. ``access_token_lifetime_s``
  sets the lifetime of every access token of this grant (short ones for the expiry tests),
  otherwise the server's default.
- ``POST /token``: ``authorization_code`` and ``refresh_token`` grants. A refresh rotates the
  refresh token (as Microsoft's does; Google's keeps it), so clients must store the new one.
- ``POST /revoke`` (RFC 7009): revoking a refresh token revokes its whole grant, every access
  token included, as Google does.
- ``POST /introspect`` (RFC 7662): for the resource server's client only (Dovecot, with HTTP
  Basic credentials); ``username`` is the grant's user.
"""

from __future__ import annotations

import argparse
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import orjson
from aiohttp import web
from authlib.common.security import generate_token
from authlib.oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, OAuth2Request, grants
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7662 import IntrospectionEndpoint

__all__ = ["DEFAULT_ACCESS_TOKEN_LIFETIME_S", "REDIRECT_URI", "TokenServer", "make_app"]

DEFAULT_ACCESS_TOKEN_LIFETIME_S: Final = 3600
MAX_ACCESS_TOKEN_LIFETIME_S: Final = 86_400
# The mail client's registered redirect: nothing listens there; the code is read off the Location.
REDIRECT_URI: Final = "https://127.0.0.1/oauth/callback"
MAX_BODY_BYTES: Final = 64 * 1024
_CLIENT_AUTH: Final = ("client_secret_basic", "client_secret_post")


@dataclass(frozen=True, slots=True)
class Client(ClientMixin):  # type: ignore[misc]
    client_id: str
    client_secret: str
    grant_types: tuple[str, ...]
    redirect_uri: str = REDIRECT_URI

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_allowed_scope(self, scope: str) -> str:
        return scope or ""

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri == self.redirect_uri

    def check_client_secret(self, client_secret: str) -> bool:
        return bool(client_secret) and client_secret == self.client_secret

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in _CLIENT_AUTH

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in self.grant_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types


@dataclass(slots=True)
class Grant:
    """One user's consent to one client: its tokens die with it."""

    username: str
    client_id: str
    scope: str
    access_token_lifetime_s: int
    revoked: bool = False


@dataclass(slots=True)
class Token:
    grant: Grant
    access_token: str
    refresh_token: str | None
    issued_at: int
    expires_in: int
    refresh_revoked: bool = False  # rotated away by a refresh

    def check_client(self, client: Client) -> bool:
        return self.grant.client_id == client.client_id

    def get_scope(self) -> str:
        return self.grant.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return self.grant.revoked

    def get_user(self) -> Grant:
        return self.grant


@dataclass(slots=True)
class Code:
    code: str
    grant: Grant
    redirect_uri: str
    expires_at: float = field(default_factory=lambda: time.time() + 300)

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.grant.scope


class TokenServer(AuthorizationServer):  # type: ignore[misc]
    """authlib's server on aiohttp, its state in dicts.

    :param clients: the registered clients (the mail client and the resource server).
    :param default_lifetime_s: access token lifetime of a grant that does not set one.
    """

    def __init__(self, clients: list[Client], default_lifetime_s: int) -> None:
        super().__init__()
        self.clients = {c.client_id: c for c in clients}
        self.default_lifetime_s = default_lifetime_s
        self.codes: dict[str, Code] = {}
        self.by_access: dict[str, Token] = {}
        self.by_refresh: dict[str, Token] = {}
        self.register_token_generator("default", BearerTokenGenerator(_token, _token))
        self.register_grant(_AuthorizationCodeGrant)
        self.register_grant(_RefreshTokenGrant)
        self.register_endpoint(_Revocation)
        self.register_endpoint(_Introspection)

    def query_client(self, client_id: str) -> Client | None:
        return self.clients.get(client_id)

    def generate_token(self, grant_type: str, client: Client, user: Grant | None = None, **kw: Any) -> Any:
        if user is not None:
            kw["expires_in"] = user.access_token_lifetime_s
        return super().generate_token(grant_type, client, user=user, **kw)

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        grant: Grant = request.user
        saved = Token(
            grant,
            token["access_token"],
            token.get("refresh_token"),
            int(time.time()),
            int(token["expires_in"]),
        )
        self.by_access[saved.access_token] = saved
        if saved.refresh_token:
            self.by_refresh[saved.refresh_token] = saved

    def find(self, value: str, hint: str | None) -> Token | None:
        if hint == "refresh_token":
            return self.by_refresh.get(value)
        if hint == "access_token":
            return self.by_access.get(value)
        return self.by_access.get(value) or self.by_refresh.get(value)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass

    def create_oauth2_request(self, request: _Request) -> _Request:
        return request  # read by the handler: aiohttp reads bodies asynchronously

    def handle_response(self, status: int, body: Any, headers: list[tuple[str, str]]) -> web.Response:
        # a JSON answer, or a redirect (the authorization code) with an empty body
        raw = orjson.dumps(body) if isinstance(body, dict) else str(body or "").encode()
        return web.Response(status=status, body=raw, headers=dict(headers))


class _Request(OAuth2Request):  # type: ignore[misc]
    """An aiohttp request as authlib reads it: its query and its (already read) form."""

    def __init__(self, request: web.Request, form: dict[str, str]) -> None:
        super().__init__(request.method, str(request.url), headers=dict(request.headers))
        self._args = dict(request.query)
        self._form = form
        self.payload = BasicOAuth2Payload({**self._args, **form})

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


def _token(client: Client, grant_type: str, user: Grant | None, scope: str | None) -> str:
    return str(generate_token(42))


class _AuthorizationCodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar = list(_CLIENT_AUTH)

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        server: TokenServer = self.server
        server.codes[code] = Code(code, request.user, request.payload.redirect_uri or REDIRECT_URI)

    def query_authorization_code(self, code: str, client: Client) -> Code | None:
        found: Code | None = self.server.codes.get(code)
        if found is None or found.grant.client_id != client.client_id or found.expires_at < time.time():
            return None
        return found

    def delete_authorization_code(self, authorization_code: Code) -> None:
        self.server.codes.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code: Code) -> Grant:
        return authorization_code.grant


class _RefreshTokenGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar = list(_CLIENT_AUTH)
    INCLUDE_NEW_REFRESH_TOKEN = True

    def authenticate_refresh_token(self, refresh_token: str) -> Token | None:
        token: Token | None = self.server.by_refresh.get(refresh_token)
        if token is None or token.grant.revoked or token.refresh_revoked:
            return None
        return token

    def authenticate_user(self, refresh_token: Token) -> Grant:
        return refresh_token.grant

    def revoke_old_credential(self, refresh_token: Token) -> None:
        refresh_token.refresh_revoked = True


class _Revocation(RevocationEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS: ClassVar = list(_CLIENT_AUTH)

    def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
        return self.server.find(token_string, token_type_hint)  # type: ignore[no-any-return]

    def revoke_token(self, token: Token, request: OAuth2Request) -> None:
        if request.form.get("token") == token.refresh_token:
            token.grant.revoked = True  # a refresh token stands for the grant
        else:
            token.expires_in = 0


class _Introspection(IntrospectionEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS: ClassVar = list(_CLIENT_AUTH)

    def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
        return self.server.find(token_string, token_type_hint)  # type: ignore[no-any-return]

    def check_permission(self, token: Token, client: Client, request: OAuth2Request) -> bool:
        return "introspection" in client.grant_types

    def introspect_token(self, token: Token) -> dict[str, Any]:
        return {
            "active": True,
            "client_id": token.grant.client_id,
            "token_type": "Bearer",
            "username": token.grant.username,
            "scope": token.grant.scope,
            "exp": token.issued_at + token.expires_in,
            "iat": token.issued_at,
        }


SERVER: Final = web.AppKey("token_server", TokenServer)


async def _read(request: web.Request) -> _Request:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=request.content_length)
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    return _Request(request, form)


async def _authorize(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    incoming = await _read(request)
    username = request.query.get("login_hint", "")
    client = server.query_client(request.query.get("client_id", ""))
    lifetime = request.query.get("access_token_lifetime_s", "")
    if not username or client is None or not (lifetime.isdigit() or not lifetime):
        raise web.HTTPBadRequest(text="login_hint, a known client_id and a numeric lifetime are required")
    seconds = min(int(lifetime), MAX_ACCESS_TOKEN_LIFETIME_S) if lifetime else server.default_lifetime_s
    grant = Grant(username, client.client_id, request.query.get("scope", "mail"), seconds)
    answer: web.Response = server.create_authorization_response(
        incoming, grant_user=grant, grant=server.get_authorization_grant(incoming)
    )
    return answer


async def _token_endpoint(request: web.Request) -> web.StreamResponse:
    answer: web.Response = request.app[SERVER].create_token_response(await _read(request))
    return answer


async def _revoke(request: web.Request) -> web.StreamResponse:
    answer: web.Response = request.app[SERVER].create_endpoint_response("revocation", await _read(request))
    return answer


async def _introspect(request: web.Request) -> web.StreamResponse:
    answer: web.Response = request.app[SERVER].create_endpoint_response("introspection", await _read(request))
    return answer


async def _healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


def make_app(server: TokenServer) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SERVER] = server
    app.router.add_get("/authorize", _authorize)
    app.router.add_post("/token", _token_endpoint)
    app.router.add_post("/revoke", _revoke)
    app.router.add_post("/introspect", _introspect)
    app.router.add_get("/healthz", _healthz)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True, help="PEM certificate (TLS)")
    parser.add_argument("--key", required=True, help="PEM private key")
    parser.add_argument("--client", action="append", default=[], metavar="ID:SECRET",
                        help="a mail client (authorization code and refresh token grants)")  # fmt: skip
    parser.add_argument("--resource-server", action="append", default=[], metavar="ID:SECRET",
                        help="a client that may introspect tokens (Dovecot)")  # fmt: skip
    parser.add_argument("--access-token-lifetime-s", type=int, default=DEFAULT_ACCESS_TOKEN_LIFETIME_S)
    args = parser.parse_args(argv)
    clients = [
        Client(*spec.split(":", 1), grant_types=("authorization_code", "refresh_token"))
        for spec in args.client
    ] + [Client(*spec.split(":", 1), grant_types=("introspection",)) for spec in args.resource_server]
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(args.cert, args.key)
    server = TokenServer(clients, args.access_token_lifetime_s)
    web.run_app(make_app(server), host=args.host, port=args.port, ssl_context=tls, print=None)


if __name__ == "__main__":
    main()
