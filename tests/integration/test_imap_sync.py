"""IMAP sync against real Dovecot servers: one with CONDSTORE/QRESYNC (port 1143) and one without
(1144, the UID-list fallback). Events are read back from ``flightlog.inflight`` (read_committed)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import aioimaplib
import orjson
import prometheus_client
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.utils import floatToGoString

from cli.mailbox_gen import DOMAIN, fill_maildir, live_message
from cli.stack import IMAP_TEST_PASSWORD, Dovecot, Stack
from libs.accounts import create_application
from libs.config import KafkaSettings
from libs.crypto import SecretBox
from libs.imap.client import Imap4, ImapConnection, ImapError
from libs.imap_accounts import SyncStore
from libs.kafka import INFLIGHT, create_topics, make_consumer, make_producer
from libs.mime import parse_message
from libs.shards import ShardRouter
from services.gateway.imap_accounts import (
    NewImapAccount,
    create_imap_account,
    disconnect_imap_account,
    imap_account_view,
    update_imap_credentials,
)
from services.ingest.imap.distribution import AccountDistributor, accounts_topic_spec
from services.ingest.imap.settings import ImapSettings
from services.ingest.imap.sync import AccountSync
from tests.polling import eventually
from tests.scratch import app_name, dovecot_user, group_name, topic_name

pytestmark = pytest.mark.timeout(600)


def doveadm(server: Dovecot, *args: str) -> None:
    subprocess.run(["doveadm", "-c", str(server.conf), *args], check=True, capture_output=True)


@dataclass
class Collected:
    events: list[dict[str, Any]] = field(default_factory=list)

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type_]


class InflightTap:
    """Reads ``flightlog.inflight`` from its end at creation, keeping the events of some accounts."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.consumer: AIOKafkaConsumer = make_consumer(kafka, group_id=None, fetch_max_wait_ms=20)
        self.by_account: dict[str, Collected] = {}
        self._task: asyncio.Task[None] | None = None
        self._parts: list[TopicPartition] = []

    async def start(self) -> None:
        await self.consumer.start()
        parts = [TopicPartition(INFLIGHT, p) for p in self.consumer.partitions_for_topic(INFLIGHT) or ()]
        if not parts:
            await self.consumer._client.force_metadata_update()
            parts = [TopicPartition(INFLIGHT, p) for p in self.consumer.partitions_for_topic(INFLIGHT) or ()]
        self.consumer.assign(parts)
        self._parts = parts
        await self.consumer.seek_to_end(*parts)
        for tp in parts:
            await self.consumer.position(tp)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for r in records:
                    event = orjson.loads(r.value)
                    got = self.by_account.get(event["account_id"])
                    if got is not None:
                        got.events.append(event)

    async def read_up_to_now(self) -> None:
        """Wait until the tap has read every record committed to the topic so far."""
        ends = await self.consumer.end_offsets(self._parts)
        for tp, end in ends.items():
            deadline = time.monotonic() + 30
            while await self.consumer.position(tp) < end:
                assert time.monotonic() < deadline, f"the tap stopped short of {tp} offset {end}"
                await asyncio.sleep(0.05)

    def watch(self, account_id: int) -> Collected:
        return self.by_account.setdefault(str(account_id), Collected())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()


@pytest.fixture(params=["condstore", "plain"])
def server(request: pytest.FixtureRequest, stack: Stack) -> Dovecot:
    s: Dovecot = stack.dovecot if request.param == "condstore" else stack.dovecot_plain
    s.up()
    return s


@pytest.fixture
async def tap(kafka_settings: KafkaSettings, topics: None) -> AsyncIterator[InflightTap]:
    t = InflightTap(kafka_settings)
    await t.start()
    yield t
    await t.stop()


@pytest.fixture
async def producer(kafka_settings: KafkaSettings) -> AsyncIterator[AIOKafkaProducer]:
    async with make_producer(kafka_settings) as p:
        yield p


