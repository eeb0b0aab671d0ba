"""The OpenAPI 3.1 document of the gateway (``/openapi.json``) and its docs page (``/docs``).

Written by hand next to the code it describes; tests fuzz the running gateway against it
(schemathesis), so a route, parameter or answer that drifts from it fails the build.
"""

from __future__ import annotations

import html
from typing import Any, Final

import orjson
from aiohttp import web

from libs.events import Direction, Status
from libs.http import MAX_JSON_DEPTH
from services.gateway.constants import (
    DEFAULT_DELTA_PAGE_SIZE,
    DEFAULT_PAGE_SIZE,
    MAX_ACCOUNTS_PAGE_SIZE,
    MAX_ADDRESS_LENGTH,
    MAX_BODY_BYTES,
    MAX_CHANNEL_LENGTH,
    MAX_DELTA_PAGE_SIZE,
    MAX_FOLDER_LENGTH,
    MAX_LONG_POLL_S,
    MAX_PAGE_SIZE,
    MAX_QUERY_STRING_LENGTH,
    MAX_SSE_HEARTBEAT_S,
    MIN_SSE_HEARTBEAT_S,
)
from services.gateway.webhooks.routes import DELIVERY_STATES, MAX_ACCOUNT_FILTER
from services.gateway.webhooks.routes import MAX_PAGE as MAX_DELIVERY_PAGE
from services.gateway.webhooks.settings import WebhookSettings
from services.gateway.webhooks.store import EVENT_TYPES as WEBHOOK_EVENT_TYPES
from services.gateway.webhooks.store import ORDERINGS as WEBHOOK_ORDERINGS
from services.gateway.webhooks.targets import MAX_URL_LENGTH

__all__ = ["SPEC", "add_doc_routes"]

Json = dict[str, Any]

ID: Final[Json] = {
    "type": "string",
    "pattern": "^[0-9]{1,20}$",
    "description": "a 64-bit id as a decimal string",
}
TIME: Final[Json] = {"type": "string", "format": "date-time"}
TOKEN: Final[Json] = {"type": "string", "minLength": 1, "maxLength": 128}


def _nullable(schema: Json) -> Json:
    return {"anyOf": [schema, {"type": "null"}]}


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Json], *, required: list[str] | None = None, extra: bool = False) -> Json:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": extra,
    }


