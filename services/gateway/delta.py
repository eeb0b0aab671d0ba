"""The delta feed: an account's changes after a cursor, with the objects as they are now.

A cursor is the id of the last change the client has seen, sealed with the account (see
:mod:`libs.cursor`). Change ids of a shard commit in id order (persist's ``changes_lock``), so
"every change after id N" never skips one that commits later. An idle account's cursor still
moves forward (to the shard's newest change, at each read), so it does not fall behind the
retention mark.

Long-polls and streams read when the change notifier wakes them (:mod:`services.gateway.notifier`:
flightlog.changes, with a safety check per shard), never on a timer, so an idle one costs no
query; each subscribes before its first read, so no change falls between a read and the wait.
One that asks again with a cursor the notifier knows to be at its shard's newest change skips
that first read too (:meth:`~services.gateway.notifier.ChangeNotifier.quiet_after`).

Limits: an application holds at most ``gateway_max_streams_per_application`` open streams and
``gateway_max_long_polls_per_application`` waiting long-polls in each gateway process; one more
answers 429 with ``Retry-After``. A slot is held from before the first read to the end of the
response, and given back however it ends: a client that disconnects wakes its stream or poll
(aiohttp does not cancel the handler), which then ends at once instead of at its next heartbeat
or timeout.

Retention: the change log keeps at least ``gateway_changes_retention_s`` (7 days by default);
:mod:`services.gateway.retention` trims older rows and raises the shard's ``trimmed_through``
mark in the same transaction. A cursor below the mark answers 410: the client must resynchronise
(list the messages again) and take a fresh cursor from ``latest_cursor``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web
from asyncmy.cursors import DictCursor
from prometheus_client import Counter

from libs.accounts import Account, Application
from libs.cursor import CursorError, DeltaCursor, decode_delta_cursor, encode_delta_cursor
from libs.http import client_gone, is_unavailable, on_disconnect
from libs.ids import shard_of
from libs.openapi import Answer, ApiRoutes, Operation, Param
from libs.ratelimit import KeyedSlots, SlotsTaken
from libs.resources import ROUTER
from libs.service import STOPPING
from libs.shards import ShardRouter
from services.gateway import schemas
from services.gateway.auth import authenticated, owned_account
from services.gateway.constants import (
    BUSY_RETRY_AFTER_S,
    DEFAULT_DELTA_PAGE_SIZE,
    MAX_DELTA_PAGE_SIZE,
    MAX_LONG_POLL_S,
    MAX_SSE_HEARTBEAT_S,
    MIN_SSE_HEARTBEAT_S,
)
from services.gateway.errors import ApiError
from services.gateway.messages import LIST_SELECT, message_json
from services.gateway.notifier import ChangeNotifier, Subscription
from services.gateway.openapi import ACCOUNT, TOKEN, query
from services.gateway.params import Query
from services.gateway.resources import LONG_POLL_SLOTS, NOTIFIER, SETTINGS, STREAM_SLOTS, TOKEN_KEY
from services.gateway.threads import THREAD_SELECT, participant_statement, thread_json, thread_participants

__all__ = ["API", "CursorExpired", "DeltaPage", "add_delta_routes", "read_delta"]

SSE_RETRY_MS: Final = 2000
_SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",
}
API: Final = ApiRoutes()
_CURSOR: Final = query("cursor", TOKEN, "from a previous answer; left out: from the oldest retained change")


_reads = Counter(
    "flightlog_gateway_delta_reads_total", "Delta reads (each a few queries) of long-polls and streams"
)
_reads_skipped = Counter(
    "flightlog_gateway_delta_reads_skipped_total",
    "First reads of long-polls and streams skipped: the cursor is at its shard's newest change",
)
_busy = Counter(
    "flightlog_gateway_delta_busy_total",
    "Streams and long-polls refused (429) for their application's limit, by kind",
    ["kind"],
)


@contextlib.contextmanager
def _waiting(
    request: web.Request, app: Application, account: Account, slots: KeyedSlots[int] | None, kind: str
) -> Iterator[Subscription]:
    """A slot of ``app`` among ``slots`` (429 when all are held; None: no slot needed), then the
    account's subscription, woken when the client disconnects too; all given back on the way out."""
    notifier: ChangeNotifier = request.app[NOTIFIER]
    with contextlib.ExitStack() as held:
        if slots is not None:
            try:
                held.enter_context(slots.slot(app.id))
            except SlotsTaken as exc:
                _busy.labels(kind).inc()
                raise ApiError(
                    429,
                    "Too Many Requests",
                    f"the application has {exc.limit} {kind} open in this gateway process, its limit;"
                    " retry when one has ended",
                    retry_after_s=BUSY_RETRY_AFTER_S,
                ) from None
        sub = held.enter_context(notifier.subscribe(account.id))  # before the read: no change falls between
        held.enter_context(on_disconnect(request, sub.wake))
        yield sub


