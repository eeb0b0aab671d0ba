"""Messages: range queries per account, and get / patch / delete by id.

Range queries walk ``ix_messages_account_time (account_id, occurred_at, id)`` newest first with a
keyset position carried by an opaque page token, so every page is a range scan of one index,
however deep. Filters are applied to the rows of that range.

PATCH and DELETE never write the row: the transform owns message versions, so a change made
beside it would take a version number the transform hands out again, and persist's version guard
would then drop the transform's real update. They put a lifecycle event (``message.updated`` with
the flags, ``message.deleted``) on flightlog.inflight like ingest does (same keying, acks=all) and
wait up to ``gateway_write_wait_s`` for the row's version to pass the one they read: 200 with the
message as stored, or 202 when it has not landed yet (it still will, in order with the message's
other events).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final

import asyncmy
import asyncmy.errors
import orjson
from aiohttp import web
from aiokafka.errors import KafkaError
from asyncmy.cursors import DictCursor
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from pydantic.json_schema import SkipJsonSchema

from libs.accounts import Application
from libs.cursor import CursorError, PageToken, decode_page_token, encode_page_token, query_fingerprint
from libs.events import Direction, Event, EventType, MessageFlags, Status
from libs.http import invalid_body, is_unavailable, read_json
from libs.ids import shard_of
from libs.inflight import publish_inflight
from libs.messages import DETAIL_COLUMNS, LIST_COLUMNS, decode_body
from libs.openapi import Answer, ApiRoutes, Operation
from libs.resources import DIRECTORY, PRODUCER, ROUTER
from libs.shards import ShardRouter
from services.gateway import schemas
from services.gateway.auth import authenticated, owned_account, path_id
from services.gateway.constants import (
    DEFAULT_PAGE_SIZE,
    MAX_ADDRESS_LENGTH,
    MAX_BODY_BYTES,
    MAX_CHANNEL_LENGTH,
    MAX_FOLDER_LENGTH,
    MAX_PAGE_SIZE,
)
from services.gateway.errors import ApiError, NotFound
from services.gateway.openapi import ACCOUNT, MESSAGE, TOKEN, query
from services.gateway.params import Query
from services.gateway.resources import SETTINGS, TOKEN_KEY

__all__ = [
    "API",
    "DETAIL_SELECT",
    "LIST_SELECT",
    "MessagePatch",
    "MessageQuery",
    "add_message_routes",
    "attachment_list",
    "fetch_messages",
    "fetch_page",
    "from_micros",
    "json_response",
    "list_statement",
    "message_json",
    "message_row",
    "micros",
    "next_page_token",
    "page_position",
    "participants",
    "read_rows",
    "select_list",
]

EPOCH: Final = datetime(1970, 1, 1)
MIN_TIME: Final = datetime(1000, 1, 1)
MAX_TIME: Final = datetime(9999, 12, 31, 23, 59, 59, 999999)
MAX_LABELS: Final = 50

FILTERS: Final = ("status", "direction", "channel", "from", "to", "folder", "unread", "before", "after")

API: Final = ApiRoutes()
_TIME: Final = {"type": "string", "format": "date-time"}
_ACCEPTED: Final = Answer(202, "accepted; not stored yet", schemas.MessageAccepted)


# The message columns a response shows, as the SQL that reads them. The server formats the times
# as the API shows them (RFC 3339, microseconds, Z): converting four datetimes a row in Python
# (the driver's parse, then isoformat) was the largest cost of a page after the driver's own.
# ``%%``: the statements go through the driver's %-formatting of their arguments.
_TIME_COLUMNS: Final = frozenset(
    {"occurred_at", "final_at", "created_at", "updated_at", "sent_at", "last_message_at"}
)
_TIME_FORMAT: Final = "'%%Y-%%m-%%dT%%H:%%i:%%s.%%fZ'"


def select_list(columns: tuple[str, ...]) -> str:
    """The SELECT list of ``columns``, the times as the strings :func:`message_json` shows."""
    return ", ".join(f"DATE_FORMAT({c}, {_TIME_FORMAT}) AS {c}" if c in _TIME_COLUMNS else c for c in columns)


# ``deleted`` is left out: these read rows WHERE deleted = 0.
LIST_SELECT: Final = select_list(tuple(c for c in LIST_COLUMNS if c != "deleted"))
DETAIL_SELECT: Final = select_list(tuple(c for c in DETAIL_COLUMNS if c != "deleted"))


def _time(value: Any) -> str | None:
    """A time as the API shows it; from :func:`select_list` it already is."""
    if value is None or isinstance(value, str):
        return value
    assert isinstance(value, datetime)
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _json_list(value: Any) -> list[str]:
    if value is None:
        return []
    parsed = orjson.loads(value)
    return [str(v) for v in parsed] if isinstance(parsed, list) else []


def attachment_list(value: Any) -> list[dict[str, Any]]:
    """Attachment metadata as stored by persist (libs.events.AttachmentInfo), every key present."""
    if value is None:
        return []
    parsed = orjson.loads(value)
    if not isinstance(parsed, list):
        return []
    return [
        {
            "filename": a.get("filename"),
            "content_type": a.get("content_type") or "application/octet-stream",
            "size_bytes": int(a.get("size_bytes") or 0),
            "content_id": a.get("content_id"),
            "inline": bool(a.get("inline")),
            "sha256": a.get("sha256"),  # absent from rows written before it was computed
        }
        for a in parsed
        if isinstance(a, dict)
    ]


PARTICIPANT_ROLES: Final = ("from", "to", "cc", "bcc", "reply_to")


def _people(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [
        {"name": p.get("name"), "email": p["email"]}
        for p in value
        if isinstance(p, dict) and isinstance(p.get("email"), str)
    ]


def participants(row: dict[str, Any], to: list[str], cc: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every role's ``{name, email}`` list. A role the ``participants`` column lacks (every role
    of a row written before it, migration 0012) is read from the bare-address columns, unnamed."""
    stored = orjson.loads(row["participants"]) if row["participants"] is not None else {}
    if not isinstance(stored, dict):
        stored = {}
    out = {role: _people(stored.get(role)) for role in PARTICIPANT_ROLES}
    for role, bare in (
        ("from", [row["sender"]] if row["sender"] is not None else []),
        ("to", to),
        ("cc", cc),
    ):
        if role not in stored:
            out[role] = [{"name": None, "email": email} for email in bare]
    return out