SCHEMAS: Final[dict[str, Json]] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "items": _obj({"field": {"type": "string"}, "message": {"type": "string"}}),
            },
        },
        "required": ["type", "title", "status", "detail"],
    },
    "Message": _obj(
        {
            "id": ID,
            "account_id": ID,
            "message_key": {"type": "string"},
            "version": {"type": "integer", "minimum": 1},
            "status": _nullable({"type": "string", "enum": [s.value for s in Status]}),
            "direction": _nullable({"type": "string", "enum": [d.value for d in Direction]}),
            "channel": _nullable({"type": "string"}),
            "from": _nullable({"type": "string"}),
            "to": {"type": "array", "items": {"type": "string"}},
            "cc": {"type": "array", "items": {"type": "string"}},
            "subject": _nullable({"type": "string"}),
            "snippet": _nullable({"type": "string"}),
            "error_code": _nullable({"type": "string"}),
            "unread": {"type": "boolean"},
            "starred": {"type": "boolean"},
            "folder": _nullable({"type": "string"}),
            "labels": {"type": "array", "items": {"type": "string"}},
            "source": _nullable({"type": "string"}),
            "occurred_at": TIME,
            "final_at": _nullable(TIME),
            "redacted": {"type": "boolean"},
            "created_at": TIME,
            "updated_at": TIME,
            "thread_key": _nullable(
                {"type": "string", "description": "equal for the messages of one conversation (email)"}
            ),
            "size_bytes": _nullable({"type": "integer", "minimum": 0, "description": "raw message size"}),
            "attachments": {"type": "array", "items": _ref("Attachment")},
            "parse_warnings": {
                "type": "array",
                "items": {"type": "string"},
                "description": "what could not be read cleanly from the raw message, e.g. truncated",
            },
        }
    ),
    "Attachment": _obj(
        {
            "filename": _nullable({"type": "string"}),
            "content_type": {"type": "string"},
            "size_bytes": {"type": "integer", "minimum": 0, "description": "decoded size"},
            "content_id": _nullable({"type": "string"}),
            "inline": {"type": "boolean"},
        }
    ),
    "MessagePage": _obj(
        {"data": {"type": "array", "items": _ref("Message")}, "next_page_token": _nullable(TOKEN)}
    ),
    "MessagePatch": {
        "type": "object",
        "description": "the fields to change; at least one, none null",
        "properties": {
            "unread": {"type": "boolean"},
            "starred": {"type": "boolean"},
            "folder": {"type": "string", "minLength": 1, "maxLength": MAX_FOLDER_LENGTH},
            "labels": {
                "type": "array",
                "maxItems": 50,
                "items": {"type": "string", "minLength": 1, "maxLength": 100},
            },
        },
        "minProperties": 1,
        "additionalProperties": False,
    },
    "Delta": _obj(
        {
            "cursor": {**TOKEN, "description": "resume after this change"},
            "object_type": {"type": "string", "enum": ["message"]},
            "object_id": ID,
            "change_type": {"type": "string", "enum": ["created", "updated", "deleted"]},
            "version": {"type": "integer"},
            "changed_at": TIME,
            "object": {
                "description": "the object as it is now; null once it is deleted",
                "anyOf": [_ref("Message"), {"type": "null"}],
            },
        }
    ),
    "DeltaPage": _obj(
        {
            "deltas": {"type": "array", "items": _ref("Delta")},
            "next_cursor": TOKEN,
            "has_more": {"type": "boolean", "description": "more changes are ready: ask again at once"},
        }
    ),
    "Cursor": _obj({"cursor": TOKEN}),
    "Account": _obj(
        {
            "id": ID,
            "application_id": ID,
            "email": {"type": "string"},
            "provider": {"type": "string"},
            "shard": {"type": "integer", "minimum": 0, "maximum": 65535},
        }
    ),
    "AccountPage": _obj(
        {"data": {"type": "array", "items": _ref("Account")}, "next_page_token": _nullable(TOKEN)}
    ),
    "ApiKey": _obj(
        {
            "id": ID,
            "prefix": {"type": "string", "description": "the key's first characters, to recognise it"},
            "created_at": TIME,
            "revoked_at": _nullable(TIME),
        }
    ),
    "ApiKeyList": _obj({"data": {"type": "array", "items": _ref("ApiKey")}}),
    "NewApplication": _obj({"name": {"type": "string", "minLength": 1, "maxLength": 200}}),
    "Application": _obj(
        {"id": ID, "name": {"type": "string"}, "api_key": {"type": "string", "description": "shown once"}}
    ),
    "NewAccount": _obj(
        {
            "application_id": {"type": "integer", "minimum": 1},
            "email": {"type": "string", "minLength": 3, "maxLength": 320},
            "provider": {"type": "string", "enum": ["events", "imap"], "default": "events"},
            "shard": {"type": ["integer", "null"], "minimum": 0, "maximum": 65535},
        },
        required=["application_id", "email"],
    ),
}

SCHEMAS["MessageDetail"] = _obj(
    {
        **SCHEMAS["Message"]["properties"],
        "body_text": _nullable({"type": "string"}),
        "body_html": _nullable({"type": "string"}),
    }
)
SCHEMAS["NewApiKey"] = _obj(
    {
        **SCHEMAS["ApiKey"]["properties"],
        "api_key": {"type": "string", "description": "shown once, never again"},
    }
)

_PROBLEMS: Final = {
    400: "Invalid parameter, page token or cursor, or a request body that is not JSON or nests"
    f" deeper than {MAX_JSON_DEPTH} levels",
    401: "Missing, unknown or revoked API key",
    404: "No such object, or it belongs to another application (the same answer)",
    409: "Conflict",
    410: "The cursor is older than the retained change log",
    413: "The request body is larger than the limit",
    415: "The body is not application/json",
    422: "The body does not match the schema",
    503: "Starting, or the shard is moving; retry after Retry-After",
}


def _problem(status: int) -> Json:
    return {
        "description": _PROBLEMS[status],
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }


def _ok(schema_name: str, description: str, status: int = 200) -> dict[str, Json]:
    return {
        str(status): {
            "description": description,
            "content": {"application/json": {"schema": _ref(schema_name)}},
        }
    }


def _errors(*statuses: int) -> dict[str, Json]:
    return {str(s): _problem(s) for s in sorted({400, 401, 503, *statuses})}


def _path(name: str, description: str) -> Json:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": ID}


def _q(name: str, schema: Json, description: str) -> Json:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