class CursorExpired(Exception):
    """The cursor is older than the retained change log."""


@dataclass(frozen=True, slots=True)
class DeltaPage:
    changes: list[dict[str, Any]]  # change rows with "object" (the message or thread now, or None)
    position: int  # the change id the next read starts after
    more: bool


async def read_delta(
    router: ShardRouter, account_id: int, after: int, limit: int, *, check_expiry: bool = True
) -> DeltaPage:
    """One consistent read (one snapshot) of the changes after ``after`` and their objects."""
    shard = shard_of(account_id)
    changes_t = router.table(shard, "changes")
    pool = await router.pool(shard, write=False)
    async with pool.acquire() as conn, conn.cursor(DictCursor) as cur:
        try:
            await cur.execute(
                f"SELECT trimmed_through FROM {router.table(shard, 'changes_retention')} WHERE id = 1"
            )
            mark_row = await cur.fetchone()
            trimmed_through = int(mark_row["trimmed_through"]) if mark_row else 0
            if check_expiry and after < trimmed_through:
                raise CursorExpired(f"changes up to {trimmed_through} have been trimmed")
            after = max(after, trimmed_through)
            await cur.execute(
                "SELECT id, object_type, object_id, change_type, version, created_at, status"
                f" FROM {changes_t} WHERE account_id = %s AND id > %s ORDER BY id LIMIT %s",
                (account_id, after, limit + 1),
            )
            rows = list(await cur.fetchall())
            more = len(rows) > limit
            rows = rows[:limit]
            objects: dict[int, dict[str, Any]] = {}
            threads_by_id: dict[int, dict[str, Any]] = {}
            ids = sorted({int(r["object_id"]) for r in rows if r["object_type"] == "message"})
            if ids:
                await cur.execute(
                    f"SELECT {LIST_SELECT} FROM {router.table(shard, 'messages')}"
                    f" WHERE id IN ({', '.join(['%s'] * len(ids))}) AND account_id = %s AND deleted = 0",
                    [*ids, account_id],
                )
                objects = {int(m["id"]): message_json(m) for m in await cur.fetchall()}
            thread_ids = sorted({int(r["object_id"]) for r in rows if r["object_type"] == "thread"})
            if thread_ids:
                await cur.execute(
                    f"SELECT {THREAD_SELECT} FROM {router.table(shard, 'threads')}"
                    f" WHERE id IN ({', '.join(['%s'] * len(thread_ids))}) AND account_id = %s"
                    " AND message_count > 0",
                    [*thread_ids, account_id],
                )
                threads = list(await cur.fetchall())
                people: dict[str, list[dict[str, Any]]] = {}
                if threads:
                    sql, args = participant_statement(router, account_id, [t["thread_key"] for t in threads])
                    await cur.execute(sql, args)
                    people = thread_participants(list(await cur.fetchall()))
                threads_by_id = {int(t["id"]): thread_json(t, people) for t in threads}
            position = int(rows[-1]["id"]) if rows else after
            if not more:
                # Nothing more for this account up to the shard's newest visible change.
                await cur.execute(f"SELECT MAX(id) AS top FROM {changes_t}")
                top = await cur.fetchone()
                if top and top["top"] is not None:
                    position = max(position, int(top["top"]))
        finally:
            await conn.commit()
    for r in rows:
        by_id = threads_by_id if r["object_type"] == "thread" else objects
        r["object"] = by_id.get(int(r["object_id"]))
    return DeltaPage(rows, position, more)


def _delta_json(key: bytes, account_id: int, change: dict[str, Any]) -> dict[str, Any]:
    created = change["created_at"]
    out = {
        "cursor": encode_delta_cursor(key, DeltaCursor(account_id, int(change["id"]))),
        "object_type": change["object_type"],
        "object_id": str(change["object_id"]),
        "change_type": change["change_type"],
        "version": int(change["version"]),
        "changed_at": created.isoformat(timespec="microseconds") + "Z",
        "object": change["object"],
    }
    if change["status"] is not None:
        out["status"] = change["status"]
    return out


def _cursor_position(request: web.Request, account: Account, token: str | None) -> tuple[int, bool]:
    """(change id to read after, whether the client gave a cursor)."""
    if token is None:
        return 0, False
    try:
        return decode_delta_cursor(request.app[TOKEN_KEY], token, account.id).change_id, True
    except CursorError as exc:
        raise ApiError(
            400, "Invalid cursor", f"{exc}; take a cursor from this account's delta or delta/latest_cursor"
        ) from None


