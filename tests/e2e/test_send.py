"""Sending mail end to end: the gateway takes a message, the sender submits it to the stack's
Postfix, Postfix delivers it into the recipient's Dovecot mailbox (synced by ingest as inbound
mail) and returns DSNs into the sender's, which move the sent message to delivered or
undelivered."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest

from cli.stack import HOST, Stack
from libs.shards import ShardRouter
from tests.e2e.conftest import Pipeline
from tests.e2e.mailbox_helpers import SYNCED_WITHIN_S, Gateway, Mailbox, synced_mailbox
from tests.e2e.send_helpers import final_message, inflight_types, maildir_message_ids, two_mailboxes
from tests.polling import eventually

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def exits() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


Pair = tuple[Mailbox, Gateway, Mailbox, Gateway]  # the sender and the recipient, each with its gateway


@pytest.fixture
async def pair(
    pipeline: Pipeline,
    stack: Stack,
    router: ShardRouter,
    tenant_factory: Any,
    http: aiohttp.ClientSession,
    exits: AsyncExitStack,
) -> Pair:
    """Two synced stack users, each with its tenant's gateway client."""
    return await two_mailboxes(exits, pipeline, stack, router, tenant_factory, http)


async def test_a_sent_message_arrives_and_is_delivered(pair: Pair, stack: Stack) -> None:
    since_ms = int(time.time() * 1000) - 1000
    a, gw_a, b, gw_b = pair
    subject = f"sent through flightlog {uuid.uuid4().hex}"
    body = {
        "to": [{"name": "Bee", "email": b.address}],
        "subject": subject,
        "text": "hello",
        "idempotency_key": "one",
    }
    status, accepted = await gw_a.call("POST", f"/v1/accounts/{a.account_id}/messages/send", body)
    assert status == 202, accepted
    # The same key again: the same message, not a second one.
    status, again = await gw_a.call("POST", f"/v1/accounts/{a.account_id}/messages/send", body)
    assert status == 202 and again == accepted
    status, conflict = await gw_a.call(
        "POST", f"/v1/accounts/{a.account_id}/messages/send", {**body, "subject": "another"}
    )
    assert status == 409, conflict

    arrived: list[dict[str, Any]] = []

    async def in_b() -> bool:
        arrived[:] = [m for m in (await gw_b.messages(b.account_id)).values() if m["subject"] == subject]
        return bool(arrived)

    await eventually(in_b, SYNCED_WITHIN_S, "the message in the recipient's synced account")
    assert arrived[0]["direction"] == "inbound"
    sent = await final_message(gw_a, a.account_id, accepted["message_key"])
    assert sent["status"] == "delivered", sent
    assert sent["direction"] == "outbound" and sent["subject"] == subject
    types = await inflight_types(a.account_id, accepted["message_key"], since_ms)
    lifecycle = list(dict.fromkeys(types))  # the gateway's and the sender's accepted are one event
    assert lifecycle == [
        "message.accepted", "message.queued", "message.sending", "message.sent", "message.delivered",
    ], types  # fmt: skip
    assert len([m for m in (await gw_b.messages(b.account_id)).values() if m["subject"] == subject]) == 1
    # Stored once sent (most servers send no report), then updated by the DSN: the delta feed
    # tells each step's status, which webhooks deliver as message.sent and message.delivered.
    status, page = await gw_a.call("GET", f"/v1/accounts/{a.account_id}/delta?limit=100")
    assert status == 200, page
    steps = [(d["change_type"], d.get("status")) for d in page["deltas"] if d["object_id"] == sent["id"]]
    assert [step for step in steps if step[1] is not None] == [("created", "sent"), ("updated", "delivered")]
    assert steps[0] == ("created", "sent"), steps

    # Dovecot files no sent copy itself: the sender appends one to the Sent folder, once.
    def sent_copies() -> int:
        return maildir_message_ids(stack, a.address, "Sent").count(f"<{accepted['message_id']}>")

    await eventually(lambda: sent_copies() > 0, SYNCED_WITHIN_S, "the sent copy in the Sent folder")
    assert sent_copies() == 1

    # Synced, the copy is the sent message itself (its folder), not a second message.
    async def filed() -> bool:
        row = (await gw_a.messages(a.account_id)).get(accepted["message_key"])
        return row is not None and row["folder"] == "Sent"

    await eventually(filed, SYNCED_WITHIN_S, "the sent message in the Sent folder")
    mine = [m for m in (await gw_a.messages(a.account_id)).values() if m["subject"] == subject]
    assert [m["message_key"] for m in mine] == [accepted["message_key"]], mine