ACCOUNT: Final = _path("account_id", "an account of the calling application")
MESSAGE: Final = _path("message_id", "a message of one of the calling application's accounts")
CURSOR_Q: Final = _q("cursor", TOKEN, "from a previous answer; left out: from the oldest retained change")
APP_AUTH: Final[list[Json]] = [{"apiKey": []}]
ADMIN_AUTH: Final[list[Json]] = [{"adminKey": []}]


def _body(schema_name: str) -> Json:
    return {"required": True, "content": {"application/json": {"schema": _ref(schema_name)}}}


PATHS: Final[dict[str, Json]] = {
    "/v1/accounts": {
        "get": {
            "operationId": "listAccounts",
            "tags": ["accounts"],
            "summary": "The application's accounts, in id order",
            "parameters": [
                _q(
                    "limit",
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_ACCOUNTS_PAGE_SIZE,
                        "default": DEFAULT_PAGE_SIZE,
                    },
                    "page size",
                ),
                _q("page_token", TOKEN, "next_page_token of the previous page"),
            ],
            "responses": {**_ok("AccountPage", "a page of accounts"), **_errors()},
        }
    },
    "/v1/accounts/{account_id}": {
        "get": {
            "operationId": "getAccount",
            "tags": ["accounts"],
            "summary": "One account",
            "parameters": [ACCOUNT],
            "responses": {**_ok("Account", "the account"), **_errors(404)},
        }
    },
    "/v1/accounts/{account_id}/messages": {
        "get": {
            "operationId": "listMessages",
            "tags": ["messages"],
            "summary": "An account's messages in a time range, newest first",
            "description": (
                "Served by the index (account_id, occurred_at, id): every page is one range scan."
                " The page token is bound to the account and to every parameter but limit."
                " Deleted messages are left out (the delta feed reports their deletion)."
            ),
            "parameters": [
                ACCOUNT,
                _q("before", TIME, "only messages whose occurred_at is before this (exclusive)"),
                _q("after", TIME, "only messages whose occurred_at is at or after this (inclusive)"),
                _q("status", {"type": "string", "enum": [s.value for s in Status]}, "lifecycle status"),
                _q("direction", {"type": "string", "enum": [d.value for d in Direction]}, "direction"),
                _q("channel", {"type": "string", "minLength": 1, "maxLength": MAX_CHANNEL_LENGTH}, "channel"),
                _q(
                    "from",
                    {"type": "string", "minLength": 1, "maxLength": MAX_ADDRESS_LENGTH},
                    "sender (exact)",
                ),
                _q(
                    "to",
                    {"type": "string", "minLength": 1, "maxLength": MAX_ADDRESS_LENGTH},
                    "a recipient (exact)",
                ),
                _q("folder", {"type": "string", "minLength": 1, "maxLength": MAX_FOLDER_LENGTH}, "folder"),
                _q("unread", {"type": "boolean"}, "read state"),
                _q(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE, "default": DEFAULT_PAGE_SIZE},
                    "page size",
                ),
                _q("page_token", TOKEN, "next_page_token of the previous page of the same query"),
            ],
            "responses": {**_ok("MessagePage", "a page of messages"), **_errors(404)},
        }
    },
    "/v1/messages/{message_id}": {
        "get": {
            "operationId": "getMessage",
            "tags": ["messages"],
            "summary": "One message with its body",
            "parameters": [MESSAGE],
            "responses": {**_ok("MessageDetail", "the message"), **_errors(404)},
        },
        "patch": {
            "operationId": "patchMessage",
            "tags": ["messages"],
            "summary": "Change read state, star, folder or labels",
            "description": (
                "The change goes through the pipeline as a `message.updated` lifecycle event, in order"
                " with the message's other events; the answer waits up to gateway_write_wait_s (5 s)"
                " for it to be stored: 200 with the message as stored (also at once when it already"
                " shows the values), else 202 (accepted, not visible yet). Stored changes write a new"
                " version and an `updated` change."
            ),
            "parameters": [MESSAGE],
            "requestBody": _body("MessagePatch"),
            "responses": {
                **_ok("MessageDetail", "the message after the change"),
                **_ok("MessageAccepted", "accepted; not stored yet", 202),
                **_errors(404, 413, 415, 422),
            },
        },
        "delete": {
            "operationId": "deleteMessage",
            "tags": ["messages"],
            "summary": "Erase a message's content and leave a tombstone change",
            "description": (
                "A `message.deleted` lifecycle event through the pipeline; the answer waits up to"
                " gateway_write_wait_s (5 s) for the tombstone: 200, else 202 (accepted, not stored yet)."
            ),
            "parameters": [MESSAGE],
            "responses": {
                **_ok("MessageDeleted", "erased; the tombstone's version"),
                **_ok("MessageAccepted", "accepted; not stored yet", 202),
                **_errors(404),
            },
        },
    },
    "/v1/accounts/{account_id}/delta": {
        "get": {
            "operationId": "getDelta",
            "tags": ["delta"],
            "summary": "The account's changes after a cursor, with the objects as they are now",
            "description": (
                "With timeout > 0 the request waits (long-poll) until the first change or the timeout."
                " The change log is retained for at least 7 days (gateway_changes_retention_s); a cursor"
                " older than that answers 410: list the messages again and continue from latest_cursor."
            ),
            "parameters": [
                ACCOUNT,
                CURSOR_Q,
                _q(
                    "limit",
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_DELTA_PAGE_SIZE,
                        "default": DEFAULT_DELTA_PAGE_SIZE,
                    },
                    "changes per answer",
                ),
                _q(
                    "timeout",
                    {"type": "number", "minimum": 0, "maximum": MAX_LONG_POLL_S, "default": 0},
                    "long-poll seconds",
                ),
            ],
            "responses": {**_ok("DeltaPage", "changes and the next cursor"), **_errors(404, 410)},
        }
    },
    "/v1/accounts/{account_id}/delta/latest_cursor": {
        "get": {
            "operationId": "getLatestCursor",
            "tags": ["delta"],
            "summary": "A cursor at the newest change: start following from now",
            "parameters": [ACCOUNT],
            "responses": {**_ok("Cursor", "the cursor"), **_errors(404)},
        }
    },
    "/v1/accounts/{account_id}/delta/stream": {
        "get": {
            "operationId": "streamDelta",
            "tags": ["delta"],
            "summary": "Server-Sent Events: changes as they commit",
            "description": (
                'Events: `delta` (data: a Delta), `heartbeat` while idle (data: {"cursor"}), `error`.'
                " Every delta and heartbeat carries a cursor as its id: reconnect with Last-Event-ID."
            ),
            "parameters": [
                ACCOUNT,
                CURSOR_Q,
                _q(
                    "heartbeat",
                    {
                        "type": "number",
                        "minimum": MIN_SSE_HEARTBEAT_S,
                        "maximum": MAX_SSE_HEARTBEAT_S,
                        "default": 15,
                    },
                    "seconds between heartbeats",
                ),
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "schema": TOKEN,
                    "description": "resume after this event (wins over cursor)",
                },
            ],
            "responses": {
                "200": {
                    "description": "an event stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                **_errors(404, 410),
            },
        }
    },
    "/v1/api-keys": {
        "get": {
            "operationId": "listApiKeys",
            "tags": ["keys"],
            "summary": "The application's API keys (never the keys themselves)",
            "responses": {**_ok("ApiKeyList", "the keys"), **_errors()},
        },
        "post": {
            "operationId": "createApiKey",
            "tags": ["keys"],
            "summary": "A new API key, shown once",
            "responses": {**_ok("NewApiKey", "the key", 201), **_errors(409)},
        },
    },
    "/v1/api-keys/{key_id}": {
        "delete": {
            "operationId": "revokeApiKey",
            "tags": ["keys"],
            "summary": "Revoke a key (not the application's last active one)",
            "parameters": [_path("key_id", "one of the application's keys")],
            "responses": {**_ok("ApiKey", "the revoked key"), **_errors(404, 409)},
        }
    },
    "/v1/admin/applications": {
        "post": {
            "operationId": "createApplication",
            "tags": ["admin"],
            "security": ADMIN_AUTH,
            "summary": "A new application and its first API key",
            "requestBody": _body("NewApplication"),
            "responses": {**_ok("Application", "the application", 201), **_errors(413, 422)},
        }
    },
    "/v1/admin/applications/{application_id}/api-keys": {
        "post": {
            "operationId": "createApplicationKey",
            "tags": ["admin"],
            "security": ADMIN_AUTH,
            "summary": "Another API key for an application",
            "parameters": [_path("application_id", "an application")],
            "responses": {**_ok("NewApiKey", "the key", 201), **_errors(404)},
        }
    },
    "/v1/admin/accounts": {
        "post": {
            "operationId": "createAccount",
            "tags": ["admin"],
            "security": ADMIN_AUTH,
            "summary": "An account of an application, on a shard (the least loaded when not named)",
            "requestBody": _body("NewAccount"),
            "responses": {**_ok("Account", "the account", 201), **_errors(413, 422)},
        }
    },
}

