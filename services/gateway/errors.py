"""Errors as RFC 9457 problem documents, for every path of the gateway.

Handlers raise :class:`ApiError`; :func:`problem_middleware` turns it, aiohttp's own HTTP errors
(unknown path, wrong method, body too large) and anything unexpected into
``application/problem+json``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from libs.http import problem_response
from libs.shards import ShardReadOnly

__all__ = ["ApiError", "NotFound", "problem_middleware"]

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An answer other than success: status, a short title and a detail for the developer."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.extra = extra

    def response(self) -> web.Response:
        return problem_response(self.status, self.title, self.detail, **self.extra)


class NotFound(ApiError):
    """The same answer for what does not exist and what belongs to another application."""

    def __init__(self, what: str, id_text: str) -> None:
        super().__init__(404, "Not found", f"{what} {id_text} not found")


_TITLES = {404: "Not found", 405: "Method not allowed", 413: "Request body too large"}


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except ShardReadOnly as exc:
        return problem_response(503, "Shard moving", str(exc), retry_after_s=1)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        title = _TITLES.get(exc.status, exc.reason)
        detail = {
            404: f"no such path: {request.path[:200]}",
            405: f"{request.method} is not allowed on {request.path[:200]}",
        }.get(exc.status, exc.text or exc.reason)
        response = problem_response(exc.status, title, detail)
        for name in ("Allow", "WWW-Authenticate"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except Exception:
        logger.exception("%s %s failed", request.method, request.path[:200])
        return problem_response(500, "Internal error", "the gateway failed to answer; it has been logged")