def message_json(row: dict[str, Any], *, with_body: bool = False) -> dict[str, Any]:
    """The public JSON of a message row (ids as decimal strings, times in UTC with a ``Z``)."""
    to, cc = _json_list(row["to_addrs"]), _json_list(row["cc_addrs"])
    people = participants(row, to, cc)
    doc: dict[str, Any] = {
        "id": str(row["id"]),
        "account_id": str(row["account_id"]),
        "message_key": bytes(row["message_key"]).decode("utf-8", "replace"),
        "version": int(row["version"]),
        "status": row["status"],
        "direction": row["direction"],
        "channel": row["channel"],
        "from": row["sender"],
        "to": to,
        "cc": cc,
        "bcc": [p["email"] for p in people["bcc"]],
        "reply_to": [p["email"] for p in people["reply_to"]],
        "participants": people,
        "subject": row["subject"],
        "snippet": row["snippet"],
        "error_code": row["error_code"],
        "unread": bool(row["unread"]),
        "starred": bool(row["starred"]),
        "folder": row["folder"],
        "labels": _json_list(row["labels"]),
        "source": row["source"],
        "occurred_at": _time(row["occurred_at"]),
        "final_at": _time(row["final_at"]),
        "redacted": bool(row["redacted"]),
        "created_at": _time(row["created_at"]),
        "updated_at": _time(row["updated_at"]),
        "thread_key": row["thread_key"],
        "size_bytes": None if row["size_bytes"] is None else int(row["size_bytes"]),
        "attachments": attachment_list(row["attachments"]),
        "parse_warnings": _json_list(row["parse_warnings"]),
        "date": _time(row["sent_at"]),
        "message_id": row["rfc_message_id"],
        "in_reply_to": row["in_reply_to"],
        "references": _json_list(row["reference_ids"]),
    }
    if with_body:
        text, html = decode_body(row["body"], int(row["body_encoding"]))
        doc["body_text"] = text
        doc["body_html"] = html
    return doc


def micros(value: datetime | str) -> int:
    if isinstance(value, str):  # as select_list formats it
        value = datetime.fromisoformat(value.removesuffix("Z"))
    return (value - EPOCH) // timedelta(microseconds=1)


