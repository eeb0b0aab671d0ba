"""Request metrics: per route, a counter by status and a latency histogram (``/metrics``).

The route label is the route's pattern (``/v1/accounts/{account_id}/delta``), never the raw path,
and a request that matched no route counts under ``unmatched``, so the label set stays as small as
the route table whatever paths clients send. The middleware is the outermost one: the status is
the one the client got, problem documents included. A stream's latency is its whole duration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from prometheus_client import Counter, Histogram

__all__ = ["REQUESTS", "REQUEST_SECONDS", "UNMATCHED", "request_metrics_middleware", "route_label"]

UNMATCHED: Final = "unmatched"
CLIENT_CLOSED: Final = 499  # the request was cancelled before it answered (nginx's convention)
# from a get by id (a few ms) to the longest long-poll (30 s)
_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS: Final = Counter(
    "flightlog_gateway_requests_total",
    "Requests answered, by route and status",
    ["method", "route", "status"],
)
REQUEST_SECONDS: Final = Histogram(
    "flightlog_gateway_request_seconds", "Request latency by route", ["method", "route"], buckets=_BUCKETS_S
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def route_label(request: web.Request) -> tuple[str, str]:
    """(method, route pattern) with a bounded set of values; ``unmatched`` for no route."""
    route = request.match_info.route
    resource = route.resource
    if resource is None or request.match_info.http_exception is not None:
        return "-", UNMATCHED
    return route.method, resource.canonical


@web.middleware
async def request_metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        method, route = route_label(request)
        REQUESTS.labels(method, route, str(status)).inc()
        REQUEST_SECONDS.labels(method, route).observe(time.perf_counter() - started)
