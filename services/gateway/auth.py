"""Who is calling, and may they see this? Every application path goes through here.

Ids are guessable (a shard number and a counter), so ownership is checked on every request, and
an id that belongs to another application gets exactly the answer a missing one gets.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from libs.accounts import Account, AccountDirectory, Application
from libs.ids import InvalidId, parse_public_id, shard_of
from services.gateway.errors import NotFound
from services.gateway.state import STATE

__all__ = ["application_of", "authenticated", "owned_account", "path_id"]

MAX_KEY_LENGTH: Final = 200

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AppHandler = Callable[[web.Request, Application], Awaitable[web.StreamResponse]]

_CHALLENGE: Final = {"WWW-Authenticate": 'Bearer realm="flightlog"'}


async def application_of(request: web.Request, directory: AccountDirectory) -> Application:
    """The application whose key is in ``Authorization: Bearer <api key>``; raises a 401 with the
    Bearer challenge (every API of the gateway, webhooks and IMAP accounts too, goes through here)."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise web.HTTPUnauthorized(
            headers=_CHALLENGE, text="send the application's API key as Authorization: Bearer <key>"
        )
    app = None
    if len(key) <= MAX_KEY_LENGTH and key.isascii():
        app = await directory.application_for_key(key)
    if app is None:
        raise web.HTTPUnauthorized(headers=_CHALLENGE, text="the API key is unknown or revoked")
    return app


def authenticated(handler: AppHandler) -> Handler:
    """Resolve ``Authorization: Bearer <api key>`` to the caller's application, or answer 401."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        return await handler(request, await application_of(request, request.app[STATE].accounts))

    return wrapped


def path_id(request: web.Request, name: str, what: str) -> int:
    """An id from the path; one that cannot exist answers 404 like any other unknown id."""
    text = request.match_info[name]
    try:
        return parse_public_id(text)
    except InvalidId:
        raise NotFound(what, text[:40]) from None


async def owned_account(request: web.Request, app: Application, name: str = "account_id") -> Account:
    account_id = path_id(request, name, "account")
    state = request.app[STATE]
    if shard_of(account_id) not in state.shards.shard_map.shard_cluster:
        raise NotFound("account", str(account_id))
    account = await state.accounts.owned_account(app.id, account_id)
    if account is None:
        raise NotFound("account", str(account_id))
    return account
