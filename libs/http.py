"""HTTP helpers shared by the services: RFC 9457 problem documents, JSON bodies, and one middleware.

Every service answers errors the same way: a handler (or a helper it calls) raises
:class:`Problem`, and :func:`problem_middleware` turns it, aiohttp's own HTTP errors, a database
or dependency that cannot be reached, and anything unexpected into ``application/problem+json``.
A request that aiohttp's parser refuses before any middleware runs (a request line over 8 KiB,
malformed headers) gets one too, through :class:`ProblemAppRunner`.

Slow clients: aiohttp waits for a request's headers as long as its keep-alive timeout (counted
from the connection's start or its previous response, not from the first byte) and for a body
as long as the client trickles it. So :class:`ProblemAppRunner`'s connections give a request's
line and headers ``head_timeout_s`` from their first byte (or from the connection's opening),
and :func:`body_deadline` gives the body a deadline from the handler's start (408, connection
closed): a client sending either byte by byte holds a connection for a bounded time. aiohttp
does not cancel a handler whose client went away; :func:`on_disconnect` lets a long-lived
response (a stream, a long-poll) hear of it and end.

Exceptions::

    Problem               an answer other than success: status, title, detail (and extra members)
    ├── Unauthorized      401 with the ``WWW-Authenticate: Bearer`` challenge
    ├── RequestTimeout    408: the body did not arrive in time; the connection is closed
    └── (services subclass it, e.g. the gateway's ApiError)

Every API key arrives the same way (:func:`bearer_token`), and every body that fails its pydantic
model is answered the same way (:func:`invalid_body`: 422 with one ``errors`` entry per field).

What counts as "unavailable" (503 with ``Retry-After``, see :func:`is_unavailable`): a MariaDB
server that refuses, drops or kills the connection, is shutting down, has too many connections, or
times out a lock; a closed connection; a shard schema that is gone (read through a map older than
a finished move: :func:`libs.shards.schema_gone`); an exception whose class says ``retriable = True`` (our
libs' and aiokafka's convention, e.g. :class:`libs.shards.ShardReadOnly`). A syntax error, an
unknown column or any other bug stays a 500, so it is seen and fixed rather than retried.

JSON bodies are read with :func:`read_json`: malformed JSON and nesting deeper than
:data:`MAX_JSON_DEPTH` answer 400, a body over the endpoint's limit 413. orjson refuses nesting
past 1,024 levels by itself, but aiohttp's ``request.json()`` (stdlib json) raises RecursionError
well before that, and orjson cannot dump (dead-letter, echo) more than 254 levels, so the limit
here is much lower than either and checked once, at the door.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from http import HTTPStatus
from typing import Any, Final

import asyncmy.errors
import orjson
from aiohttp import web, web_protocol, web_request, web_server
from asyncmy.constants import CR, ER
from pydantic import ValidationError

from libs.shards import schema_gone

__all__ = [
    "DEFAULT_RETRY_AFTER_S",
    "MAX_JSON_DEPTH",
    "MAX_VALIDATION_ERRORS",
    "PROBLEM_CONTENT_TYPE",
    "Problem",
    "ProblemAppRunner",
    "RequestTimeout",
    "Unauthorized",
    "bearer_token",
    "body_deadline",
    "client_gone",
    "invalid_body",
    "is_unavailable",
    "json_too_deep",
    "on_disconnect",
    "parse_json",
    "problem_middleware",
    "problem_response",
    "read_json",
    "unavailable_response",
    "validation_errors",
]

logger = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
# Far above any document our APIs take (the deepest, an event, is 3 levels), far below what
# breaks a recursive consumer (stdlib json ~1,000, orjson.dumps 255, pydantic-core 200).
MAX_JSON_DEPTH: Final = 32
DEFAULT_RETRY_AFTER_S: Final = 1

# MariaDB/MySQL errors that say "the server is not there (right now)", not "your query is wrong".
_UNAVAILABLE_CODES: Final = frozenset(
    {
        CR.CR_CONNECTION_ERROR,  # 2002 socket refused
        CR.CR_CONN_HOST_ERROR,  # 2003 TCP refused or connect timeout
        CR.CR_SERVER_GONE_ERROR,  # 2006
        CR.CR_SERVER_LOST,  # 2013 (also a read on a socket the server closed)
        CR.CR_SERVER_LOST_EXTENDED,  # 2055
        ER.CON_COUNT_ERROR,  # 1040 too many connections
        ER.SERVER_SHUTDOWN,  # 1053
        ER.LOCK_WAIT_TIMEOUT,  # 1205
        ER.LOCK_DEADLOCK,  # 1213
        ER.OPTION_PREVENTS_STATEMENT,  # 1290 --read-only during a failover
        1836,  # ER_READ_ONLY_MODE
        1927,  # ER_CONNECTION_KILLED (KILL CONNECTION, server shutdown)
        4031,  # ER_CLIENT_INTERACTION_TIMEOUT
    }
)
_MAX_CAUSE_CHAIN: Final = 8  # how far `raise ... from exc` is followed before giving up
# Enough to fix a body in one round, few enough that a hostile body cannot make the answer huge.
MAX_VALIDATION_ERRORS: Final = 20
_CHALLENGE: Final = 'Bearer realm="flightlog"'


class Problem(Exception):
    """An answer other than success: status, a short title and a detail for the developer.

    ``extra`` becomes further members of the problem document (e.g. ``errors``); ``retry_after_s``
    sets the ``Retry-After`` header.
    """

    def __init__(
        self, status: int, title: str, detail: str, *, retry_after_s: int | None = None, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.extra = extra

    def response(self) -> web.Response:
        return problem_response(
            self.status, self.title, self.detail, retry_after_s=self.retry_after_s, **self.extra
        )


class Unauthorized(Problem):
    """401 with the Bearer challenge (RFC 6750), so a client knows how to authenticate."""

    def __init__(self, detail: str) -> None:
        super().__init__(401, "Unauthorized", detail)

    def response(self) -> web.Response:
        response = super().response()
        response.headers["WWW-Authenticate"] = _CHALLENGE
        return response


class RequestTimeout(Problem):
    """408: the request's body did not arrive within its deadline. The rest of it may still be on
    its way, so the connection is closed after the answer."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, "Request Timeout", f"the request body did not arrive within {timeout_s:g} s")

    def response(self) -> web.Response:
        response = super().response()
        response.force_close()
        return response


