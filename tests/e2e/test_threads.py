"""Threads (issue 18, item 3) through the running services and against the gateway alone.

Against Dovecot: a reply chain APPENDed into a synced mailbox is read back as one thread with the
right counts, subject and participants; its messages page through ``/v1/threads/{id}``; setting
``\\Seen`` on the server lowers the thread's unread count, and the change comes out in the delta
feed (``object_type`` thread) and as a ``thread.updated`` webhook.

Against the gateway alone (rows written with persist's writer): the list's keyset paging, and the
404 and 400 answers for another application's thread and for a token of another query.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from cli.stack import IMAP_TEST_PASSWORD, Stack
from libs.imap.client import Imap4, parse_search
from libs.shards import ShardRouter
from services.ingest.imap.sync import message_key as imap_message_key
from tests.e2e.conftest import Pipeline
from tests.e2e.gateway_helpers import T0, bearer, gateway, record, seed
from tests.e2e.mailbox_helpers import SYNCED_WITHIN_S, Gateway, Mailbox, append, synced_mailbox
from tests.e2e.test_mail_to_webhook import stack_of_webhooks
from tests.e2e.webhook_helpers import Receiver
from tests.polling import eventually

__all__ = ["gateway"]

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def mail(
    tag: str, n: int, to: str, *, parents: list[str], sender: str = '"Ann Lee" <ann@example.org>'
) -> bytes:
    """Message ``n`` of conversation ``tag``, replying to ``parents`` (oldest first)."""
    head = [
        f"From: {sender}",
        f"To: <{to}>",
        f"Subject: {'Re: ' if parents else ''}lunch {tag}",
        f"Date: Tue, 01 Jul 2025 10:{n:02d}:00 +0000",
        f"Message-ID: <{tag}-{n}@example.org>",
    ]
    if parents:
        head += [f"In-Reply-To: <{parents[-1]}>", "References: " + " ".join(f"<{p}>" for p in parents)]
    return ("\r\n".join(head) + f"\r\n\r\nmessage {n} of {tag}\r\n").encode()


async def mark_seen(stack: Stack, mailbox: Mailbox, raw: bytes) -> None:
    """Set \\Seen on the server's copy of ``raw`` (found by its Message-ID)."""
    message_id = raw.split(b"Message-ID: <", 1)[1].split(b">", 1)[0].decode()
    client = Imap4("127.0.0.1", stack.dovecot.port, timeout=60)
    await client.wait_hello_from_server()
    assert (await client.login(mailbox.address, IMAP_TEST_PASSWORD)).result == "OK"
    try:
        assert (await client.select("INBOX")).result == "OK"
        found = await client.uid_search(f'HEADER Message-ID "{message_id}"', charset=None)
        uids = parse_search(found.lines, 10)
        assert len(uids) == 1, found.lines
        assert (await client.uid("store", str(uids.pop()), "+FLAGS.SILENT (\\Seen)")).result == "OK"
    finally:
        await client.logout()


async def threads_of(gw: Gateway, account_id: int) -> list[dict[str, Any]]:
    status, body = await gw.call("GET", f"/v1/accounts/{account_id}/threads?limit=200")
    assert status == 200, body
    data: list[dict[str, Any]] = body["data"]
    return data


async def thread_where(gw: Gateway, account_id: int, subject: str, **wanted: Any) -> dict[str, Any]:
    """The thread of ``subject`` once it shows ``wanted``."""
    found: dict[str, Any] = {}

    async def shows() -> bool:
        found.clear()
        for t in await threads_of(gw, account_id):
            if t["subject"] == subject:
                found.update(t)
        return bool(found) and all(found[k] == v for k, v in wanted.items())

    await eventually(shows, SYNCED_WITHIN_S, f"thread {subject!r} with {wanted}")
    return found


