"""The gateway's OpenAPI 3.1 document (``/openapi.json``) and its docs page (``/docs``).

The document is built when the app starts, from its routes: every route declares its
:class:`libs.openapi.Operation` next to its handler, and the schemas are generated from the
pydantic models the handlers validate with and answer with (:mod:`services.gateway.schemas`).
Tests fuzz the running gateway against it (schemathesis), and check that it lists exactly the
routes served.
"""

from __future__ import annotations

import html
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from libs.http import MAX_JSON_DEPTH
from libs.openapi import Json, Param, build_document
from services.gateway.constants import (
    MAX_BODY_BYTES,
    MAX_LONG_POLL_S,
    MAX_PAGE_SIZE,
    MAX_QUERY_STRING_LENGTH,
)

__all__ = [
    "ACCOUNT",
    "ADMIN",
    "DOC_PATHS",
    "MESSAGE",
    "TOKEN",
    "add_doc_routes",
    "gateway_document",
    "id_param",
    "query",
]

ADMIN: Final = "adminKey"
TOKEN: Final[Json] = {"type": "string", "minLength": 1, "maxLength": 128}
ID: Final[Json] = {
    "type": "string",
    "pattern": "^[0-9]{1,20}$",
    "description": "a 64-bit id as a decimal string",
}
DOC_PATHS: Final = ("/openapi.json", "/docs")
# The service runner's own routes (libs.service): for operators and probes, not API clients.
RUNNER_PATHS: Final = ("/healthz", "/readyz", "/metrics")


def id_param(name: str, description: str) -> Param:
    return Param(name, ID, description, where="path")


def query(name: str, schema: Json, description: str) -> Param:
    return Param(name, schema, description)


ACCOUNT: Final = id_param("account_id", "an account of the calling application")
MESSAGE: Final = id_param("message_id", "a message of one of the calling application's accounts")

INFO: Final[Json] = {
    "title": "flightlog gateway",
    "version": "1.0.0",
    "description": (
        "Messages, their change feed, webhooks, IMAP accounts and API keys of an application's"
        " accounts.\n\n"
        "Authenticate with `Authorization: Bearer <API key>`. Ids are decimal strings."
        " Errors are application/problem+json. Limits: request body"
        f" {MAX_BODY_BYTES} bytes, query string {MAX_QUERY_STRING_LENGTH} characters, pages"
        f" {MAX_PAGE_SIZE} messages, long-poll {MAX_LONG_POLL_S} s.\n\n"
        "The /v1/admin/ operations, this document and /docs are served on the management port"
        " (FLIGHTLOG_MANAGEMENT_PORT, 9080 by default), not on the public port."
    ),
}
SECURITY_SCHEMES: Final[Json] = {
    "apiKey": {"type": "http", "scheme": "bearer", "description": "an application's API key"},
    ADMIN: {"type": "http", "scheme": "bearer", "description": "the operator's admin key"},
}
PROBLEMS: Final = {
    400: "Invalid parameter, page token or cursor, or a request body that is not JSON or nests"
    f" deeper than {MAX_JSON_DEPTH} levels",
    401: "Missing, unknown or revoked API key",
    404: "No such object, or it belongs to another application (the same answer)",
    408: "The request body did not arrive in time; the connection is closed",
    409: "Conflict",
    410: "The cursor is older than the retained change log",
    413: "The request body is larger than the limit",
    415: "The body is not application/json",
    422: "The body does not match the schema, or what was asked for is over a limit (the detail names it)",
    429: "Too many failed authentications from this address, or the application's streams or"
    " long-polls are at their limit; retry after Retry-After",
    502: "The account's mail server failed or refused the account's credentials",
    503: "Starting, the shard is moving, or too many requests of this kind are running; retry"
    " after Retry-After",
}


def gateway_document(app: web.Application) -> Json:
    """The document of ``app``'s routes (all but the docs' and the runner's own)."""
    return build_document(
        app,
        info=INFO,
        security_schemes=SECURITY_SCHEMES,
        default_security="apiKey",
        problem_descriptions=PROBLEMS,
        undocumented=(*DOC_PATHS, *RUNNER_PATHS),
    )


_CSS: Final = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 960px; margin: 2em auto; padding: 0 1em; color: #222 }
h2 { border-bottom: 1px solid #ddd; margin-top: 2em }
.op { margin: 1em 0; padding: .5em 1em; background: #f7f7f9; border-radius: 6px }
.m { display: inline-block; min-width: 4.5em; font-weight: bold; font-family: monospace }
code { background: #eee; padding: 0 .2em }
table { border-collapse: collapse; margin: .4em 0 }
td, th { border: 1px solid #ddd; padding: .2em .5em; text-align: left; vertical-align: top }
"""


def docs_html(spec: Json) -> str:
    """A self-contained page (no scripts from elsewhere: the network may be closed)."""
    info = spec["info"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>flightlog API</title><style>",
        _CSS,
        "</style></head><body>",
        f"<h1>{html.escape(info['title'])}</h1>",
        f"<p>{html.escape(info['description'])}</p>",
        "<p>The machine-readable document: <a href='/openapi.json'>/openapi.json</a> (OpenAPI 3.1).</p>",
    ]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            parts.append(_operation_html(path, method, op))
    parts.append("<h2>Schemas</h2>")
    for name, schema in spec["components"]["schemas"].items():
        body = html.escape(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode())
        parts.append(f"<h3 id='{html.escape(name)}'>{html.escape(name)}</h3><pre>{body}</pre>")
    parts.append("</body></html>")
    return "".join(parts)


def _operation_html(path: str, method: str, op: dict[str, Any]) -> str:
    parts = [
        f"<div class='op'><span class='m'>{method.upper()}</span> <code>{html.escape(path)}</code>"
        f" &mdash; {html.escape(op['summary'])}"
    ]
    if "description" in op:
        parts.append(f"<p>{html.escape(op['description'])}</p>")
    params = op.get("parameters", [])
    if params:
        parts.append("<table><tr><th>parameter</th><th>in</th><th>schema</th><th>meaning</th></tr>")
        for p in params:
            parts.append(
                f"<tr><td><code>{html.escape(p['name'])}</code></td><td>{p['in']}</td>"
                f"<td><code>{html.escape(orjson.dumps(p['schema']).decode())}</code></td>"
                f"<td>{html.escape(p.get('description', ''))}</td></tr>"
            )
        parts.append("</table>")
    if "requestBody" in op:
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        parts.append(f"<p>Body: <a href='#{html.escape(ref)}'>{html.escape(ref)}</a></p>")
    answers = ", ".join(f"{code} {html.escape(str(r['description']))}" for code, r in op["responses"].items())
    parts.append(f"<p><small>Answers: {answers}</small></p></div>")
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class ServedDocs:
    json: bytes
    html: str


DOCS: Final = web.AppKey("openapi_docs", ServedDocs)


async def _build(app: web.Application) -> AsyncIterator[None]:
    # At startup, when every route is in: a route added without an Operation stops the gateway.
    spec = gateway_document(app)
    app[DOCS] = ServedDocs(orjson.dumps(spec), docs_html(spec))
    yield


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DOCS].json, content_type="application/json")


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=request.app[DOCS].html, content_type="text/html")


def add_doc_routes(app: web.Application) -> None:
    app.cleanup_ctx.append(_build)
    app.add_routes(
        [web.get("/openapi.json", openapi_json, allow_head=False), web.get("/docs", docs, allow_head=False)]
    )