def _gone() -> ApiError:
    return ApiError(
        410,
        "Cursor expired",
        "the cursor is older than the retained change log; list the account's messages again and"
        " continue from GET /v1/accounts/{account_id}/delta/latest_cursor",
    )


async def _first_read(
    request: web.Request, account: Account, after: int, limit: int, given: bool
) -> DeltaPage:
    """The read a long-poll or stream starts with, subscribed already: none when the cursor is
    at the newest change the notifier knows of on the account's shard (an idle follower asking
    again), as any later change wakes the subscription."""
    if given and request.app[NOTIFIER].quiet_after(shard_of(account.id), after):
        _reads_skipped.inc()
        return DeltaPage([], after, False)
    return await _read(request, account, after, limit, given)


async def _read(request: web.Request, account: Account, after: int, limit: int, given: bool) -> DeltaPage:
    _reads.inc()
    try:
        return await read_delta(request.app[ROUTER], account.id, after, limit, check_expiry=given)
    except CursorExpired:
        raise _gone() from None


@API.get(
    "/v1/accounts/{account_id}/delta",
    Operation(
        "getDelta",
        "delta",
        "The account's changes after a cursor, with the objects as they are now",
        (Answer(200, "changes and the next cursor", schemas.DeltaPage),),
        description="With timeout > 0 the request waits (long-poll) until the first change or the"
        " timeout. The change log is retained for at least 7 days (gateway_changes_retention_s); a"
        " cursor older than that answers 410: list the messages again and continue from latest_cursor."
        " Objects are messages (object_type message) and threads (object_type thread: a thread changes"
        " when its count, unread count, latest time, subject or a message's content does; deleted once"
        " it has no message left).",
        params=(
            ACCOUNT,
            _CURSOR,
            query(
                "limit",
                {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_DELTA_PAGE_SIZE,
                    "default": DEFAULT_DELTA_PAGE_SIZE,
                },
                "changes per answer",
            ),
            query(
                "timeout",
                {"type": "number", "minimum": 0, "maximum": MAX_LONG_POLL_S, "default": 0},
                "long-poll seconds",
            ),
        ),
        problems=(404, 410, 429),
    ),
)
@authenticated
async def get_delta(request: web.Request, app: Application) -> web.StreamResponse:
    account = await owned_account(request, app)
    stopping = request.app[STOPPING]
    p = Query(request, {"cursor", "limit", "timeout"})
    limit = p.integer("limit", DEFAULT_DELTA_PAGE_SIZE, 1, MAX_DELTA_PAGE_SIZE)
    timeout_s = p.number("timeout", 0, 0, MAX_LONG_POLL_S)
    after, given = _cursor_position(request, account, p.text("cursor", max_length=128))
    deadline = time.monotonic() + timeout_s
    slots = request.app[LONG_POLL_SLOTS] if timeout_s > 0 else None
    with _waiting(request, app, account, slots, "long-polls") as sub:
        first_read = _first_read if timeout_s > 0 else _read  # a plain GET answers what is there
        page = await first_read(request, account, after, limit, given)
        while not page.changes and not stopping.is_set() and not client_gone(request):
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                break
            woken = await sub.wait(page.position, remaining_s)
            if woken and not stopping.is_set() and not client_gone(request):
                page = await _read(request, account, page.position, limit, True)
    key = request.app[TOKEN_KEY]
    return web.json_response(
        {
            "deltas": [_delta_json(key, account.id, c) for c in page.changes],
            "next_cursor": encode_delta_cursor(key, DeltaCursor(account.id, page.position)),
            "has_more": page.more,
        },
        dumps=lambda v: orjson.dumps(v).decode(),
    )


@API.get(
    "/v1/accounts/{account_id}/delta/latest_cursor",
    Operation(
        "getLatestCursor",
        "delta",
        "A cursor at the newest change: start following from now",
        (Answer(200, "the cursor", schemas.Cursor),),
        params=(ACCOUNT,),
        problems=(404,),
    ),
)
@authenticated
async def get_latest_cursor(request: web.Request, app: Application) -> web.StreamResponse:
    account = await owned_account(request, app)
    Query(request, ())
    router = request.app[ROUTER]
    shard = shard_of(account.id)
    pool = await router.pool(shard, write=False)
    changes, mark = router.table(shard, "changes"), router.table(shard, "changes_retention")
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT GREATEST(COALESCE((SELECT MAX(id) FROM {changes}), 0),"
            f" COALESCE((SELECT trimmed_through FROM {mark} WHERE id = 1), 0))"
        )
        (top,) = await cur.fetchone()
        await conn.commit()
    return web.json_response(
        {"cursor": encode_delta_cursor(request.app[TOKEN_KEY], DeltaCursor(account.id, int(top)))}
    )


