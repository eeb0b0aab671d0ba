"""Helpers of the sending e2e tests: two synced mailboxes, one able to send, and reading back."""

from __future__ import annotations

import mailbox
from contextlib import AsyncExitStack
from email.parser import BytesHeaderParser
from typing import Any

import orjson
from aiokafka import TopicPartition

from cli.mailbox_gen import DOMAIN
from cli.stack import HOST, Stack
from libs.config import KafkaSettings
from libs.events import message_key_bytes
from libs.inflight import partition_for
from libs.kafka import INFLIGHT, TOPICS, make_consumer
from libs.shards import ShardRouter
from tests.e2e.checks import offsets_since
from tests.e2e.conftest import Pipeline
from tests.e2e.mailbox_helpers import SYNCED_WITHIN_S, Gateway, Mailbox, synced_mailbox
from tests.polling import eventually

__all__ = ["final_message", "inflight_types", "maildir_message_ids", "two_mailboxes"]


async def inflight_types(account_id: int, key: str, since_ms: int) -> list[str]:
    """The types of the message's events on flightlog.inflight, in order, from ``since_ms`` on."""
    count = next(spec.partitions for spec in TOPICS if spec.name == INFLIGHT)
    wanted = message_key_bytes(account_id, key)
    tp = TopicPartition(INFLIGHT, partition_for(wanted, count))
    found: list[str] = []
    async with make_consumer(KafkaSettings(), group_id=None) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, (await offsets_since(consumer, [tp], since_ms))[tp])
        end = (await consumer.end_offsets([tp]))[tp]
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000, max_records=5000)
            found += [orjson.loads(r.value or b"")["type"] for r in batch.get(tp, []) if r.key == wanted]
    return found


async def two_mailboxes(
    stack_: AsyncExitStack, pipeline: Pipeline, stack: Stack, router: ShardRouter, tenants: Any, http: Any
) -> tuple[Mailbox, Gateway, Mailbox, Gateway]:
    a, gw_a = await stack_.enter_async_context(
        synced_mailbox(pipeline, stack, router, tenants, http, "sendfrom")
    )
    b, gw_b = await stack_.enter_async_context(
        synced_mailbox(pipeline, stack, router, tenants, http, "sendto")
    )
    status, smtp = await gw_a.call(
        "PUT",
        f"/v1/accounts/{a.account_id}/smtp",
        {"host": HOST, "port": stack.settings.submission_port, "tls_mode": "starttls"},
    )
    assert status == 200, smtp
    assert smtp["reuses_imap_login"] is True
    return a, gw_a, b, gw_b


async def final_message(
    gw: Gateway, account_id: int, key: str, statuses: tuple[str, ...] = ("delivered", "undelivered", "failed")
) -> dict[str, Any]:
    """The sent message once its status is one of ``statuses``."""
    found: dict[str, Any] = {}

    async def final() -> bool:
        row = (await gw.messages(account_id)).get(key)
        if row is not None and row["status"] in statuses:
            found.update(row)
        return bool(found)

    await eventually(final, SYNCED_WITHIN_S, f"sent message {key} final")
    return found


def maildir_message_ids(stack: Stack, address: str, folder: str | None = None) -> list[str]:
    """The Message-ID of every message in a folder (INBOX by default) of the user's Dovecot
    mailbox, read from disk."""
    path = stack.dovecot.dir / "mail" / DOMAIN / address.split("@", 1)[0] / "Maildir"
    if folder is not None:
        path = path / f".{folder}"
    if not path.is_dir():
        return []
    box = mailbox.Maildir(path, create=False)
    parser = BytesHeaderParser()
    return [str(parser.parsebytes(box.get_bytes(key)).get("Message-ID", "")) for key in box.keys()]