async def test_a_message_to_an_unknown_user_is_undelivered_with_the_reason(pair: Pair) -> None:
    a, gw_a, _, _ = pair
    unknown = f"nobody-{uuid.uuid4().hex[:8]}@flightlog.test"
    status, accepted = await gw_a.call(
        "POST",
        f"/v1/accounts/{a.account_id}/messages/send",
        {"to": [{"email": unknown}], "subject": "to nobody", "text": "hello"},
    )
    assert status == 202, accepted
    sent = await final_message(gw_a, a.account_id, accepted["message_key"])
    assert sent["status"] == "undelivered", sent
    status, full = await gw_a.call("GET", f"/v1/messages/{sent['id']}")
    assert status == 200, full
    assert full["error_code"].startswith("5.1.1"), full


async def test_a_message_to_a_known_and_an_unknown_user_arrives_and_is_undelivered(pair: Pair) -> None:
    """Two reports, a success for one recipient and a failure for the other, in whatever order
    they are synced: the message is undelivered with the failure's reason."""
    a, gw_a, b, gw_b = pair
    unknown = f"nobody-{uuid.uuid4().hex[:8]}@flightlog.test"
    subject = f"to two {uuid.uuid4().hex}"
    status, accepted = await gw_a.call(
        "POST",
        f"/v1/accounts/{a.account_id}/messages/send",
        {"to": [{"email": b.address}, {"email": unknown}], "subject": subject, "text": "hello"},
    )
    assert status == 202, accepted

    async def in_b() -> bool:
        return any(m["subject"] == subject for m in (await gw_b.messages(b.account_id)).values())

    await eventually(in_b, SYNCED_WITHIN_S, "the message in the known recipient's account")
    sent = await final_message(gw_a, a.account_id, accepted["message_key"], ("undelivered",))
    status, full = await gw_a.call("GET", f"/v1/messages/{sent['id']}")
    assert status == 200 and full["error_code"].startswith("5.1.1"), full


async def test_send_refusals_are_problems(
    pipeline: Pipeline,
    stack: Stack,
    router: ShardRouter,
    tenant_factory: Any,
    http: aiohttp.ClientSession,
    exits: AsyncExitStack,
) -> None:
    a, gw_a = await exits.enter_async_context(
        synced_mailbox(pipeline, stack, router, tenant_factory, http, "sendno")
    )
    path = f"/v1/accounts/{a.account_id}/messages/send"
    message = {"to": [{"email": "x@flightlog.test"}], "text": "hi"}
    status, problem = await gw_a.call("POST", path, message)
    assert status == 409 and problem["title"] == "No SMTP server", problem
    status, problem = await gw_a.call(
        "PUT", f"/v1/accounts/{a.account_id}/smtp", {"host": HOST, "port": 25, "tls_mode": "starttls"}
    )
    assert status == 422 and problem["title"] == "Port not allowed", problem
    status, _ = await gw_a.call(
        "PUT",
        f"/v1/accounts/{a.account_id}/smtp",
        {"host": HOST, "port": stack.settings.smtps_port, "tls_mode": "implicit"},
    )
    assert status == 200
    for bad in ({**message, "from": {"email": "someone@else.test"}}, {"text": "no recipient"}):
        status, problem = await gw_a.call("POST", path, bad)
        assert status == 422, problem