async def test_a_reply_chain_synced_from_imap_is_one_thread_whose_unread_count_follows_seen(
    pipeline: Pipeline, stack: Stack, router: ShardRouter, tenant_factory: Any, http: aiohttp.ClientSession
) -> None:
    async with synced_mailbox(pipeline, stack, router, tenant_factory, http, "threads") as (mailbox, gw):
        tag = f"t-{uuid.uuid4().hex[:12]}"
        ids = [f"{tag}-{n}@example.org" for n in range(3)]
        chain = [
            mail(tag, 0, mailbox.address, parents=[]),
            mail(tag, 1, "ann@example.org", parents=ids[:1], sender=f'"Bo Berg" <{mailbox.address}>'),
            mail(tag, 2, mailbox.address, parents=ids[:2]),
        ]
        other = mail(f"{tag}-other", 0, mailbox.address, parents=[])
        for n, raw in enumerate([*chain, other]):  # the INTERNALDATE is the message's occurred_at
            await append(stack, mailbox.address, raw, datetime(2025, 7, 1, 10, n, tzinfo=UTC))

        thread = await thread_where(gw, mailbox.account_id, f"lunch {tag}", message_count=3)
        assert thread["unread_count"] == 3
        assert thread["last_message_at"] == "2025-07-01T10:02:00.000000Z"
        assert thread["participants"] == [
            {"name": "Ann Lee", "email": "ann@example.org"},
            {"name": "Bo Berg", "email": mailbox.address},
        ]
        alone = await thread_where(gw, mailbox.account_id, f"lunch {tag}-other", message_count=1)
        assert alone["id"] != thread["id"]
        listed = await threads_of(gw, mailbox.account_id)
        times = [t["last_message_at"] for t in listed]
        assert times == sorted(times, reverse=True)  # latest first

        # The thread with its messages, newest first, the rest a page further.
        status, detail = await gw.call("GET", f"/v1/threads/{thread['id']}?limit=2")
        assert status == 200, detail
        keys = [imap_message_key(mailbox.folder_id, raw) for raw in chain]
        assert [m["message_key"] for m in detail["messages"]] == [keys[2], keys[1]]
        status, rest = await gw.call(
            "GET", f"/v1/threads/{thread['id']}/messages?limit=2&page_token={detail['next_page_token']}"
        )
        assert status == 200, rest
        assert [m["message_key"] for m in rest["data"]] == [keys[0]] and rest["next_page_token"] is None

        status, latest = await gw.call("GET", f"/v1/accounts/{mailbox.account_id}/delta/latest_cursor")
        assert status == 200, latest
        await mark_seen(stack, mailbox, chain[1])
        seen = await thread_where(gw, mailbox.account_id, f"lunch {tag}", unread_count=2)
        assert seen["message_count"] == 3 and seen["version"] > thread["version"]

        status, delta = await gw.call(
            "GET", f"/v1/accounts/{mailbox.account_id}/delta?cursor={latest['cursor']}&limit=500"
        )
        assert status == 200, delta
        changes = [d for d in delta["deltas"] if d["object_type"] == "thread"]
        assert [(d["object_id"], d["change_type"]) for d in changes] == [(thread["id"], "updated")]
        assert changes[0]["version"] == seen["version"]
        assert changes[0]["object"]["unread_count"] == 2


async def test_thread_changes_are_webhooks(router: ShardRouter, tenant_factory: Any) -> None:
    """thread.created, thread.updated and thread.deleted go to the endpoints that asked for them,
    each once, signed like every webhook; a message without a thread key makes none."""
    tenant = await tenant_factory(router.shard_map.shards[:1])
    account = tenant.accounts[0].id
    receiver = Receiver()
    await receiver.start()
    try:
        async with stack_of_webhooks(router, tenant.api_key) as hooks:
            await hooks.subscribe(
                receiver.url, event_types=["thread.created", "thread.updated", "thread.deleted"]
            )
            await seed(router, [record(account, "a", 10, thread_key="k"), record(account, "loose", 11)])
            await seed(router, [record(account, "b", 12, thread_key="k")])
            await seed(router, [record(account, "a", 20, thread_key="k", deleted=True)])
            await seed(router, [record(account, "b", 21, thread_key="k", deleted=True)])

            def announced() -> list[tuple[str, int]]:
                return [(r.json["type"], r.json["data"]["version"]) for r in receiver.ok]

            wanted = [
                ("thread.created", 1),
                ("thread.updated", 2),
                ("thread.updated", 3),
                ("thread.deleted", 4),
            ]
            await eventually(lambda: len(announced()) >= len(wanted), SYNCED_WITHIN_S, "the thread webhooks")
            assert announced() == wanted
            assert {r.json["data"]["object"] for r in receiver.ok} == {"thread"}
            assert len({r.json["data"]["id"] for r in receiver.ok}) == 1
    finally:
        await receiver.stop()


async def test_threads_page_latest_first_and_stay_the_applications_own(
    gateway: str, tenant_factory: Any, router: ShardRouter, http: aiohttp.ClientSession
) -> None:
    tenant = await tenant_factory([router.shard_map.shards[0]])
    account = tenant.accounts[0].id
    # Five threads of two messages, thread i's latest at minute 10 * i + 1.
    await seed(
        router,
        [
            record(
                account, f"m{i}-{j}", thread_key=f"thread-{i}", occurred_at=T0 + timedelta(minutes=10 * i + j)
            )
            for i in range(5)
            for j in range(2)
        ],
    )
    headers = bearer(tenant.api_key)
    seen: list[dict[str, Any]] = []
    url: str | None = f"{gateway}/v1/accounts/{account}/threads?limit=2"
    while url is not None:
        async with http.get(url, headers=headers) as resp:
            page = await resp.json()
            assert resp.status == 200, page
        seen += page["data"]
        token = page["next_page_token"]
        url = None if token is None else f"{gateway}/v1/accounts/{account}/threads?limit=2&page_token={token}"
    assert [t["thread_key"] for t in seen] == [f"thread-{i}" for i in reversed(range(5))]
    assert all(t["message_count"] == 2 and t["subject"] == f"subject m{t['thread_key'][-1]}-0" for t in seen)

    async with http.get(f"{gateway}/v1/accounts/{account}/messages?limit=1", headers=headers) as resp:
        message_token = (await resp.json())["next_page_token"]
    async with http.get(
        f"{gateway}/v1/accounts/{account}/threads?page_token={message_token}", headers=headers
    ) as resp:
        assert resp.status == 400, await resp.text()  # a token of another query

    other = await tenant_factory([router.shard_map.shards[0]])
    for path in (f"/v1/threads/{seen[0]['id']}", f"/v1/threads/{seen[0]['id']}/messages"):
        async with http.get(f"{gateway}{path}", headers=bearer(other.api_key)) as resp:
            assert resp.status == 404, await resp.text()
        async with http.get(f"{gateway}{path}", headers=headers) as resp:
            assert resp.status == 200, await resp.text()
