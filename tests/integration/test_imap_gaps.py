"""IMAP sync where the network or the server changes under a live account, against the real
Dovecot: a connection cut in the middle of IDLE, a folder recreated (a new UIDVALIDITY) while the
account is synced, and a server whose certificate the account does not trust.

The connection goes through :class:`CutProxy`, a TCP proxy in this file in front of Dovecot's
port: the test can cut it (both sockets closed, as a NAT or a load balancer drops an idle flow)
or hold what the client sends while it changes the mailbox, so the sync cannot see the mailbox
half changed. Events are read back from ``flightlog.inflight`` as in test_imap_sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Literal

import pytest
from aiokafka import AIOKafkaProducer

from cli.mailbox_gen import DOMAIN, live_message
from cli.stack import IMAP_TEST_PASSWORD, Stack
from libs.accounts import create_application
from libs.backoff import Jitter, backoff_s
from libs.config import KafkaSettings
from libs.crypto import SecretBox
from libs.imap_accounts import SyncStore
from libs.kafka import create_topics, make_producer
from libs.shards import ShardRouter
from services.gateway.imap_accounts import NewImapAccount, create_imap_account, imap_account_view
from services.ingest.imap import sync as sync_module
from services.ingest.imap.distribution import accounts_topic_spec
from services.ingest.imap.settings import ImapSettings
from services.ingest.imap.sync import AccountSync, tenant_error
from tests.integration.test_imap_sync import InflightTap, doveadm, imap_client, new_mailbox, running
from tests.polling import eventually
from tests.scratch import app_name, group_name, topic_name

pytestmark = pytest.mark.timeout(180)


class CutProxy:
    """Forwards TCP connections from an ephemeral port on 127.0.0.1 to ``upstream_port``.

    ``idling`` is set while the client waits in IDLE (it sent ``IDLE`` and the server answered
    with a continuation; anything the client sends next ends it). :meth:`cut` closes both sockets
    of every connection; :meth:`hold_while_idle` stops forwarding what the client sends, from a
    moment it is idling (so no command of its is in flight), until :meth:`release`.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.connections = 0
        self.idling = asyncio.Event()
        self._forward = asyncio.Event()
        self._forward.set()
        self._idle_asked = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CutProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        self.release()
        self.cut()
        for task in list(self._handlers):  # 3.11's wait_closed does not wait for them
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def cut(self) -> None:
        self.idling.clear()
        for writer in list(self._writers):
            writer.close()

    async def hold_while_idle(self) -> None:
        while True:
            await self.idling.wait()
            if self.idling.is_set():  # still, now that this task runs: nothing was sent meanwhile
                self._forward.clear()
                return

    def release(self) -> None:
        self._forward.set()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        self._writers.add(client_w)
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            self._writers.discard(client_w)
            self._handlers.discard(task)
            return
        self._writers.add(server_w)
        pumps = [
            asyncio.create_task(self._pump(client_r, server_w, from_client=True)),
            asyncio.create_task(self._pump(server_r, client_w, from_client=False)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            for pump in pumps:
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
            for writer in (client_w, server_w):
                writer.close()
                self._writers.discard(writer)
            self._handlers.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_client: bool
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if from_client:
                    await self._forward.wait()
                    self.idling.clear()
                    self._idle_asked = data.rstrip(b"\r\n").upper().endswith(b" IDLE")
                elif self._idle_asked and (data.startswith(b"+") or b"\r\n+" in data):
                    self._idle_asked = False
                    self.idling.set()
                writer.write(data)
                await writer.drain()


@pytest.fixture
async def producer(kafka_settings: KafkaSettings, topics: None) -> AsyncIterator[AIOKafkaProducer]:
    async with make_producer(kafka_settings) as p:
        yield p


@pytest.fixture
async def tap(kafka_settings: KafkaSettings, topics: None) -> AsyncIterator[InflightTap]:
    t = InflightTap(kafka_settings)
    await t.start()
    yield t
    await t.stop()


@pytest.fixture
async def imap_settings(kafka_settings: KafkaSettings, topics: None) -> ImapSettings:
    settings = ImapSettings(
        imap_accounts_topic=topic_name("imap-accounts"),
        imap_consumer_group=group_name("imap"),
        imap_poll_interval_s=1.0,
        imap_backoff_base_s=0.2,
        imap_backoff_max_s=1.0,
        imap_allow_private_hosts=True,  # the test servers are on loopback
        imap_tls_ca_file=None,
    )
    await create_topics(kafka_settings, (accounts_topic_spec(settings),))
    return settings


@pytest.fixture
def store(router: ShardRouter) -> SyncStore:
    return SyncStore(router, SecretBox.from_settings())


async def new_account(
    router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer, settings: ImapSettings,
    user: str, port: int, tls_mode: Literal["implicit", "none"] = "none",
) -> int:  # fmt: skip
    app, _ = await create_application(router, app_name("imap-gaps"))
    address = f"{user}@{DOMAIN}"
    body = NewImapAccount(
        email=address, host="127.0.0.1", port=port, tls_mode=tls_mode, username=address,
        password=IMAP_TEST_PASSWORD,
    )  # fmt: skip
    return int((await create_imap_account(router, store, producer, settings, app.id, body))["id"])


async def wait_state(store: SyncStore, account_id: int, state: str) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while True:
        view = await imap_account_view(store, account_id)
        assert view is not None
        if view["state"] == state:
            return view
        assert time.monotonic() < deadline, (
            f"account state {view['state']} ({view['last_error']}), not {state}"
        )
        await asyncio.sleep(0.1)


async def test_a_connection_cut_mid_idle_is_reconnected_and_new_mail_synced_once(
    stack: Stack, router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer,
    imap_settings: ImapSettings, tap: InflightTap,
) -> None:  # fmt: skip
    server = stack.dovecot
    user = new_mailbox(server, 3, "cut")
    async with CutProxy(server.port) as proxy:
        account_id = await new_account(router, store, producer, imap_settings, user, proxy.port)
        got = tap.watch(account_id)
        sync = AccountSync(account_id, store, producer, imap_settings)
        async with running(sync) as task:
            await asyncio.wait_for(sync.synced_once.wait(), 60)
            await eventually(lambda: len(got.of("message.synced")) == 3, 30, "the initial sync")
            await asyncio.wait_for(proxy.idling.wait(), 30)
            assert proxy.connections == 1
            proxy.cut()
            async with imap_client(server, user) as client:  # straight to Dovecot: not through the cut
                after_cut = live_message(f"after-cut-{user}", user)
                assert (await client.append(after_cut, mailbox="INBOX")).result == "OK"
            await eventually(
                lambda: len(got.of("message.synced")) == 4, 60, "the mail appended after the cut"
            )
            assert proxy.connections >= 2, "synced without a new connection"
            assert got.of("message.synced")[-1]["flags"]["folder"] == "INBOX"
            # a marker after it: once the marker is synced, a second copy of anything is behind it
            async with imap_client(server, user) as client:
                assert (await client.append(live_message(f"marker-{user}", user))).result == "OK"
            await eventually(lambda: len(got.of("message.synced")) == 5, 60, "the marker")
            await tap.read_up_to_now()
            keys = [e["message_key"] for e in got.of("message.synced")]
            assert len(keys) == len(set(keys)) == 5, "a message was synced twice after the reconnect"
            assert got.of("message.deleted") == []
            await wait_state(store, account_id, "running")
            assert not task.done()


async def test_a_folder_recreated_on_a_live_account_keeps_its_messages_keys(
    stack: Stack, router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer,
    imap_settings: ImapSettings, tap: InflightTap,
) -> None:  # fmt: skip
    """Projects is deleted and created again with the same messages (Dovecot gives it a new
    UIDVALIDITY) while the sync idles on INBOX and polls Projects every second: the folder is
    resynced under its new UIDVALIDITY, each message keeps its key, nothing is synced again or
    deleted, and the session and the account stay up."""
    server = stack.dovecot
    user = new_mailbox(server, 2, "uidv")
    address = f"{user}@{DOMAIN}"
    projects = [live_message(f"project-{n}-{user}", user) for n in range(4)]
    async with imap_client(server, user) as client:
        assert (await client.create("Projects")).result == "OK"
        for raw in projects:
            assert (await client.append(raw, mailbox="Projects")).result == "OK"
    async with CutProxy(server.port) as proxy:
        account_id = await new_account(router, store, producer, imap_settings, user, proxy.port)
        got = tap.watch(account_id)
        sync = AccountSync(account_id, store, producer, imap_settings)
        async with running(sync) as task:
            await asyncio.wait_for(sync.synced_once.wait(), 60)
            await eventually(lambda: len(got.of("message.synced")) == 6, 30, "the initial sync")
            project_keys = {
                e["message_key"] for e in got.of("message.synced") if e["flags"]["folder"] == "Projects"
            }
            assert len(project_keys) == 4
            (before,) = [f for f in await store.folders_public(account_id) if f["name"] == "Projects"]

            await proxy.hold_while_idle()  # no command of the sync's meets the folder half recreated
            try:
                doveadm(server, "mailbox", "delete", "-u", address, "Projects")
                doveadm(server, "mailbox", "create", "-u", address, "Projects")
                async with imap_client(server, user) as client:
                    for raw in projects:
                        assert (await client.append(raw, mailbox="Projects")).result == "OK"
            finally:
                proxy.release()

            async def reset_seen() -> bool:
                fs = [f for f in await store.folders_public(account_id) if f["name"] == "Projects"]
                return len(fs) == 1 and fs[0]["uidvalidity"] != before["uidvalidity"]

            deadline = time.monotonic() + 60
            while not await reset_seen():
                assert time.monotonic() < deadline, "the new UIDVALIDITY of Projects was not picked up"
                await asyncio.sleep(0.1)
            # a marker filed after the reset: once it is synced, the resync of the folder is behind it
            async with imap_client(server, user) as client:
                marker = live_message(f"marker-{user}", user)
                assert (await client.append(marker, mailbox="Projects")).result == "OK"
            await eventually(lambda: len(got.of("message.synced")) > 6, 60, "the marker in Projects")
            await tap.read_up_to_now()
            assert len(got.of("message.synced")) == 7, "the recreated folder's messages were synced again"
            assert got.of("message.synced")[-1]["message_key"] not in project_keys
            assert got.of("message.deleted") == [], "a message of the recreated folder was deleted"
            # the folder's row is written after its events are acknowledged: wait for the marker's
            deadline = time.monotonic() + 30
            while True:
                (after,) = [f for f in await store.folders_public(account_id) if f["name"] == "Projects"]
                if after["message_count"] == 5 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert after["id"] == before["id"], "the folder was replaced, so its messages got new keys"
            assert after["message_count"] == 5
            view = await wait_state(store, account_id, "running")
            assert view["last_error"] is None
            assert proxy.connections == 1, "the session was dropped on the way"
            assert not task.done()


async def test_an_untrusted_certificate_is_an_account_error_retried_with_backoff(
    stack: Stack, router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer,
    imap_settings: ImapSettings, tap: InflightTap, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Dovecot's implicit-TLS port has a self-signed certificate: without the CA the account
    shows the certificate error, its sync keeps running and waits longer after each failure;
    with the CA in the settings the same account syncs."""
    server = stack.dovecot
    assert server.imaps_port is not None
    user = new_mailbox(server, 2, "cert")
    account_id = await new_account(
        router, store, producer, imap_settings, user, server.imaps_port, tls_mode="implicit"
    )
    got = tap.watch(account_id)
    attempts: list[int] = []

    def recorded(attempt: int, base_s: float, max_s: float, *, jitter: Jitter = "none") -> float:
        attempts.append(attempt)
        return backoff_s(attempt, base_s, max_s, jitter=jitter)

    monkeypatch.setattr(sync_module, "backoff_s", recorded)
    untrusted = AccountSync(account_id, store, producer, imap_settings)
    async with running(untrusted) as task:
        await eventually(lambda: len(attempts) >= 3, 60, "three failed connections")
        assert not task.done(), "the sync ended on a certificate error"
        view = await wait_state(store, account_id, "error")
        # generic for the tenant (not a scanner's answer); the certificate error is in the log
        assert view["last_error"] == tenant_error(OSError()), view
        # each retry waits a longer backoff than the one before (up to the cap): no retry storm
        assert attempts[:3] == [1, 2, 3], attempts
        assert untrusted.state == "error" and not untrusted.synced_once.is_set()

    trusted_settings = imap_settings.model_copy(update={"imap_tls_ca_file": str(server.tls_cert)})
    trusted = AccountSync(account_id, store, producer, trusted_settings)
    async with running(trusted):
        await asyncio.wait_for(trusted.synced_once.wait(), 60)
        view = await wait_state(store, account_id, "running")
        assert view["last_error"] is None
        await eventually(lambda: len(got.of("message.synced")) == 2, 30, "the mailbox over TLS")
