"""The sender against the stack's Postfix: a refused login fails the message at once, a server
that cannot be reached is retried with backoff until the attempts run out, and a lease keeps a
second sender off a message."""

from __future__ import annotations

import asyncio
import contextlib
import mailbox
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.parser import BytesHeaderParser

import pytest

from cli.mailbox_gen import DOMAIN
from cli.services import local_smtp_env
from cli.stack import HOST, Stack
from libs.accounts import create_account, create_application
from libs.config import KafkaSettings
from libs.crypto import SecretBox
from libs.imap_accounts import ImapAccountsSettings, SyncStore
from libs.kafka import make_producer
from libs.outbox import OutboxRow, OutboxState, OutboxStore, SmtpSettings
from libs.sending import Mailbox, Outgoing, SendRequest, rfc_message_id, send_message_key
from libs.shards import ShardRouter
from services.sender.settings import SenderSettings
from services.sender.worker import Sender
from tests.polling import eventually
from tests.scratch import app_name, dovecot_user

pytestmark = pytest.mark.timeout(120)

SETTLED_WITHIN_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def running_sender(
    router: ShardRouter, kafka_settings: KafkaSettings, stack: Stack, **settings: object
) -> AsyncIterator[None]:
    env = local_smtp_env(stack.settings)
    smtp = SmtpSettings(smtp_tls_ca_file=env["FLIGHTLOG_SMTP_TLS_CA_FILE"], smtp_allow_private_hosts=True)
    box = SecretBox.from_settings()
    stopping = asyncio.Event()
    async with make_producer(kafka_settings) as producer:
        sender = Sender(
            router, OutboxStore(router, box), producer, f"test-{uuid.uuid4().hex[:8]}",
            SenderSettings.model_validate({"sender_poll_interval_s": 0.1, **settings}), smtp,
            SyncStore(router, box), ImapAccountsSettings(),
        )  # fmt: skip
        task = asyncio.create_task(sender.run(stopping))
        try:
            yield
        finally:
            stopping.set()
            await task


async def _queued(
    router: ShardRouter, stack: Stack, port: int, password: str, shard: int | None = None
) -> tuple[OutboxStore, SendRequest]:
    """An account (on ``shard``, if given) with its own SMTP login and one message in its outbox."""
    address = f"{dovecot_user('sender')}@{DOMAIN}"
    stack.dovecot.add_user(address)
    app, _ = await create_application(router, app_name("sender"))
    account = await create_account(router, app.id, address, shard=shard)
    store = OutboxStore(router, SecretBox.from_settings())
    await store.set_smtp(account.id, app.id, HOST, port, "starttls", address, password)
    key = send_message_key(account.id, None)
    request = SendRequest(
        account_id=account.id,
        message_key=key,
        sender=Mailbox(email=address),
        message=Outgoing.model_validate({"to": [{"email": address}], "text": "hi"}),
        message_id=rfc_message_id(key, address),
        date=datetime.now(UTC),
    )
    assert await store.put(request) == request
    return store, request


async def _settled(store: OutboxStore, request: SendRequest, state: OutboxState) -> OutboxRow:
    found: list[OutboxRow] = []

    async def reached() -> bool:
        row = await store.row(request.account_id, request.message_key)
        found[:] = [row] if row is not None and row.state is state else []
        return bool(found)

    await eventually(reached, SETTLED_WITHIN_S, f"the message {state}")
    return found[0]


async def test_a_refused_login_fails_at_once(
    router: ShardRouter, kafka_settings: KafkaSettings, stack: Stack
) -> None:
    store, request = await _queued(router, stack, stack.settings.submission_port, "wrong password")
    async with running_sender(router, kafka_settings, stack):
        row = await _settled(store, request, OutboxState.FAILED)
    assert row.attempts == 0  # a 5xx is not retried


async def test_an_unreachable_server_is_retried_then_fails(
    router: ShardRouter, kafka_settings: KafkaSettings, stack: Stack
) -> None:
    store, request = await _queued(router, stack, _free_port(), "flightlog")
    async with running_sender(
        router,
        kafka_settings,
        stack,
        sender_retry_initial_s=0.2,
        sender_retry_max_s=0.5,
        sender_max_attempts=3,
    ):
        row = await _settled(store, request, OutboxState.FAILED)
    assert row.attempts == 2  # two deferrals, and the third failure is the last


class _Tarpit:
    """A server on loopback that takes connections and never says a word: the SMTP greeting a
    client waits for never comes (a hostile or broken tenant server)."""

    def __init__(self) -> None:
        self._held: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._held.append(writer)

        self._server = await asyncio.start_server(hold, HOST, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Closes what it holds: the client's conversation ends with a broken connection."""
        if self._server is not None:
            self._server.close()
        for writer in self._held:
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()


async def test_a_server_that_never_answers_holds_back_no_other_shard(
    router: ShardRouter, kafka_settings: KafkaSettings, stack: Stack
) -> None:
    tarpit = _Tarpit()
    first, second = router.shard_map.shards[:2]
    try:
        slow_store, slow = await _queued(router, stack, await tarpit.start(), "flightlog", shard=first)
        store, fine = await _queued(router, stack, stack.settings.submission_port, "flightlog", shard=second)
        async with running_sender(router, kafka_settings, stack, sender_smtp_timeout_s=300):
            try:
                await _settled(store, fine, OutboxState.SUBMITTED)
                # meanwhile the first shard's conversation still waits for its greeting
                held = await slow_store.row(slow.account_id, slow.message_key)
                assert held is not None and (held.state, held.attempts) == (OutboxState.PENDING, 0), held
            finally:
                await tarpit.close()  # the held conversation breaks, so the sender can stop
            await eventually(
                lambda: _attempted(slow_store, slow), SETTLED_WITHIN_S, "the held message deferred"
            )
    finally:
        await tarpit.close()


async def _attempted(store: OutboxStore, request: SendRequest) -> bool:
    row = await store.row(request.account_id, request.message_key)
    return row is not None and row.attempts == 1


async def test_a_sent_message_is_submitted_once_with_its_queue_id(
    router: ShardRouter, kafka_settings: KafkaSettings, stack: Stack
) -> None:
    store, request = await _queued(router, stack, stack.settings.submission_port, "flightlog")
    # The password in the store is the Dovecot user's, as the SMTP login.
    async with running_sender(router, kafka_settings, stack), running_sender(router, kafka_settings, stack):
        row = await _settled(store, request, OutboxState.SUBMITTED)
    assert row.queue_id, row
    copy = f"<{request.message_id}>"

    def copies() -> int:
        return _message_ids(stack, request.sender.email).count(copy)

    await eventually(lambda: copies() > 0, SETTLED_WITHIN_S, "the message in the INBOX")
    assert copies() == 1  # two senders, one submission


def _message_ids(stack: Stack, address: str) -> list[str]:
    path = stack.dovecot.dir / "mail" / DOMAIN / address.split("@", 1)[0] / "Maildir"
    if not path.is_dir():
        return []
    box = mailbox.Maildir(path, create=False)
    return [str(BytesHeaderParser().parsebytes(box.get_bytes(k)).get("Message-ID")) for k in box.keys()]
