"""API keys at the door of the services that take them (ingest, the gateway), with failed
authentications limited per client address.

A key this process knows already (the account directory's cache of known keys) is answered at
once. Any other key costs a look-up in the global schema, and an unknown one fills a bounded miss
cache: a client trying key after key would make both the database and the misses churn. So each
failure (an unknown, revoked or malformed key; a wrong admin key) takes a token from its client
address's bucket (:class:`~libs.ratelimit.KeyedTokenBuckets`, bounded by the number of addresses
tracked), and an address with none left is answered 429 with ``Retry-After`` before any look-up.
Known keys are never refused, so a client with a working key keeps working from an address whose
failures ran out.

Counting per key prefix would add nothing: a random guess has a random prefix, and a key's 256
random bits leave guessing hopeless anyway; the limit is there for the look-ups.
"""

from __future__ import annotations

import hmac
import math
from typing import Final

from aiohttp import web

from libs.accounts import Application
from libs.config import ServiceSettings
from libs.http import Problem, Unauthorized, bearer_token
from libs.ratelimit import KeyedTokenBuckets
from libs.resources import DIRECTORY

__all__ = [
    "AUTH_FAILURES",
    "MAX_KEY_LENGTH",
    "application_for_request",
    "auth_failure_limiter",
    "check_admin_key",
]

MAX_KEY_LENGTH: Final = 200  # ours are 47 characters; longer is never one of them
# Failed authentications per client address (one bucket each); one per process.
AUTH_FAILURES: Final = web.AppKey("auth_failures", KeyedTokenBuckets[str])


def auth_failure_limiter(settings: ServiceSettings) -> KeyedTokenBuckets[str]:
    return KeyedTokenBuckets(
        settings.auth_failure_rate_per_s,
        settings.auth_failure_burst,
        max_keys=settings.auth_failure_tracked_addresses_max,
    )


def _address(request: web.Request) -> str:
    return request.remote or "unknown"


def _refuse_if_spent(request: web.Request) -> None:
    wait_s = request.app[AUTH_FAILURES].retry_after_s(_address(request))
    if wait_s > 0:
        raise Problem(
            429,
            "Too Many Requests",
            "too many failed authentications from this address; retry later",
            retry_after_s=max(1, math.ceil(wait_s)),
        )


def _failed(request: web.Request) -> None:
    request.app[AUTH_FAILURES].acquire({_address(request): 1})


async def application_for_request(request: web.Request) -> Application:
    """The application whose key is in ``Authorization: Bearer <api key>``; raises 401 (with the
    Bearer challenge) for a missing, unknown or revoked key, 429 for an address out of failures."""
    key = bearer_token(request)
    directory = request.app[DIRECTORY]
    app = directory.cached_application(key)
    if app is not None:
        return app
    _refuse_if_spent(request)
    if len(key) <= MAX_KEY_LENGTH and key.isascii():
        app = await directory.application_for_key(key)
    if app is None:
        _failed(request)
        raise Unauthorized("the API key is unknown or revoked")
    return app


def check_admin_key(request: web.Request, admin_key: str) -> None:
    """Raises 401 unless the request carries the operator's admin key; 429 for an address out of
    failures (a wrong admin key is a failure like a wrong API key)."""
    supplied = bearer_token(request)
    _refuse_if_spent(request)
    if not hmac.compare_digest(supplied.encode(), admin_key.encode()):
        _failed(request)
        raise Unauthorized("admin paths need the operator's admin API key")