# -- webhooks (services.gateway.webhooks.routes) and IMAP accounts (services.gateway.imap_accounts) -

REPLAY_CAP_DOC: Final = WebhookSettings.model_fields["webhooks_replay_max_deliveries"].default
_WEBHOOK_EVENT: Final[Json] = {"type": "string", "enum": list(WEBHOOK_EVENT_TYPES)}
_WEBHOOK_URL: Final[Json] = {
    "type": "string",
    "minLength": 8,
    "maxLength": MAX_URL_LENGTH,
    "description": "http(s), no credentials or fragment; private and loopback addresses are refused",
}
_EVENT_TYPES: Final[Json] = {
    "type": "array",
    "items": _WEBHOOK_EVENT,
    "minItems": 1,
    "maxItems": len(WEBHOOK_EVENT_TYPES),
}
_ACCOUNT_FILTER: Final[Json] = {
    "type": "array",
    "items": ID,
    "minItems": 1,
    "maxItems": MAX_ACCOUNT_FILTER,
    "description": "only these accounts of the application (null or left out: all of them)",
}
_WEBHOOK_ORDERING: Final[Json] = {
    "type": "string",
    "enum": list(WEBHOOK_ORDERINGS),
    "description": "skip_refused (default): an event the receiver refuses with a 4xx (not 408, 429)"
    " a few times in a row is marked failed, replayable, and the account's later events go on;"
    " strict: it holds them back until the retry window ends, then the endpoint is disabled",
}
_WEBHOOK_PROPS: Final[dict[str, Json]] = {
    "id": ID,
    "url": {"type": "string"},
    "description": {"type": "string"},
    "event_types": {"type": "array", "items": _WEBHOOK_EVENT},
    "account_ids": _nullable({"type": "array", "items": ID}),
    "ordering": _WEBHOOK_ORDERING,
    "enabled": {"type": "boolean"},
    "disabled_reason": _nullable({"type": "string"}),
    "disabled_at": _nullable(TIME),
    "previous_secret_expires_at": _nullable(
        {**TIME, "description": "until then the secret before the last rotation signs too"}
    ),
    "created_at": TIME,
    "updated_at": TIME,
}
_DELIVERY_PROPS: Final[dict[str, Json]] = {
    "id": ID,
    "endpoint_id": ID,
    "account_id": ID,
    "change_id": ID,
    "webhook_id": {"type": "string", "description": "the same on every attempt and replay of one event"},
    "event_type": _WEBHOOK_EVENT,
    "state": {"type": "string", "enum": list(DELIVERY_STATES)},
    "attempts": {"type": "integer", "minimum": 0},
    "next_attempt_at": _nullable(TIME),
    "last_status": _nullable({"type": "integer"}),
    "last_error": _nullable({"type": "string"}),
    "replay_of": _nullable(ID),
    "created_at": TIME,
    "event_at": TIME,
    "finished_at": _nullable(TIME),
}
_IMAP_TEXT_TIME: Final[Json] = _nullable({"type": "string", "description": "UTC, ISO 8601"})
_IMAP_PROPS: Final[dict[str, Json]] = {
    "id": ID,
    "host": {"type": "string"},
    "port": {"type": "integer"},
    "tls_mode": {"type": "string", "enum": ["implicit", "starttls", "none"]},
    "username": {"type": "string"},
    "state": {"type": "string", "description": "pending, running, auth_failed, error or disconnected"},
    "last_error": _nullable({"type": "string"}),
    "last_sync_at": _IMAP_TEXT_TIME,
    "credentials_version": {"type": "integer", "minimum": 1},
    "folders": {"type": "array", "items": _ref("ImapFolder")},
}