def from_micros(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


@dataclass(frozen=True, slots=True)
class MessageQuery:
    """One range query: the account, its filters (SQL values), the keyset position and the size."""

    account_id: int
    limit: int = DEFAULT_PAGE_SIZE
    before: datetime | None = None  # exclusive, UTC naive
    after: datetime | None = None  # inclusive, UTC naive
    status: str | None = None
    direction: str | None = None
    channel: str | None = None
    sender: str | None = None
    to: str | None = None
    folder: str | None = None
    unread: bool | None = None
    position: tuple[datetime, int] | None = None  # (occurred_at, id) of the last row already seen
    thread_key: str | None = None  # one thread's messages (services.gateway.threads)


def list_statement(router: ShardRouter, q: MessageQuery) -> tuple[str, list[Any]]:
    """The SQL of one page: newest first, one row more than the page to know whether more follow."""
    shard = shard_of(q.account_id)
    where = ["account_id = %s", "deleted = 0"]
    args: list[Any] = [q.account_id]
    if q.after is not None:
        where.append("occurred_at >= %s")
        args.append(q.after)
    if q.before is not None:
        where.append("occurred_at < %s")
        args.append(q.before)
    if q.position is not None:
        # The first condition bounds the index range; the second drops what the last page showed.
        at, last_id = q.position
        where.append("occurred_at <= %s AND (occurred_at < %s OR id < %s)")
        args += [at, at, last_id]
    for column, value in (
        ("status", q.status),
        ("direction", q.direction),
        ("channel", q.channel),
        ("sender", q.sender),
        ("folder", q.folder),
    ):
        if value is not None:
            where.append(f"{column} = %s")
            args.append(value)
    if q.to is not None:
        where.append("JSON_CONTAINS(to_addrs, %s)")
        args.append(orjson.dumps(q.to).decode())
    if q.unread is not None:
        where.append("unread = %s")
        args.append(int(q.unread))
    # A thread's messages are read whole through their own index and sorted: a thread is small
    # beside the account, whose time index would be read until the thread's oldest message.
    index = "ix_messages_account_time"
    if q.thread_key is not None:
        where.append("thread_key = %s")
        args.append(q.thread_key)
        index = "ix_messages_thread"
    # ``m.``: the SELECT list's formatted times carry the columns' names, and an unqualified name
    # in ORDER BY would sort by those strings, reading and sorting the account's every row.
    sql = (
        f"SELECT {LIST_SELECT} FROM {router.table(shard, 'messages')} m FORCE INDEX ({index})"
        f" WHERE {' AND '.join(where)} ORDER BY m.occurred_at DESC, m.id DESC LIMIT %s"
    )
    return sql, [*args, q.limit + 1]


async def fetch_messages(
    router: ShardRouter, q: MessageQuery, *, replica: bool = False
) -> tuple[list[dict[str, Any]], bool]:
    """One page of rows (as dicts) and whether more follow.

    ``replica``: read from the shard's replica (a list tolerates the replica's few milliseconds
    of lag; semi-synchronous replication has every acknowledged write there already). A replica
    that fails the read is set aside for a while and the read is done on the primary.
    """
    sql, args = list_statement(router, q)
    return await fetch_page(router, shard_of(q.account_id), sql, args, q.limit, replica=replica)


async def fetch_page(
    router: ShardRouter, shard: int, sql: str, args: list[Any], limit: int, *, replica: bool = False
) -> tuple[list[dict[str, Any]], bool]:
    """The rows of a page query (``limit`` + 1 rows asked) and whether more follow; ``replica``
    as in :func:`fetch_messages`."""
    if replica:
        try:
            return await _page(await router.pool(shard, replica=True), sql, args, limit)
        except (OSError, asyncmy.errors.OperationalError) as exc:
            if not is_unavailable(exc):
                raise
            router.mark_replica_down(shard)
    return await _page(await router.pool(shard, write=False), sql, args, limit)


async def _page(
    pool: asyncmy.Pool, sql: str, args: list[Any], limit: int
) -> tuple[list[dict[str, Any]], bool]:
    rows = await read_rows(pool, sql, args)
    return rows[:limit], len(rows) > limit


async def read_rows(pool: asyncmy.Pool, sql: str, args: Any) -> list[dict[str, Any]]:
    """The rows of one SELECT, as dicts, and the COMMIT that ends the transaction it opened (the
    pools are not autocommit). Not ``SELECT ...; COMMIT`` in one round trip: asyncmy's pool then
    still sees the connection inside a transaction and closes it, so every request opened a new
    connection (measured: 1,089 vs 6,667 reads/s, 584 vs 70 us of client CPU each)."""
    async with pool.acquire() as conn, conn.cursor(DictCursor) as cur:
        await cur.execute(sql, args)
        rows = list(await cur.fetchall())
        await conn.commit()
    return rows


def _parse_time(name: str, text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.upper())
    except ValueError:
        raise ApiError(400, "Invalid parameter", f"{name} must be an RFC 3339 date-time") from None
    if value.tzinfo is None:
        raise ApiError(400, "Invalid parameter", f"{name} must carry a time zone, e.g. 2026-11-01T09:00:00Z")
    try:
        naive = value.astimezone(UTC).replace(tzinfo=None)
    except OverflowError:
        naive = MIN_TIME if value.year < 5000 else MAX_TIME
    return min(max(naive, MIN_TIME), MAX_TIME)


def parse_message_query(request: web.Request, account_id: int) -> tuple[MessageQuery, int]:
    """The query and its fingerprint (what a page token must have been made for)."""
    p = Query(request, {"limit", "page_token", *FILTERS})
    status = p.choice("status", [s.value for s in Status])
    direction = p.choice("direction", [d.value for d in Direction])
    before = p.text("before", max_length=64)
    after = p.text("after", max_length=64)
    q = MessageQuery(
        account_id=account_id,
        limit=p.integer("limit", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE),
        before=_parse_time("before", before) if before is not None else None,
        after=_parse_time("after", after) if after is not None else None,
        status=status,
        direction=direction,
        channel=p.text("channel", max_length=MAX_CHANNEL_LENGTH),
        sender=p.text("from", max_length=MAX_ADDRESS_LENGTH),
        to=p.text("to", max_length=MAX_ADDRESS_LENGTH),
        folder=p.text("folder", max_length=MAX_FOLDER_LENGTH),
        unread=p.boolean("unread"),
    )
    fingerprint = query_fingerprint({name: request.query[name] for name in FILTERS if name in request.query})
    return q, fingerprint


@API.get(
    "/v1/accounts/{account_id}/messages",
    Operation(
        "listMessages",
        "messages",
        "An account's messages in a time range, newest first",
        (Answer(200, "a page of messages", schemas.MessagePage),),
        description="Served by the index (account_id, occurred_at, id): every page is one range scan."
        " The page token is bound to the account and to every parameter but limit."
        " Deleted messages are left out (the delta feed reports their deletion).",
        params=(
            ACCOUNT,
            query("before", _TIME, "only messages whose occurred_at is before this (exclusive)"),
            query("after", _TIME, "only messages whose occurred_at is at or after this (inclusive)"),
            query("status", {"type": "string", "enum": [s.value for s in Status]}, "lifecycle status"),
            query("direction", {"type": "string", "enum": [d.value for d in Direction]}, "direction"),
            query("channel", {"type": "string", "minLength": 1, "maxLength": MAX_CHANNEL_LENGTH}, "channel"),
            query(
                "from", {"type": "string", "minLength": 1, "maxLength": MAX_ADDRESS_LENGTH}, "sender (exact)"
            ),
            query(
                "to",
                {"type": "string", "minLength": 1, "maxLength": MAX_ADDRESS_LENGTH},
                "a recipient (exact)",
            ),
            query("folder", {"type": "string", "minLength": 1, "maxLength": MAX_FOLDER_LENGTH}, "folder"),
            query("unread", {"type": "boolean"}, "read state"),
            query(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE, "default": DEFAULT_PAGE_SIZE},
                "page size",
            ),
            query("page_token", TOKEN, "next_page_token of the previous page of the same query"),
        ),
        problems=(404,),
    ),
)
@authenticated
async def list_messages(request: web.Request, app: Application) -> web.StreamResponse:
    account = await owned_account(request, app)
    q, fingerprint = parse_message_query(request, account.id)
    q = replace(q, position=page_position(request, account.id, fingerprint))
    rows, more = await fetch_messages(
        request.app[ROUTER], q, replica=request.app[SETTINGS].gateway_replica_reads
    )
    next_token = next_page_token(request, account.id, fingerprint, rows, more, "occurred_at")
    return json_response({"data": [message_json(r) for r in rows], "next_page_token": next_token})