def _sse(event: str, cursor: str | None, data: dict[str, Any]) -> bytes:
    head = (f"id: {cursor}\n" if cursor else "") + f"event: {event}\ndata: "
    return head.encode() + orjson.dumps(data) + b"\n\n"


@API.get(
    "/v1/accounts/{account_id}/delta/stream",
    Operation(
        "streamDelta",
        "delta",
        "Server-Sent Events: changes as they commit",
        (Answer(200, "an event stream", media_type="text/event-stream", schema={"type": "string"}),),
        description='Events: `delta` (data: a Delta), `heartbeat` while idle (data: {"cursor"}), `error`.'
        " Every delta and heartbeat carries a cursor as its id: reconnect with Last-Event-ID.",
        params=(
            ACCOUNT,
            _CURSOR,
            query(
                "heartbeat",
                {
                    "type": "number",
                    "minimum": MIN_SSE_HEARTBEAT_S,
                    "maximum": MAX_SSE_HEARTBEAT_S,
                    "default": 15,
                },
                "seconds between heartbeats",
            ),
            Param("Last-Event-ID", TOKEN, "resume after this event (wins over cursor)", where="header"),
        ),
        problems=(404, 410, 429),
    ),
)
@authenticated
async def stream_delta(request: web.Request, app: Application) -> web.StreamResponse:
    """Server-Sent Events: one ``delta`` event per change, ``heartbeat`` events while idle.

    Every event's id is a cursor, heartbeats included (they carry the advanced position), so a
    reconnecting client's ``Last-Event-ID`` resumes exactly where it stopped.
    """
    account = await owned_account(request, app)
    settings = request.app[SETTINGS]
    p = Query(request, {"cursor", "heartbeat"})
    heartbeat_s = p.number(
        "heartbeat", settings.gateway_sse_heartbeat_s, MIN_SSE_HEARTBEAT_S, MAX_SSE_HEARTBEAT_S
    )
    token = request.headers.get("Last-Event-ID") or p.text("cursor", max_length=128)
    after, given = _cursor_position(request, account, token)
    with _waiting(request, app, account, request.app[STREAM_SLOTS], "streams") as sub:
        # errors (410, 503) before the stream's headers
        page = await _first_read(request, account, after, MAX_DELTA_PAGE_SIZE, given)
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            await response.write(f"retry: {SSE_RETRY_MS}\n\n".encode())
            await _stream(request, response, account, sub, page, heartbeat_s)
            await response.write_eof()
    return response


async def _stream(
    request: web.Request,
    response: web.StreamResponse,
    account: Account,
    sub: Subscription,
    page: DeltaPage,
    heartbeat_s: float,
) -> None:
    """Write the changes of each read, then wait for the notifier (or the next heartbeat)."""
    stopping, key = request.app[STOPPING], request.app[TOKEN_KEY]
    ends_at = time.monotonic() + request.app[SETTINGS].gateway_sse_max_duration_s
    last_sent = time.monotonic()
    changes, position, more = page.changes, page.position, page.more
    while not stopping.is_set() and not client_gone(request) and time.monotonic() < ends_at:
        for change in changes:
            doc = _delta_json(key, account.id, change)
            await response.write(_sse("delta", doc["cursor"], doc))
            last_sent = time.monotonic()
        changes = []
        if not more:
            if time.monotonic() - last_sent >= heartbeat_s:
                cursor = encode_delta_cursor(key, DeltaCursor(account.id, position))
                await response.write(_sse("heartbeat", cursor, {"cursor": cursor}))
                last_sent = time.monotonic()
            wait_s = min(last_sent + heartbeat_s, ends_at) - time.monotonic()
            if not await sub.wait(position, wait_s) or stopping.is_set() or client_gone(request):
                continue  # a heartbeat is due, or the stream ends
        try:
            page = await _read(request, account, position, MAX_DELTA_PAGE_SIZE, True)
        except ApiError as exc:
            await response.write(_sse("error", None, {"status": exc.status, "detail": exc.detail}))
            return
        except Exception as exc:
            # The headers are sent, so the problem middleware cannot answer 503 any more: say
            # it in the stream and end it; the client reconnects with its last event id.
            if not is_unavailable(exc):
                raise
            detail = "the account's shard cannot be reached; reconnect with Last-Event-ID"
            await response.write(_sse("error", None, {"status": 503, "detail": detail}))
            return
        changes, position, more = page.changes, page.position, page.more


def add_delta_routes(app: web.Application) -> None:
    API.register(app)
