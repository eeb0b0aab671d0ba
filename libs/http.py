"""HTTP helpers shared by the services: RFC 9457 problem documents."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

__all__ = ["PROBLEM_CONTENT_TYPE", "problem_response"]

PROBLEM_CONTENT_TYPE = "application/problem+json"


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    type_: str = "about:blank",
    retry_after_s: int | None = None,
    **extra: Any,
) -> web.Response:
    body = {"type": type_, "title": title, "status": status, "detail": detail, **extra}
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return web.Response(
        status=status, body=orjson.dumps(body), content_type=PROBLEM_CONTENT_TYPE, headers=headers
    )
