"""Who is calling, and may they see this? Every application path goes through here.

Ids are guessable (a shard number and a counter), so ownership is checked on every request, and
an id that belongs to another application gets exactly the answer a missing one gets.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from libs.accounts import Account, Application
from libs.authn import application_for_request
from libs.ids import InvalidId, parse_public_id, shard_of
from libs.resources import DIRECTORY, ROUTER
from services.gateway.errors import NotFound

__all__ = ["application_of", "authenticated", "owned_account", "path_id"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AppHandler = Callable[[web.Request, Application], Awaitable[web.StreamResponse]]


async def application_of(request: web.Request) -> Application:
    """The application whose key is in ``Authorization: Bearer <api key>``; raises a 401 with the
    Bearer challenge, or a 429 for an address out of failed authentications (every API of the
    gateway, webhooks and IMAP accounts too, goes through here: :mod:`libs.authn`)."""
    return await application_for_request(request)


def authenticated(handler: AppHandler) -> Handler:
    """Resolve ``Authorization: Bearer <api key>`` to the caller's application, or answer 401."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        return await handler(request, await application_of(request))

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
    if shard_of(account_id) not in request.app[ROUTER].shard_map.shard_cluster:
        raise NotFound("account", str(account_id))
    account = await request.app[DIRECTORY].owned_account(app.id, account_id)
    if account is None:
        raise NotFound("account", str(account_id))
    return account