SCHEMAS.update(
    {
        "MessageAccepted": _obj(
            {
                "id": ID,
                "status": {"type": "string", "enum": ["accepted"]},
                "detail": {"type": "string"},
            }
        ),
        "MessageDeleted": _obj(
            {
                "id": ID,
                "account_id": ID,
                "version": {"type": "integer", "minimum": 1},
                "deleted": {"type": "boolean", "enum": [True]},
            }
        ),
        "NewWebhook": _obj(
            {
                "url": _WEBHOOK_URL,
                "description": {"type": "string", "maxLength": 500},
                "event_types": {**_EVENT_TYPES, "description": "left out: every type"},
                "account_ids": _nullable(_ACCOUNT_FILTER),
                "ordering": _WEBHOOK_ORDERING,
            },
            required=["url"],
        ),
        "WebhookPatch": _obj(
            {
                "url": _WEBHOOK_URL,
                "description": {"type": "string", "maxLength": 500},
                "event_types": _EVENT_TYPES,
                "account_ids": _nullable(_ACCOUNT_FILTER),
                "enabled": {"type": "boolean", "description": "true re-enables a disabled endpoint"},
                "ordering": _WEBHOOK_ORDERING,
            },
            required=[],
        ),
        "Webhook": _obj(_WEBHOOK_PROPS),
        "WebhookWithSecret": _obj(
            {
                **_WEBHOOK_PROPS,
                "secret": {"type": "string", "description": "whsec_...: shown once, never again"},
            }
        ),
        "WebhookList": _obj({"data": {"type": "array", "items": _ref("Webhook")}}),
        "Delivery": _obj(_DELIVERY_PROPS),
        "DeliveryPage": _obj(
            {
                "data": {"type": "array", "items": _ref("Delivery")},
                "next_before": _nullable({**ID, "description": "pass as before for the next page"}),
            }
        ),
        "DeliveryAttempt": _obj(
            {
                "attempt": {"type": "integer", "minimum": 1},
                "started_at": TIME,
                "latency_ms": {"type": "integer", "minimum": 0},
                "status_code": _nullable({"type": "integer"}),
                "error": _nullable({"type": "string"}),
                "response_excerpt": _nullable({"type": "string"}),
            }
        ),
        "DeliveryDetail": _obj(
            {**_DELIVERY_PROPS, "attempts": {"type": "array", "items": _ref("DeliveryAttempt")}}
        ),
        "ReplayRange": _obj({"since": TIME, "until": {**TIME, "description": "after since"}}),
        "Replayed": _obj({"replayed": {"type": "integer", "minimum": 0}}),
        "NewImapAccount": _obj(
            {
                "provider": {"type": "string", "enum": ["imap"], "default": "imap"},
                "email": {
                    "type": "string",
                    "minLength": 3,
                    "maxLength": 320,
                    "pattern": "^[^@\\s]+@[^@\\s]+$",
                },
                "host": {"type": "string", "minLength": 1, "maxLength": 255},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535, "default": 993},
                "tls_mode": {
                    "type": "string",
                    "enum": ["implicit", "starttls", "none"],
                    "default": "implicit",
                    "description": "implicit TLS (IMAPS), STARTTLS before login (no plaintext "
                    "fallback), or none, only for a loopback host",
                },
                "username": {"type": "string", "minLength": 1, "maxLength": 320},
                "password": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 1000,
                    "description": "encrypted at rest, never returned",
                },
                "shard": _nullable({"type": "integer", "minimum": 0, "maximum": 65535}),
            },
            required=["email", "host", "username", "password"],
        ),
        "ImapCredentials": _obj(
            {
                "username": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 320,
                    "description": "left out: the current one",
                },
                "password": {"type": "string", "minLength": 1, "maxLength": 1000},
            },
            required=["password"],
        ),
        "ImapFolder": _obj(
            {
                "id": ID,
                "name": {"type": "string"},
                "role": _nullable({"type": "string"}),
                "state": {"type": "string"},
                "message_count": {"type": "integer", "minimum": 0},
                "last_sync_at": _IMAP_TEXT_TIME,
                "last_error": _nullable({"type": "string"}),
                "uidvalidity": _nullable({"type": "integer"}),
                "highestmodseq": _nullable({"type": "integer"}),
            }
        ),
        "ImapAccount": _obj(
            {
                **_IMAP_PROPS,
                "email": {"type": "string"},
                "provider": {"type": "string", "enum": ["imap"]},
            }
        ),
        "ImapSync": _obj(_IMAP_PROPS),
    }
)