def bearer_token(request: web.Request) -> str:
    """The token of ``Authorization: Bearer <token>`` (the scheme in any case); raises
    :class:`Unauthorized` when the header is missing, of another scheme or empty."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("send the API key as Authorization: Bearer <key>")
    return token


def validation_errors(exc: ValidationError, *, whole: str = "(body)") -> list[dict[str, str]]:
    """One ``{"field", "message"}`` per error (at most :data:`MAX_VALIDATION_ERRORS`), the field a
    dotted path into the document, ``whole`` for the document itself. The input is left out: it
    may be a password."""
    return [
        {"field": ".".join(map(str, e["loc"])) or whole, "message": e["msg"]}
        for e in exc.errors(include_url=False, include_input=False)[:MAX_VALIDATION_ERRORS]
    ]


def invalid_body(exc: ValidationError, title: str = "Invalid request body") -> Problem:
    """422 for a body its model refused: the errors in ``errors`` and, joined, in ``detail``."""
    errors = validation_errors(exc)
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return Problem(422, title, detail, errors=errors)


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


def _unavailable_one(exc: BaseException) -> bool:
    if schema_gone(exc):
        return True  # read through a map older than a finished move; the next reload follows it
    if isinstance(exc, asyncmy.errors.OperationalError | asyncmy.errors.InternalError):
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        return code in _UNAVAILABLE_CODES
    if isinstance(exc, asyncmy.errors.InterfaceError):
        return True  # the driver: the connection is closed or was never opened
    if isinstance(exc, ConnectionError):
        return True
    return getattr(type(exc), "retriable", False) is True


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) means a dependency cannot answer right now."""
    seen: BaseException | None = exc
    for _ in range(_MAX_CAUSE_CHAIN):
        if seen is None:
            return False
        if _unavailable_one(seen):
            return True
        seen = seen.__cause__
    return False


# Every byte but the ones that shape a document: brackets, and quotes to tell strings apart.
_NOT_SKELETON: Final = bytes(b for b in range(256) if b not in b'[]{}"')
# Only the nesting counts, not the kind of container: objects become arrays.
_OBJECTS_AS_ARRAYS: Final = bytes.maketrans(b"{}", b"[]")