def page_position(request: web.Request, account_id: int, fingerprint: int) -> tuple[datetime, int] | None:
    """The keyset position (time, id) of the request's ``page_token`` (None: the first page);
    400 for a token that is not this account's and query's."""
    token = request.query.get("page_token")
    if token is None:
        return None
    try:
        position = decode_page_token(request.app[TOKEN_KEY], token, account_id, fingerprint)
    except CursorError as exc:
        raise ApiError(400, "Invalid page_token", str(exc)) from None
    return from_micros(position.occurred_at_us), position.message_id


def next_page_token(
    request: web.Request,
    account_id: int,
    fingerprint: int,
    rows: list[dict[str, Any]],
    more: bool,
    time_column: str,
) -> str | None:
    """The token of the page after ``rows`` (ordered by ``time_column`` and id), if more follow."""
    if not (more and rows):
        return None
    last = rows[-1]
    return encode_page_token(
        request.app[TOKEN_KEY], PageToken(account_id, fingerprint, micros(last[time_column]), int(last["id"]))
    )


def json_response(doc: dict[str, Any], status: int = 200) -> web.Response:
    # orjson's bytes as the body: no str in between, as json_response with dumps= would make
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


async def message_row(
    request: web.Request, app: Application, message_id: int, columns: str
) -> dict[str, Any] | None:
    """The message if it exists, is not deleted and belongs to one of the application's accounts."""
    router = request.app[ROUTER]
    shard = shard_of(message_id)
    if shard not in router.shard_map.shard_cluster:
        return None
    pool = await router.pool(shard, write=False)
    rows = await read_rows(
        pool,
        f"SELECT {columns} FROM {router.table(shard, 'messages')} WHERE id = %s AND deleted = 0",
        (message_id,),
    )
    if not rows or await request.app[DIRECTORY].owned_account(app.id, int(rows[0]["account_id"])) is None:
        return None
    return rows[0]


