"""Threads: an account's conversations, latest first, and one thread with its messages.

persist keeps one row per (account, thread_key) in the shard's ``threads`` table, recomputed
from the messages in the transaction that changes them (:mod:`libs.threads`); a
thread with no message left (all deleted or moved to another thread) keeps its row and id with a
count of 0 and is not shown. The list walks ``ix_threads_account_time (account_id,
last_message_at, id)`` newest first with the same signed keyset page tokens as the messages list
(:mod:`libs.cursor`), bound to the account and to the route.

Participants are read from the thread's latest messages (at most
:data:`~services.gateway.constants.THREAD_PARTICIPANT_MESSAGES` each, at most
:data:`~services.gateway.constants.MAX_THREAD_PARTICIPANTS` people), not stored with the thread:
persist's writer would otherwise merge JSON lists for every thread it touches, and a list of
every address a long thread ever had is unbounded.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Final

import orjson
from aiohttp import web

from libs.accounts import Application
from libs.cursor import query_fingerprint
from libs.ids import shard_of
from libs.openapi import Answer, ApiRoutes, Operation
from libs.resources import DIRECTORY, ROUTER
from libs.shards import ShardRouter
from services.gateway import schemas
from services.gateway.auth import authenticated, owned_account, path_id
from services.gateway.constants import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    MAX_THREAD_PARTICIPANTS,
    THREAD_PARTICIPANT_MESSAGES,
)
from services.gateway.errors import NotFound
from services.gateway.messages import (
    MessageQuery,
    fetch_messages,
    fetch_page,
    json_response,
    message_json,
    next_page_token,
    page_position,
    participants,
    read_rows,
    select_list,
)
from services.gateway.openapi import ACCOUNT, TOKEN, id_param, query
from services.gateway.params import Query
from services.gateway.resources import SETTINGS

__all__ = [
    "API",
    "THREAD_SELECT",
    "add_thread_routes",
    "participant_statement",
    "thread_json",
    "thread_participants",
]

API: Final = ApiRoutes()
THREAD_SELECT: Final = select_list(
    (
        "id",
        "account_id",
        "thread_key",
        "version",
        "subject",
        "message_count",
        "unread_count",
        "last_message_at",
    )
)
THREAD: Final = id_param("thread_id", "a thread of one of the calling application's accounts")
_ROLES: Final = ("from", "to", "cc", "bcc")
_LIMIT: Final = query(
    "limit",
    {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE, "default": DEFAULT_PAGE_SIZE},
    "page size",
)
_LIST_FINGERPRINT: Final = query_fingerprint({"list": "threads"})


def participant_statement(router: ShardRouter, account_id: int, keys: list[str]) -> tuple[str, list[Any]]:
    """The SQL reading the participants of the latest messages of the threads ``keys``, oldest
    first per thread (for :func:`thread_participants`)."""
    shard = shard_of(account_id)
    sql = (
        "SELECT thread_key, sender, to_addrs, cc_addrs, participants FROM ("
        " SELECT thread_key, sender, to_addrs, cc_addrs, participants, occurred_at, id, ROW_NUMBER() OVER"
        "  (PARTITION BY thread_key ORDER BY occurred_at DESC, id DESC) AS n"
        f" FROM {router.table(shard, 'messages')} FORCE INDEX (ix_messages_thread)"
        f" WHERE account_id = %s AND thread_key IN ({', '.join(['%s'] * len(keys))}) AND deleted = 0"
        ") m WHERE n <= %s ORDER BY thread_key, occurred_at, id"
    )
    return sql, [account_id, *keys, THREAD_PARTICIPANT_MESSAGES]


def _addresses(value: Any) -> list[str]:
    parsed = orjson.loads(value) if value is not None else None
    return [str(v) for v in parsed] if isinstance(parsed, list) else []


def thread_participants(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each thread's people (from :func:`participant_statement`'s rows), once each by address
    (case-insensitive), in the order they first appear, with the first name given."""
    out: dict[str, list[dict[str, Any]]] = {}
    seen: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        key = row["thread_key"]
        people, known = out.setdefault(key, []), seen.setdefault(key, {})
        roles = participants(row, _addresses(row["to_addrs"]), _addresses(row["cc_addrs"]))
        for role in _ROLES:
            for person in roles[role]:
                folded = person["email"].casefold()
                if folded in known:
                    if known[folded]["name"] is None:
                        known[folded]["name"] = person["name"]
                elif len(people) < MAX_THREAD_PARTICIPANTS:
                    known[folded] = dict(person)
                    people.append(known[folded])
    return out