@pytest.fixture
async def imap_settings(kafka_settings: KafkaSettings, topics: None) -> ImapSettings:
    settings = ImapSettings(
        imap_accounts_topic=topic_name("imap-accounts"),
        imap_consumer_group=group_name("imap"),
        imap_poll_interval_s=1.0,
        imap_batch_size=250,
        imap_backoff_base_s=0.2,
        imap_backoff_max_s=1.0,
        imap_allow_private_hosts=True,  # the test servers are on loopback
    )
    await create_topics(kafka_settings, (accounts_topic_spec(settings),))
    return settings


@pytest.fixture
def store(router: ShardRouter) -> SyncStore:
    return SyncStore(router, SecretBox.from_settings())


async def new_account(
    router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer, settings: ImapSettings,
    server: Dovecot, user: str, password: str = IMAP_TEST_PASSWORD,
    tls_mode: Literal["implicit", "starttls", "none"] = "none",
) -> int:  # fmt: skip
    app, _ = await create_application(router, app_name("imap"))
    port = server.imaps_port if tls_mode == "implicit" else server.port
    assert port is not None, "this Dovecot serves no implicit TLS"
    body = NewImapAccount(
        email=f"{user}@{DOMAIN}", host="127.0.0.1", port=port, tls_mode=tls_mode,
        username=f"{user}@{DOMAIN}", password=password,
    )  # fmt: skip
    created = await create_imap_account(router, store, producer, settings, app.id, body)
    return int(created["id"])


def new_mailbox(server: Dovecot, messages: int, prefix: str = "u") -> str:
    """A fresh Dovecot user (its local part) with ``messages`` generated messages in INBOX."""
    user = dovecot_user(prefix)
    server.add_user(f"{user}@{DOMAIN}")
    fill_maildir(server, user, messages)
    return user


@contextlib.asynccontextmanager
async def imap_client(server: Dovecot, user: str) -> AsyncIterator[aioimaplib.IMAP4]:
    client = Imap4("127.0.0.1", server.port, timeout=30)
    await client.wait_hello_from_server()
    assert (await client.login(f"{user}@{DOMAIN}", IMAP_TEST_PASSWORD)).result == "OK"
    try:
        yield client
    finally:
        await client.logout()