WEBHOOK: Final = _path("id", "one of the application's webhooks")
DELIVERY: Final = _path("delivery_id", "a delivery of that webhook")

PATHS["/v1/accounts"]["post"] = {
    "operationId": "createImapAccount",
    "tags": ["accounts"],
    "summary": "Connect an IMAP mailbox: an account that ingest keeps in sync",
    "description": (
        "The password is encrypted at rest and never returned. The account is announced on"
        " flightlog.imap-accounts; one ingest instance picks it up and syncs it (GET .../sync)."
    ),
    "requestBody": _body("NewImapAccount"),
    "responses": {**_ok("ImapAccount", "the account and its sync state", 201), **_errors(413, 422)},
}
PATHS.update(
    {
        "/v1/accounts/{account_id}/sync": {
            "get": {
                "operationId": "getImapSync",
                "tags": ["accounts"],
                "summary": "An IMAP account's sync state, per folder",
                "parameters": [ACCOUNT],
                "responses": {**_ok("ImapSync", "the sync state"), **_errors(404)},
            }
        },
        "/v1/accounts/{account_id}/credentials": {
            "patch": {
                "operationId": "updateImapCredentials",
                "tags": ["accounts"],
                "summary": "New IMAP credentials; restarts a sync stopped by an authentication failure",
                "parameters": [ACCOUNT],
                "requestBody": _body("ImapCredentials"),
                "responses": {**_ok("ImapSync", "the sync state"), **_errors(404, 413, 422)},
            },
            "delete": {
                "operationId": "disconnectImapAccount",
                "tags": ["accounts"],
                "summary": "Stop syncing and forget the password (state disconnected); synced messages stay",
                "description": "New credentials (PATCH) connect the account again.",
                "parameters": [ACCOUNT],
                "responses": {**_ok("ImapSync", "the sync state"), **_errors(404)},
            },
        },
        "/v1/webhooks": {
            "get": {
                "operationId": "listWebhooks",
                "tags": ["webhooks"],
                "summary": "The application's webhook endpoints",
                "responses": {**_ok("WebhookList", "the endpoints"), **_errors()},
            },
            "post": {
                "operationId": "createWebhook",
                "tags": ["webhooks"],
                "summary": "Subscribe an endpoint; the answer shows its signing secret once",
                "description": (
                    "Deliveries are signed the Standard Webhooks way (webhook-id, webhook-timestamp,"
                    " webhook-signature), retried with backoff, in change order per account."
                ),
                "requestBody": _body("NewWebhook"),
                "responses": {
                    **_ok("WebhookWithSecret", "the endpoint and its secret", 201),
                    **_errors(409, 413, 422),
                },
            },
        },
        "/v1/webhooks/{id}": {
            "get": {
                "operationId": "getWebhook",
                "tags": ["webhooks"],
                "summary": "One endpoint (with why it was disabled, if it was)",
                "parameters": [WEBHOOK],
                "responses": {**_ok("Webhook", "the endpoint"), **_errors(404)},
            },
            "patch": {
                "operationId": "patchWebhook",
                "tags": ["webhooks"],
                "summary": "Change url, description, event_types, account_ids or enabled",
                "parameters": [WEBHOOK],
                "requestBody": _body("WebhookPatch"),
                "responses": {**_ok("Webhook", "the endpoint"), **_errors(404, 413, 422)},
            },
            "delete": {
                "operationId": "deleteWebhook",
                "tags": ["webhooks"],
                "summary": "Delete an endpoint; its pending deliveries are cancelled",
                "parameters": [WEBHOOK],
                "responses": {"204": {"description": "deleted"}, **_errors(404)},
            },
        },
        "/v1/webhooks/{id}/rotate-secret": {
            "post": {
                "operationId": "rotateWebhookSecret",
                "tags": ["webhooks"],
                "summary": "A new signing secret, shown once; the old one keeps signing for a grace period",
                "parameters": [WEBHOOK],
                "responses": {**_ok("WebhookWithSecret", "the endpoint and its new secret"), **_errors(404)},
            }
        },
        "/v1/webhooks/{id}/deliveries": {
            "get": {
                "operationId": "listWebhookDeliveries",
                "tags": ["webhooks"],
                "summary": "The delivery log, newest first",
                "parameters": [
                    WEBHOOK,
                    _q("state", {"type": "string", "enum": list(DELIVERY_STATES)}, "only this state"),
                    _q("before", ID, "next_before of the previous page"),
                    _q(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": MAX_DELIVERY_PAGE, "default": 100},
                        "page size",
                    ),
                ],
                "responses": {**_ok("DeliveryPage", "a page of deliveries"), **_errors(404)},
            }
        },
        "/v1/webhooks/{id}/deliveries/{delivery_id}": {
            "get": {
                "operationId": "getWebhookDelivery",
                "tags": ["webhooks"],
                "summary": "One delivery with all its attempts",
                "parameters": [WEBHOOK, DELIVERY],
                "responses": {**_ok("DeliveryDetail", "the delivery"), **_errors(404)},
            }
        },
        "/v1/webhooks/{id}/deliveries/{delivery_id}/replay": {
            "post": {
                "operationId": "replayWebhookDelivery",
                "tags": ["webhooks"],
                "summary": "Send a delivery again (same webhook-id), after the lane's pending ones",
                "parameters": [WEBHOOK, DELIVERY],
                "responses": {**_ok("Replayed", "queued", 202), **_errors(404)},
            }
        },
        "/v1/webhooks/{id}/replay": {
            "post": {
                "operationId": "replayWebhookRange",
                "tags": ["webhooks"],
                "summary": "Send again every delivery of a time range (by event time)",
                "description": f"At most {REPLAY_CAP_DOC} deliveries (webhooks_replay_max_deliveries).",
                "parameters": [WEBHOOK],
                "requestBody": _body("ReplayRange"),
                "responses": {**_ok("Replayed", "queued", 202), **_errors(404, 413, 422)},
            }
        },
    }
)