def thread_json(row: dict[str, Any], people: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The public JSON of a thread row (times as :func:`select_list` formats them)."""
    return {
        "id": str(row["id"]),
        "account_id": str(row["account_id"]),
        "thread_key": row["thread_key"],
        "version": int(row["version"]),
        "subject": row["subject"],
        "message_count": int(row["message_count"]),
        "unread_count": int(row["unread_count"]),
        "last_message_at": row["last_message_at"],
        "participants": people.get(row["thread_key"], []),
    }


async def _threads_json(
    router: ShardRouter, account_id: int, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    if not rows:
        return []
    sql, args = participant_statement(router, account_id, [r["thread_key"] for r in rows])
    people = thread_participants(
        await read_rows(await router.pool(shard_of(account_id), write=False), sql, args)
    )
    return [thread_json(r, people) for r in rows]


@API.get(
    "/v1/accounts/{account_id}/threads",
    Operation(
        "listThreads",
        "threads",
        "An account's threads, the latest message first",
        (Answer(200, "a page of threads", schemas.ThreadPage),),
        description="A thread is the account's messages that share a thread_key (computed from"
        " Message-ID, References and In-Reply-To for mail; given by the application for its events) and"
        " are not deleted. Served by the index (account_id, last_message_at, id): every page is one range"
        " scan. The page token is bound to the account. Thread changes are in the delta feed"
        " (object_type thread).",
        params=(ACCOUNT, _LIMIT, query("page_token", TOKEN, "next_page_token of the previous page")),
        problems=(404,),
    ),
)
@authenticated
async def list_threads(request: web.Request, app: Application) -> web.StreamResponse:
    account = await owned_account(request, app)
    p = Query(request, {"limit", "page_token"})
    limit = p.integer("limit", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
    router = request.app[ROUTER]
    shard = shard_of(account.id)
    where = ["account_id = %s", "message_count > 0"]
    args: list[Any] = [account.id]
    position = page_position(request, account.id, _LIST_FINGERPRINT)
    if position is not None:
        at, last_id = position
        where.append("last_message_at <= %s AND (last_message_at < %s OR id < %s)")
        args += [at, at, last_id]
    # ``t.``: the SELECT list's formatted time carries the column's name (messages.list_statement).
    sql = (
        f"SELECT {THREAD_SELECT} FROM {router.table(shard, 'threads')} t"
        f" FORCE INDEX (ix_threads_account_time) WHERE {' AND '.join(where)}"
        " ORDER BY t.last_message_at DESC, t.id DESC LIMIT %s"
    )
    rows, more = await fetch_page(
        router, shard, sql, [*args, limit + 1], limit, replica=request.app[SETTINGS].gateway_replica_reads
    )
    return json_response(
        {
            "data": await _threads_json(router, account.id, rows),
            "next_page_token": next_page_token(
                request, account.id, _LIST_FINGERPRINT, rows, more, "last_message_at"
            ),
        }
    )


async def _owned_thread(request: web.Request, app: Application) -> dict[str, Any]:
    """The thread if it exists, has messages and belongs to one of the application's accounts."""
    thread_id = path_id(request, "thread_id", "thread")
    router = request.app[ROUTER]
    shard = shard_of(thread_id)
    if shard in router.shard_map.shard_cluster:
        rows = await read_rows(
            await router.pool(shard, write=False),
            f"SELECT {THREAD_SELECT} FROM {router.table(shard, 'threads')}"
            " WHERE id = %s AND message_count > 0",
            (thread_id,),
        )
        if (
            rows
            and await request.app[DIRECTORY].owned_account(app.id, int(rows[0]["account_id"])) is not None
        ):
            return rows[0]
    raise NotFound("thread", str(thread_id))


async def _messages_page(
    request: web.Request, thread: dict[str, Any], *, paged: bool
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of the thread's messages, newest first, and the next page's token."""
    allowed = {"limit", "page_token"} if paged else {"limit"}
    limit = Query(request, allowed).integer("limit", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
    account_id = int(thread["account_id"])
    fingerprint = query_fingerprint({"thread_id": str(thread["id"])})
    q = MessageQuery(account_id=account_id, limit=limit, thread_key=thread["thread_key"])
    if paged:
        q = replace(q, position=page_position(request, account_id, fingerprint))
    rows, more = await fetch_messages(request.app[ROUTER], q)
    return [message_json(r) for r in rows], next_page_token(
        request, account_id, fingerprint, rows, more, "occurred_at"
    )


@API.get(
    "/v1/threads/{thread_id}",
    Operation(
        "getThread",
        "threads",
        "One thread with the first page of its messages",
        (Answer(200, "the thread", schemas.ThreadDetail),),
        description="The messages are newest first; next_page_token continues them at"
        " GET /v1/threads/{thread_id}/messages. A thread with no message left answers 404.",
        params=(THREAD, _LIMIT),
        problems=(404,),
    ),
)
@authenticated
async def get_thread(request: web.Request, app: Application) -> web.StreamResponse:
    thread = await _owned_thread(request, app)
    messages, token = await _messages_page(request, thread, paged=False)
    [doc] = await _threads_json(request.app[ROUTER], int(thread["account_id"]), [thread])
    return json_response(doc | {"messages": messages, "next_page_token": token})


@API.get(
    "/v1/threads/{thread_id}/messages",
    Operation(
        "listThreadMessages",
        "threads",
        "A thread's messages, newest first",
        (Answer(200, "a page of messages", schemas.MessagePage),),
        description="Paged like the messages list; the page token is bound to the thread.",
        params=(THREAD, _LIMIT, query("page_token", TOKEN, "next_page_token of the previous page")),
        problems=(404,),
    ),
)
@authenticated
async def list_thread_messages(request: web.Request, app: Application) -> web.StreamResponse:
    thread = await _owned_thread(request, app)
    messages, token = await _messages_page(request, thread, paged=True)
    return json_response({"data": messages, "next_page_token": token})


def add_thread_routes(app: web.Application) -> None:
    API.register(app)