async def _owned_message(request: web.Request, app: Application, *, with_body: bool) -> dict[str, Any]:
    message_id = path_id(request, "message_id", "message")
    row = await message_row(request, app, message_id, DETAIL_SELECT if with_body else LIST_SELECT)
    if row is None:
        raise NotFound("message", str(message_id))
    return row


@API.get(
    "/v1/messages/{message_id}",
    Operation(
        "getMessage",
        "messages",
        "One message with its body",
        (Answer(200, "the message", schemas.MessageDetail),),
        params=(MESSAGE,),
        problems=(404,),
    ),
)
@authenticated
async def get_message(request: web.Request, app: Application) -> web.StreamResponse:
    row = await _owned_message(request, app, with_body=True)
    return json_response(message_json(row, with_body=True))


def _no_null_defaults(schema: dict[str, Any]) -> None:
    schema["minProperties"] = 1
    for prop in schema["properties"].values():
        prop.pop("default", None)


class MessagePatch(BaseModel):
    """The fields to change: at least one, none null. The handler refuses an empty patch and a
    null, so the schema shows neither."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_no_null_defaults)

    unread: bool | SkipJsonSchema[None] = None
    starred: bool | SkipJsonSchema[None] = None
    folder: (
        Annotated[str, StringConstraints(min_length=1, max_length=MAX_FOLDER_LENGTH)] | SkipJsonSchema[None]
    ) = None
    labels: (
        Annotated[
            list[Annotated[str, StringConstraints(min_length=1, max_length=100)]],
            Field(max_length=MAX_LABELS),
        ]
        | SkipJsonSchema[None]
    ) = None


async def _json_body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise ApiError(415, "Unsupported media type", "send the body as application/json")
    return await read_json(request, max_bytes=MAX_BODY_BYTES)


async def _primary_row(
    router: ShardRouter, message_id: int, columns: tuple[str, ...]
) -> dict[str, Any] | None:
    """The row as the primary has it now, deleted or not (a replica may lag behind a write)."""
    shard = shard_of(message_id)
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor(DictCursor) as cur:
        await cur.execute(
            f"SELECT {', '.join(columns)} FROM {router.table(shard, 'messages')} WHERE id = %s", (message_id,)
        )
        row = await cur.fetchone()
        await conn.commit()
    return None if row is None else dict(row)


async def _submit(
    request: web.Request, row: dict[str, Any], kind: EventType, flags: MessageFlags | None
) -> None:
    """Put one lifecycle event of the row's message on flightlog.inflight; return once Kafka has it."""
    now = datetime.now(UTC)
    event = Event(
        event_id=f"api-{uuid.uuid4().hex}", account_id=int(row["account_id"]),
        message_key=bytes(row["message_key"]).decode(), type=kind, occurred_at=now, source="api",
        flags=flags, received_at=now,
    )  # fmt: skip
    try:
        await publish_inflight(
            request.app[PRODUCER], [event], timeout_s=request.app[SETTINGS].gateway_produce_timeout_s
        )
    except (KafkaError, TimeoutError) as exc:
        raise ApiError(
            503,
            "Service unavailable",
            f"Kafka did not acknowledge the change ({type(exc).__name__}); it may or may not be applied,"
            " and sending it again is safe",
            retry_after_s=1,
        ) from None