SPEC: Final[Json] = {
    "openapi": "3.1.0",
    "info": {
        "title": "flightlog gateway",
        "version": "1.0.0",
        "description": (
            "Messages, their change feed, webhooks, IMAP accounts and API keys of an application's"
            " accounts.\n\n"
            "Authenticate with `Authorization: Bearer <API key>`. Ids are decimal strings."
            " Errors are application/problem+json. Limits: request body"
            f" {MAX_BODY_BYTES} bytes, query string {MAX_QUERY_STRING_LENGTH} characters, pages"
            f" {MAX_PAGE_SIZE} messages, long-poll {MAX_LONG_POLL_S} s."
        ),
    },
    "servers": [{"url": "/"}],
    "security": APP_AUTH,
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "an application's API key"},
            "adminKey": {"type": "http", "scheme": "bearer", "description": "the operator's admin key"},
        },
    },
}

_SPEC_BYTES: Final = orjson.dumps(SPEC)


_CSS: Final = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 960px; margin: 2em auto; padding: 0 1em; color: #222 }
h2 { border-bottom: 1px solid #ddd; margin-top: 2em }
.op { margin: 1em 0; padding: .5em 1em; background: #f7f7f9; border-radius: 6px }
.m { display: inline-block; min-width: 4.5em; font-weight: bold; font-family: monospace }
code { background: #eee; padding: 0 .2em }
table { border-collapse: collapse; margin: .4em 0 }
td, th { border: 1px solid #ddd; padding: .2em .5em; text-align: left; vertical-align: top }
"""


def _docs_html() -> str:
    """A self-contained page (no scripts from elsewhere: the network may be closed)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>flightlog API</title><style>",
        _CSS,
        "</style></head><body>",
        f"<h1>{html.escape(SPEC['info']['title'])}</h1>",
        f"<p>{html.escape(SPEC['info']['description'])}</p>",
        "<p>The machine-readable document: <a href='/openapi.json'>/openapi.json</a> (OpenAPI 3.1).</p>",
    ]
    for path, ops in PATHS.items():
        for method, op in ops.items():
            parts.append(
                f"<div class='op'><span class='m'>{method.upper()}</span> <code>{html.escape(path)}</code>"
                f" &mdash; {html.escape(op['summary'])}"
            )
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
            answers = ", ".join(
                f"{code} {html.escape(str(r['description']))}" for code, r in op["responses"].items()
            )
            parts.append(f"<p><small>Answers: {answers}</small></p></div>")
    parts.append("<h2>Schemas</h2>")
    for name, schema in SCHEMAS.items():
        body = html.escape(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode())
        parts.append(f"<h3 id='{name}'>{name}</h3><pre>{body}</pre>")
    parts.append("</body></html>")
    return "".join(parts)


_DOCS: Final = _docs_html()


async def openapi_json(_: web.Request) -> web.Response:
    return web.Response(body=_SPEC_BYTES, content_type="application/json")


async def docs(_: web.Request) -> web.Response:
    return web.Response(text=_DOCS, content_type="text/html")


def add_doc_routes(app: web.Application) -> None:
    app.add_routes(
        [web.get("/openapi.json", openapi_json, allow_head=False), web.get("/docs", docs, allow_head=False)]
    )