@contextlib.asynccontextmanager
async def running(sync: AccountSync) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(sync.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


N_MESSAGES = int(os.environ.get("FLIGHTLOG_TEST_IMAP_MESSAGES", "2000"))


def polled_unchanged() -> float:
    """Folders the periodic poll found unchanged by STATUS, in this process (every sync here)."""
    value = prometheus_client.REGISTRY.get_sample_value(
        "flightlog_imap_polled_folders_total", {"outcome": "unchanged"}
    )
    return value or 0.0


async def test_sync_cycle(
    server: Dovecot, router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer,
    imap_settings: ImapSettings, tap: InflightTap,
) -> None:  # fmt: skip
    user = new_mailbox(server, N_MESSAGES)
    fill_maildir(server, user, 5, folder="Projects")
    account_id = await new_account(router, store, producer, imap_settings, server, user)
    got = tap.watch(account_id)
    expected = N_MESSAGES + 5

    skipped_before = polled_unchanged()
    # initial sync, interrupted once: it resumes where it stopped and duplicates nothing
    async with running(AccountSync(account_id, store, producer, imap_settings)):
        await eventually(
            lambda: len(got.of("message.synced")) >= min(600, expected // 3), 120, "the first batches"
        )
    sync = AccountSync(account_id, store, producer, imap_settings)
    async with running(sync):
        await eventually(lambda: len(got.of("message.synced")) >= expected, 300, f"{expected} synced events")
        await asyncio.wait_for(sync.synced_once.wait(), 60)
        synced = got.of("message.synced")
        keys = [e["message_key"] for e in synced]
        assert len(keys) == len(set(keys)) == expected, "a message was synced twice or missed"
        # every raw message parses, broken ones included
        warned = 0
        for e in synced:
            raw = base64.b64decode(e["content"]["raw_mime"])
            parsed = parse_message(raw)
            warned += bool(parsed.parse_warnings)
        assert warned >= N_MESSAGES // 6

        # new mail, one message at a time: each one is synced, once (how soon is a figure of
        # `flightlog bench`'s IMAP stage, not a test)
        async with imap_client(server, user) as client:
            for j in range(5):
                n_before = len(got.of("message.synced"))
                live = live_message(f"live-{j}-{user}", user)
                assert (await client.append(live, mailbox="INBOX")).result == "OK"
                await eventually(lambda: len(got.of("message.synced")) > n_before, 60, "new mail")  # noqa: B023
                assert len(got.of("message.synced")) == n_before + 1

            # flag change and expunge on INBOX
            await client.select("INBOX")
            live_key = got.of("message.synced")[-1]["message_key"]
            await client.uid("store", "1:*", "+FLAGS.SILENT (\\Flagged)")

            def live_starred() -> bool:
                return any(
                    e["message_key"] == live_key and e["flags"].get("starred")
                    for e in got.of("message.updated")
                )

            await eventually(live_starred, 45, "flag update")
            # every INBOX message gets the flag (a push may come while the STORE is still running)
            await eventually(lambda: len(got.of("message.updated")) >= N_MESSAGES, 45, "every flag update")
            n_del = len(got.of("message.deleted"))
            await client.uid("store", "1:10", "+FLAGS.SILENT (\\Deleted)")
            await client.expunge()
            await eventually(lambda: len(got.of("message.deleted")) >= n_del + 10, 45, "10 delete events")

        # folder rename: the messages keep their keys and get the new folder; nothing synced again
        n_synced = len(got.of("message.synced"))
        doveadm(server, "mailbox", "rename", "-u", f"{user}@{DOMAIN}", "Projects", "Clients")
        await eventually(
            lambda: sum(e["flags"].get("folder") == "Clients" for e in got.of("message.updated")) >= 5,
            60, "rename updates",
        )  # fmt: skip
        folders = await store.folders_public(account_id)
        assert "Clients" in {f["name"] for f in folders} and "Projects" not in {f["name"] for f in folders}

        # UIDVALIDITY reset: the folder is resynced, nothing duplicated, nothing deleted
        n_del = len(got.of("message.deleted"))
        old = next(f for f in folders if f["name"] == "Clients")["uidvalidity"]
        doveadm(
            server,
            "mailbox",
            "update",
            "-u",
            f"{user}@{DOMAIN}",
            "--uid-validity",
            str(old + 1000),
            "Clients",
        )

        async def reset_seen() -> bool:
            fs = await store.folders_public(account_id)
            return bool(next(f for f in fs if f["name"] == "Clients")["uidvalidity"] == old + 1000)

        deadline = time.monotonic() + 60  # polled folder; slow when the machine is busy
        while not await reset_seen():
            assert time.monotonic() < deadline, "UIDVALIDITY reset not picked up"
            await asyncio.sleep(0.2)
        # a marker filed after the reset: once it is synced, the resync of the folder is behind it
        async with imap_client(server, user) as client:
            marker = live_message(f"marker-{user}", user)
            assert (await client.append(marker, mailbox="Clients")).result == "OK"
        await eventually(lambda: len(got.of("message.synced")) > n_synced, 60, "the marker in Clients")
        await tap.read_up_to_now()
        assert [e["message_key"] for e in got.of("message.synced")[n_synced:]] == [
            got.of("message.synced")[-1]["message_key"]
        ], "the UIDVALIDITY reset synced messages again"
        assert len(got.of("message.deleted")) == n_del
        n_synced += 1

        # a polled folder: a flag change and new mail move its STATUS, so the poll syncs it
        n_updated = len(got.of("message.updated"))
        async with imap_client(server, user) as client:
            await client.select("Clients")
            await client.uid("store", "1:*", "+FLAGS.SILENT (\\Flagged)")
            filed = live_message(f"filed-{user}", user)
            assert (await client.append(filed, mailbox="Clients")).result == "OK"
        await eventually(lambda: len(got.of("message.synced")) == n_synced + 1, 60, "new mail in Clients")
        await eventually(
            lambda: sum(bool(e["flags"].get("starred")) for e in got.of("message.updated")[n_updated:]) >= 5,
            60, "flag updates in Clients",
        )  # fmt: skip

        async def running_state() -> bool:
            view = await imap_account_view(store, account_id)
            return view is not None and view["state"] == "running"

        # an account in "error" is not syncing: it must be back to "running" (after Dovecot drops
        # the session on the UIDVALIDITY change, the sync reconnects)
        deadline = time.monotonic() + 60
        while not await running_state():
            assert time.monotonic() < deadline, f"account state {await imap_account_view(store, account_id)}"
            await asyncio.sleep(0.2)
    # with CONDSTORE the 1 s polls skipped unchanged folders after one STATUS each
    assert (polled_unchanged() > skipped_before) == (server.capability is None)
    view = await imap_account_view(store, account_id)
    assert view is not None and "password" not in view and view["state"] == "running"
    inbox_view = next(f for f in view["folders"] if f["name"] == "INBOX")
    assert inbox_view["state"] == "synced" and inbox_view["message_count"] == N_MESSAGES + 5 - 10


async def test_server_hangup_fails_pending_commands_at_once(server: Dovecot) -> None:
    """A server that drops the session (Dovecot does after a UIDVALIDITY change) must fail the
    pending IDLE now, not after the command timeout: the sync reconnects at once."""
    user = new_mailbox(server, 1)
    conn = ImapConnection("127.0.0.1", server.port, "none", timeout_s=120, allow_private=True)
    await conn.connect(f"{user}@{DOMAIN}", IMAP_TEST_PASSWORD)
    try:
        await conn.select("INBOX")
        idle = await conn.imap.idle_start(timeout=120)
        doveadm(server, "kick", f"{user}@{DOMAIN}")
        # the deadlines are far below the command timeout (120 s): the IDLE failed from the hangup
        pushed = [await asyncio.wait_for(conn.imap.wait_server_push(timeout=120), 10)]
        while pushed[-1] != aioimaplib.STOP_WAIT_SERVER_PUSH:  # the server's BYE comes first
            pushed.append(await asyncio.wait_for(conn.imap.wait_server_push(timeout=120), 10))
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(idle, 10)
        with pytest.raises(ConnectionResetError):
            await conn.imap.noop()
    finally:
        await conn.close()


@pytest.mark.parametrize("tls_mode", ["starttls", "implicit"])
async def test_tls_modes_verify_the_server_certificate(stack: Stack, tls_mode: str) -> None:
    server = stack.dovecot
    assert server.imaps_port is not None
    port = server.port if tls_mode == "starttls" else server.imaps_port
    user = new_mailbox(server, 2, "tls")
    conn = ImapConnection(
        "127.0.0.1", port, tls_mode, timeout_s=30, ca_file=str(server.tls_cert), allow_private=True
    )
    await conn.connect(f"{user}@{DOMAIN}", IMAP_TEST_PASSWORD)
    try:
        assert conn.imap.protocol.transport.get_extra_info("ssl_object") is not None
        assert (await conn.select("INBOX")).exists >= 2
        assert conn.condstore  # capabilities were asked again after the upgrade
    finally:
        await conn.close()
    # without the stack's certificate the self-signed server is refused, never used in clear
    untrusted = ImapConnection("127.0.0.1", port, tls_mode, timeout_s=30, allow_private=True)
    with pytest.raises(ImapError, match="CERTIFICATE_VERIFY_FAILED"):
        await untrusted.connect(f"{user}@{DOMAIN}", IMAP_TEST_PASSWORD)


@pytest.mark.parametrize("tls_mode", ["starttls", "implicit"])
async def test_sync_over_tls(
    stack: Stack, router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer,
    imap_settings: ImapSettings, tap: InflightTap, tls_mode: Literal["starttls", "implicit"],
) -> None:  # fmt: skip
    """An account with TLS syncs its mailbox and gets new mail through IDLE over the upgraded
    connection; the CA file comes from the settings, as in a deployment with a private CA."""
    server = stack.dovecot
    user = new_mailbox(server, 20, "tls")
    settings = imap_settings.model_copy(update={"imap_tls_ca_file": str(server.tls_cert)})
    account_id = await new_account(router, store, producer, settings, server, user, tls_mode=tls_mode)
    got = tap.watch(account_id)
    sync = AccountSync(account_id, store, producer, settings)
    async with running(sync):
        await asyncio.wait_for(sync.synced_once.wait(), 60)
        # produced (acks=all) by now, but the tap reads inflight on its own schedule
        await eventually(lambda: len(got.of("message.synced")) >= 20, 20, "20 synced events")
        assert len(got.of("message.synced")) == 20
        async with imap_client(server, user) as client:
            assert (await client.append(live_message(f"tls-{user}", user), mailbox="INBOX")).result == "OK"
        await eventually(lambda: len(got.of("message.synced")) == 21, 20, "new mail over TLS")


async def test_starttls_refused_when_the_server_does_not_offer_it(stack: Stack) -> None:
    conn = ImapConnection("127.0.0.1", stack.dovecot_plain.port, "starttls", timeout_s=30, allow_private=True)
    with pytest.raises(ImapError, match="does not offer STARTTLS"):
        await conn.connect(f"user1@{DOMAIN}", IMAP_TEST_PASSWORD)


async def test_a_duplicate_copy_keeps_the_message_until_its_last_copy_is_expunged(
    stack: Stack, router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer,
    imap_settings: ImapSettings, tap: InflightTap,
) -> None:  # fmt: skip
    """Pushes into a synced folder take the QRESYNC path, which reads only the reported UIDs'
    entries: an expunged copy must still find the other UID holding its message key."""
    server = stack.dovecot
    user = new_mailbox(server, 2)
    account_id = await new_account(router, store, producer, imap_settings, server, user)
    got = tap.watch(account_id)
    sync = AccountSync(account_id, store, producer, imap_settings)
    dup = live_message(f"dup-{user}", user)  # Message-ID <dup-{user}@example.org>
    async with running(sync), imap_client(server, user) as client:
        await asyncio.wait_for(sync.synced_once.wait(), 60)
        for _ in range(2):
            assert (await client.append(dup, mailbox="INBOX")).result == "OK"
        await eventually(lambda: len(got.of("message.synced")) == 4, 30, "both copies synced")
        # the tap reads the topic's partitions in no set order: the copies' events need not be
        # the last two; the key synced twice is theirs (one message, two UIDs)
        keys = [e["message_key"] for e in got.of("message.synced")]
        key = max(keys, key=keys.count)
        assert keys.count(key) == 2 and len(set(keys)) == 3
        await client.select("INBOX")
        found = await client.uid_search(f'HEADER Message-ID "<dup-{user}@example.org>"', charset=None)
        first, second = sorted(int(x) for x in bytes(found.lines[0]).split() if x.isdigit())
        await client.uid("store", str(first), "+FLAGS.SILENT (\\Deleted)")
        await client.expunge()
        # a marker after the expunge: once it is synced, the expunge was handled before it
        n_synced = len(got.of("message.synced"))
        assert (await client.append(live_message(f"marker-{user}", user), mailbox="INBOX")).result == "OK"
        await eventually(lambda: len(got.of("message.synced")) > n_synced, 30, "the marker")
        await tap.read_up_to_now()
        assert [e for e in got.of("message.deleted") if e["message_key"] == key] == []
        await client.uid("store", str(second), "+FLAGS.SILENT (\\Deleted)")
        await client.expunge()
        await eventually(lambda: len(got.of("message.deleted")) == 1, 30, "the last copy's delete")
        assert got.of("message.deleted")[0]["message_key"] == key

        async def inbox_count() -> int:
            view = await imap_account_view(store, account_id)
            assert view is not None
            return int(next(f for f in view["folders"] if f["name"] == "INBOX")["message_count"])

        deadline = time.monotonic() + 30  # the delete is emitted before the folder row is written
        while (count := await inbox_count()) != 2 + 1:  # the first message, the marker
            assert time.monotonic() < deadline, f"INBOX count {count}, not 3"
            await asyncio.sleep(0.2)


async def test_wrong_password_then_fixed(
    server: Dovecot, router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer,
    imap_settings: ImapSettings, tap: InflightTap,
) -> None:  # fmt: skip
    user = new_mailbox(server, 3)
    account_id = await new_account(router, store, producer, imap_settings, server, user, password="wrong")
    got = tap.watch(account_id)
    async with AccountDistributor(KafkaSettings(), imap_settings, store, producer, "a") as dist:
        await eventually(
            lambda: account_id in dist.workers and dist.workers[account_id].task.done(), 30, "auth stop"
        )
        view = await imap_account_view(store, account_id)
        assert view is not None and view["state"] == "auth_failed"
        assert view["last_error"] == "the IMAP server refused the credentials"  # not the server's text
        await update_imap_credentials(
            store, producer, imap_settings, account_id, f"{user}@{DOMAIN}", IMAP_TEST_PASSWORD
        )
        await eventually(lambda: len(got.of("message.synced")) == 3, 30, "sync after new credentials")


async def test_disconnect_stops_the_sync_until_new_credentials(
    server: Dovecot, router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer,
    imap_settings: ImapSettings, tap: InflightTap,
) -> None:  # fmt: skip
    user = new_mailbox(server, 3)
    account_id = await new_account(router, store, producer, imap_settings, server, user)
    got = tap.watch(account_id)
    # another account of the same instance: its new mail is the marker that the instance syncs
    marker_user = new_mailbox(server, 1)
    marker_id = await new_account(router, store, producer, imap_settings, server, marker_user)
    marker = tap.watch(marker_id)
    async with AccountDistributor(KafkaSettings(), imap_settings, store, producer, "a") as dist:
        await eventually(lambda: len(got.of("message.synced")) == 3, 30, "initial sync")
        await eventually(lambda: len(marker.of("message.synced")) == 1, 30, "the other account's sync")
        await disconnect_imap_account(store, producer, imap_settings, account_id)
        await eventually(lambda: account_id not in dist.workers, 30, "the worker to stop")
        view = await imap_account_view(store, account_id)
        assert view is not None and view["state"] == "disconnected"
        row = await store.account(account_id)
        assert row is not None and row.password == ""  # the password is forgotten
        async with imap_client(server, user) as client:  # mail while disconnected waits
            assert (await client.append(live_message(f"later-{user}", user), mailbox="INBOX")).result == "OK"
        async with imap_client(server, marker_user) as client:
            assert (await client.append(live_message(f"m-{marker_user}", marker_user))).result == "OK"
        await eventually(lambda: len(marker.of("message.synced")) == 2, 30, "the other account's new mail")
        await tap.read_up_to_now()
        assert len(got.of("message.synced")) == 3 and account_id not in dist.workers
        await update_imap_credentials(
            store, producer, imap_settings, account_id, f"{user}@{DOMAIN}", IMAP_TEST_PASSWORD
        )
        await eventually(lambda: len(got.of("message.synced")) == 4, 30, "sync after reconnecting")


async def test_accounts_move_between_instances(
    router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer, stack: Stack,
    imap_settings: ImapSettings, tap: InflightTap,
) -> None:  # fmt: skip
    server = stack.dovecot
    users = [dovecot_user("u") for _ in range(8)]
    ids = []
    for u in users:
        server.add_user(f"{u}@{DOMAIN}")
        fill_maildir(server, u, 20)
        ids.append(await new_account(router, store, producer, imap_settings, server, u))
    kafka = KafkaSettings()
    per = {i: tap.watch(i) for i in ids}

    def synced_total() -> int:
        return sum(len(c.of("message.synced")) for c in per.values())

    async def add_mail(round_: int) -> None:
        for u in users:
            async with imap_client(server, u) as client:
                raw = live_message(f"r{round_}-{u}", u)
                assert (await client.append(raw, mailbox="INBOX")).result == "OK"

    a = AccountDistributor(kafka, imap_settings, store, producer, "a")
    b = AccountDistributor(kafka, imap_settings, store, producer, "b")
    await a.start()
    try:
        await eventually(lambda: synced_total() == 8 * 20, 60, "initial sync on instance a")
        await b.start()
        await eventually(
            lambda: len(b.workers) > 0 and len(a.workers) + len(b.workers) == 8, 60, "b takes accounts"
        )
        assert not set(a.workers) & set(b.workers)
        await add_mail(1)
        await eventually(lambda: synced_total() == 8 * 21, 60, "mail after b joined")
        await a.stop()
        await eventually(lambda: len(b.workers) == 8, 60, "b takes every account")
        await add_mail(2)
        await eventually(lambda: synced_total() == 8 * 22, 60, "mail after a left")
    finally:
        await a.stop()
        await b.stop()
    await tap.read_up_to_now()
    for account_id, c in per.items():
        keys = [e["message_key"] for e in c.of("message.synced")]
        assert len(keys) == len(set(keys)) == 22, f"account {account_id}: duplicated or missed"


async def test_body_fetches_are_bounded_in_bytes(
    stack: Stack, router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer,
    imap_settings: ImapSettings, tap: InflightTap,
) -> None:  # fmt: skip
    """20 messages of 150 KiB with a 1 MiB budget: the sync reads RFC822.SIZE first and fetches
    the bodies 6 at a time, so no UID FETCH response exceeds 1 MiB (one of 20 would be 3 MiB)."""
    server = stack.dovecot
    user = new_mailbox(server, 0, "big")
    line = b"x" * 76 + b"\r\n"
    async with imap_client(server, user) as client:
        for i in range(20):
            head = live_message(f"big-{i}-{user}", user).split(b"\r\n\r\n", 1)[0]
            raw = head + b"\r\n\r\n" + line * (150 * 1024 // len(line))
            assert (await client.append(raw, mailbox="INBOX")).result == "OK"
    budget = 1024 * 1024
    settings = imap_settings.model_copy(update={"imap_fetch_batch_bytes": budget})
    account_id = await new_account(router, store, producer, settings, server, user)
    got = tap.watch(account_id)

    def fetches(le: float | None = None) -> float:
        registry = prometheus_client.REGISTRY
        if le is None:
            return registry.get_sample_value("flightlog_imap_fetch_bytes_count") or 0.0
        labels = {"le": floatToGoString(le)}  # type: ignore[no-untyped-call]  # as exposed: "1.048576e+06"
        return registry.get_sample_value("flightlog_imap_fetch_bytes_bucket", labels) or 0.0

    count_before, within_before = fetches(), fetches(float(budget))
    sync = AccountSync(account_id, store, producer, settings)
    async with running(sync):
        await asyncio.wait_for(sync.synced_once.wait(), 60)
        await eventually(lambda: len(got.of("message.synced")) >= 20, 30, "20 synced events")
    assert len({e["message_key"] for e in got.of("message.synced")}) == 20
    count = fetches() - count_before
    assert count >= 4, f"{count} body fetches for 3 MiB of mail with a 1 MiB budget"
    assert fetches(float(budget)) - within_before == count, "a body fetch went past its byte budget"


async def test_a_restart_resyncs_unchanged_folders_without_selecting_them(
    stack: Stack, router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer,
    imap_settings: ImapSettings, tap: InflightTap,
) -> None:  # fmt: skip
    server = stack.dovecot  # CONDSTORE: an unchanged folder is told by its STATUS
    user = new_mailbox(server, 3)
    fill_maildir(server, user, 2, folder="Projects")
    account_id = await new_account(router, store, producer, imap_settings, server, user)
    got = tap.watch(account_id)
    first = AccountSync(account_id, store, producer, imap_settings)
    async with running(first):
        await asyncio.wait_for(first.synced_once.wait(), 60)
    await eventually(lambda: len(got.of("message.synced")) == 5, 30, "5 synced events")
    folders = {f.name: f for f in await store.folders(account_id)}
    unchanged_before = polled_unchanged()
    again = AccountSync(
        account_id, store, producer, imap_settings.model_copy(update={"imap_poll_interval_s": 600})
    )
    async with running(again):
        await asyncio.wait_for(again.synced_once.wait(), 60)
    # the restart's pass found every folder but INBOX (selected for IDLE) unchanged by STATUS, and
    # left them as they were: the same sync state, no event
    assert polled_unchanged() - unchanged_before == len(folders) - 1
    after = {f.name: f for f in await store.folders(account_id)}
    assert after == folders
    await tap.read_up_to_now()
    assert len(got.events) == 5