async def _landed(
    request: web.Request,
    message_id: int,
    read_version: int,
    done: Callable[[dict[str, Any]], bool],
    columns: tuple[str, ...],
) -> dict[str, Any] | None:
    """Poll the primary until the row is past ``read_version`` and ``done(row)``; None at the deadline."""
    settings = request.app[SETTINGS]
    deadline = time.monotonic() + settings.gateway_write_wait_s
    while True:
        row = await _primary_row(request.app[ROUTER], message_id, columns)
        if row is not None and int(row["version"]) > read_version and done(row):
            return row
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(min(settings.gateway_write_poll_interval_s, max(deadline - time.monotonic(), 0)))


def _accepted(message_id: int, what: str) -> web.Response:
    return json_response(
        {
            "id": str(message_id),
            "status": "accepted",
            "detail": f"the {what} is on its way through the pipeline and has not been stored yet;"
            " GET the message or follow the delta feed to see it land",
        },
        status=202,
    )


@API.patch(
    "/v1/messages/{message_id}",
    Operation(
        "patchMessage",
        "messages",
        "Change read state, star, folder or labels",
        (Answer(200, "the message after the change", schemas.MessageDetail), _ACCEPTED),
        description="The change goes through the pipeline as a `message.updated` lifecycle event, in"
        " order with the message's other events; the answer waits up to gateway_write_wait_s (5 s)"
        " for it to be stored: 200 with the message as stored (also at once when it already shows"
        " the values), else 202 (accepted, not visible yet). Stored changes write a new version and"
        " an `updated` change.",
        params=(MESSAGE,),
        body=MessagePatch,
        problems=(404, 415),
    ),
)
@authenticated
async def patch_message(request: web.Request, app: Application) -> web.StreamResponse:
    message_id = path_id(request, "message_id", "message")
    row = await _owned_message(request, app, with_body=True)  # 404 before looking at the body
    try:
        patch = MessagePatch.model_validate(await _json_body(request))
    except ValidationError as exc:
        raise invalid_body(exc) from None
    wanted = patch.model_dump(exclude_unset=True)
    if not wanted or any(v is None for v in wanted.values()):
        raise ApiError(
            422,
            "Invalid request body",
            "set at least one of unread, starred, folder, labels (null is not a value)",
        )
    # Sent even when the row already shows the values: an event still in the pipeline may be
    # about to change them, and this one must come after it.
    await _submit(request, row, EventType.UPDATED, MessageFlags(**wanted))
    current = message_json(row, with_body=True)
    if all(current[k] == v for k, v in wanted.items()):
        return json_response(current)

    def shows_patch(fresh: dict[str, Any]) -> bool:
        doc = message_json(fresh)
        return bool(fresh["deleted"]) or all(doc[k] == v for k, v in wanted.items())

    fresh = await _landed(request, message_id, int(row["version"]), shows_patch, DETAIL_COLUMNS)
    if fresh is None:
        return _accepted(message_id, "change")
    if fresh["deleted"]:
        raise NotFound("message", str(message_id))
    return json_response(message_json(fresh, with_body=True))


@API.delete(
    "/v1/messages/{message_id}",
    Operation(
        "deleteMessage",
        "messages",
        "Erase a message's content and leave a tombstone change",
        (Answer(200, "erased; the tombstone's version", schemas.MessageDeleted), _ACCEPTED),
        description="A `message.deleted` lifecycle event through the pipeline; the answer waits up to"
        " gateway_write_wait_s (5 s) for the tombstone: 200, else 202 (accepted, not stored yet).",
        params=(MESSAGE,),
        problems=(404,),
    ),
)
@authenticated
async def delete_message(request: web.Request, app: Application) -> web.StreamResponse:
    message_id = path_id(request, "message_id", "message")
    row = await _owned_message(request, app, with_body=False)
    await _submit(request, row, EventType.DELETED, None)
    fresh = await _landed(
        request, message_id, int(row["version"]), lambda r: bool(r["deleted"]), LIST_COLUMNS
    )
    if fresh is None:
        return _accepted(message_id, "deletion")
    return json_response(
        {
            "id": str(message_id),
            "account_id": str(fresh["account_id"]),
            "version": int(fresh["version"]),
            "deleted": True,
        }
    )


def add_message_routes(app: web.Application) -> None:
    API.register(app)