def json_too_deep(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON document ``raw`` (already known to be valid) nests arrays and objects more
    than ``max_depth`` levels deep.

    Linear in ``len(raw)`` (at most ``max_depth`` passes over the brackets) and done by bytes
    methods in C. Measured: 0.14 ms for a 130 kB ingest batch that orjson parses in 0.33 ms (a
    walk of the parsed document in Python took 1.6 ms); 91 ms for the worst 1 MiB document
    (containers 31 deep side by side), which orjson parses in 58 ms.
    """
    if b"\\" in raw:
        # Valid JSON has backslashes only inside strings, each starting an escape; with escaped
        # backslashes and quotes gone, every quote left opens or closes a string.
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    # `""` is an empty string or the seam between two strings: either way nothing outside a
    # string lies between the two quotes, so dropping them keeps the structure.
    skeleton = raw.translate(_OBJECTS_AS_ARRAYS, _NOT_SKELETON).replace(b'""', b"")
    if b'"' in skeleton:  # strings that contain brackets: keep what is outside them
        skeleton = b"".join(skeleton.split(b'"')[::2])
    # Each pass removes the innermost (empty) containers and only them (replace does not look
    # again at the pairs its removals bring together), so a document is gone after exactly as
    # many passes as it is deep.
    for _ in range(max_depth):
        if not skeleton:
            return False
        skeleton = skeleton.replace(b"[]", b"")
    return bool(skeleton)


def parse_json(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The document in ``raw``, or a 400 :class:`Problem` that says what is wrong with it."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):
            raise _too_deep(max_depth) from None
        raise Problem(400, "Malformed JSON", f"the request body is not valid JSON: {exc}") from None
    if json_too_deep(raw, max_depth):
        raise _too_deep(max_depth)
    return doc


def _too_deep(max_depth: int) -> Problem:
    return Problem(
        400,
        "JSON nested too deeply",
        f"the request body nests arrays and objects more than {max_depth} levels deep",
        max_json_depth=max_depth,
    )


def _too_large(max_bytes: int) -> Problem:
    return Problem(
        413,
        "Content Too Large",
        f"the request body is limited to {max_bytes} bytes",
        max_body_bytes=max_bytes,
    )


# Where read_json keeps the document for a second caller (a typed key: aiohttp warns on a str key).
_PARSED: Final = web.RequestKey("flightlog_json_body", object)


async def read_json(request: web.Request, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The request's JSON body, parsed once per request; raises :class:`Problem` (400 malformed or
    too deep, 413 over ``max_bytes``). The content type is the caller's to check."""
    if _PARSED in request:
        return request[_PARSED]
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:  # aiohttp's client_max_size, for a chunked body
        raise _too_large(max_bytes) from None
    if len(raw) > max_bytes:
        raise _too_large(max_bytes)
    doc = parse_json(raw, max_depth=max_depth)
    request[_PARSED] = doc
    return doc


def unavailable_response(exc: BaseException) -> web.Response:
    """503 with ``Retry-After`` for an exception :func:`is_unavailable` accepts.

    A driver's message names hosts and ports, so only our own retriable errors show theirs.
    """
    if getattr(type(exc), "retriable", False) is True and type(exc).__module__.startswith("libs."):
        detail = f"{exc}; retry later"
    else:
        detail = (
            "a database or dependency this request needs cannot be reached"
            f" ({type(exc).__name__}); retry later"
        )
    return problem_response(503, "Service unavailable", detail, retry_after_s=DEFAULT_RETRY_AFTER_S)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_TITLES: Final = {404: "Not found", 405: "Method not allowed", 413: "Content Too Large"}


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error of every route as a problem document; see the module docstring."""
    try:
        return await handler(request)
    except Problem as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        title = _TITLES.get(exc.status, exc.reason)
        detail = {
            404: f"no such path: {request.path[:200]}",
            405: f"{request.method} is not allowed on {request.path[:200]}",
        }.get(exc.status, exc.text or exc.reason)
        response = problem_response(exc.status, title, detail)
        for name in ("Allow", "WWW-Authenticate", "Retry-After"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except Exception as exc:
        if is_unavailable(exc):
            # Expected while a server restarts or fails over: one line, no traceback.
            logger.warning("%s %s: unavailable: %r", request.method, request.path[:200], exc)
            return unavailable_response(exc)
        logger.exception("%s %s failed", request.method, request.path[:200])
        return problem_response(500, "Internal error", "the request failed unexpectedly; it has been logged")


# Written as is when a request's head is late: there is no request to answer through aiohttp.
_HEAD_TIMEOUT_RESPONSE: Final = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/problem+json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)


class _ProblemRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, answering what its parser refuses with a problem document
    instead of ``text/plain`` (it still logs and closes the connection as aiohttp does), cutting
    off a request whose line and headers take longer than ``head_timeout_s``, and telling
    :func:`on_disconnect`'s callbacks when the client goes away."""

    def __init__(self, manager: web_server.Server, *, head_timeout_s: float | None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout_s = head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self.disconnect_callbacks: set[Callable[[], None]] = set()

    def handle_error(
        self,
        request: web_request.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if a response began
        title = HTTPStatus(status).phrase
        detail = (message or title) if status < 500 else "the request failed unexpectedly; it has been logged"
        response = problem_response(status, title, detail[:500])
        response.force_close()
        return response

    def _awaiting_head(self) -> bool:
        """Between requests: aiohttp's loop waits for the next request's head to be complete."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _arm_head_timer(self) -> None:
        if self._head_timeout_s is not None and self._head_timer is None:
            self._head_timer = self._loop.call_later(self._head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._awaiting_head() or self.transport is None:
            return
        body = orjson.dumps(
            {
                "type": "about:blank",
                "title": "Request Timeout",
                "status": 408,
                "detail": f"the request line and headers did not arrive within {self._head_timeout_s:g} s",
            }
        )
        self.transport.write(_HEAD_TIMEOUT_RESPONSE % (len(body), body))
        self.force_close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()  # the first request's head: from the connection's opening

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # A head begun and not complete has its deadline; a complete one (or body bytes of the
        # request in progress, when aiohttp waits for no head) has none. An idle keep-alive
        # connection is aiohttp's keep-alive timeout's business.
        if self._awaiting_head():
            self._arm_head_timer()
        else:
            self._disarm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)
        callbacks, self.disconnect_callbacks = self.disconnect_callbacks, set()
        for callback in callbacks:
            callback()


class _ProblemServer(web_server.Server):
    def __init__(self, *args: Any, head_timeout_s: float | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timeout_s = head_timeout_s

    def __call__(self) -> web_protocol.RequestHandler:
        return _ProblemRequestHandler(
            self, loop=self._loop, head_timeout_s=self._head_timeout_s, **self._kwargs
        )


class ProblemAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer parser errors as problem documents and give a
    request's line and headers ``head_timeout_s`` (None: aiohttp's keep-alive timeout alone)."""

    def __init__(self, app: web.Application, *, head_timeout_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._head_timeout_s = head_timeout_s

    async def _make_server(self) -> web_server.Server:
        made = await super()._make_server()
        return _ProblemServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            head_timeout_s=self._head_timeout_s,
            **made._kwargs,
        )


def body_deadline(timeout_s: float) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware giving each request's body ``timeout_s`` from the handler's start: a read
    after it raises :class:`RequestTimeout` (408, connection closed)."""

    @web.middleware
    async def deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.body_exists:
            return await handler(request)
        content = request.content

        def expire() -> None:
            if not content.is_eof():
                content.set_exception(RequestTimeout(timeout_s))

        timer = asyncio.get_running_loop().call_later(timeout_s, expire)
        try:
            return await handler(request)
        finally:
            timer.cancel()

    return deadline


def client_gone(request: web.BaseRequest) -> bool:
    """The request's connection is closed or closing: nobody reads the answer any more."""
    transport = request.transport
    return transport is None or transport.is_closing()


@contextlib.contextmanager
def on_disconnect(request: web.BaseRequest, callback: Callable[[], None]) -> Iterator[None]:
    """Call ``callback`` if the request's client disconnects inside the block (served by
    :class:`ProblemAppRunner`; aiohttp's test server cancels the handler instead)."""
    protocol = request.protocol
    if not isinstance(protocol, _ProblemRequestHandler):
        yield
        return
    if client_gone(request):
        callback()
    protocol.disconnect_callbacks.add(callback)
    try:
        yield
    finally:
        protocol.disconnect_callbacks.discard(callback)
