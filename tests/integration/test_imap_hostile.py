"""The IMAP client and sync against a hostile server: a small IMAP server in this file, on a real
socket on 127.0.0.1, that speaks just enough IMAP4rev1 with QRESYNC for one mailbox and can be
told to misbehave (Dovecot cannot be made to). Each test fails if its cap is removed: the
client would wait for the bytes (a command timeout, not ResponseTooLarge), accept the response,
or try to build a list of 4,294,967,295 UIDs."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

import prometheus_client
import pytest
from aiokafka import AIOKafkaProducer

from libs.accounts import create_account, create_application
from libs.config import KafkaSettings
from libs.crypto import SecretBox
from libs.imap.client import DEFAULT_MAX_RESPONSE_BYTES, ImapConnection, ResponseTooLarge
from libs.imap_accounts import SyncStore
from libs.kafka import make_producer
from libs.mime import MAX_RAW_BYTES
from libs.shards import ShardRouter
from services.ingest.imap.settings import ImapSettings
from services.ingest.imap.sync import AccountSync
from tests.scratch import app_name

pytestmark = pytest.mark.timeout(120)

CAPS: Final = b"IMAP4rev1 IDLE CONDSTORE QRESYNC ENABLE"
UIDVALIDITY: Final = 7
MiB: Final = 1024 * 1024


def message(uid: int) -> bytes:
    return (
        f"From: a@example.org\r\nTo: b@example.org\r\nSubject: hostile {uid}\r\n"
        f"Message-ID: <hostile-{uid}-{uuid.uuid4().hex}@example.org>\r\n\r\nbody {uid}\r\n"
    ).encode()


Reply = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


class HostileImap:
    """One mailbox (INBOX) with ``messages``; ``on_fetch`` / ``on_search`` replace the answer to
    UID FETCH / UID SEARCH. The first IDLE expunges everything and pushes
    ``* VANISHED 1:4294967295``; later QRESYNC SELECTs report it as ``VANISHED (EARLIER)``."""

    def __init__(self, messages: int = 3) -> None:
        self.messages = {uid: message(uid) for uid in range(1, messages + 1)}
        self.modseq = 5
        self.vanished_all = False
        self.on_fetch: Reply | None = None
        self.on_search: Reply | None = None
        self.client_closed = asyncio.Event()
        self.idle_after_vanish = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> HostileImap:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"* OK [CAPABILITY " + CAPS + b"] hostile ready\r\n")
            while line := await reader.readline():
                tag, _, command = line.rstrip(b"\r\n").partition(b" ")
                if not await self._answer(tag, command, reader, writer):
                    break
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.client_closed.set()
            writer.close()

    async def _answer(
        self, tag: bytes, command: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        verb = command.split(b" ", 1)[0].upper()
        ok = tag + b" OK done\r\n"
        if verb == b"CAPABILITY":
            writer.write(b"* CAPABILITY " + CAPS + b"\r\n" + ok)
        elif verb in (b"LOGIN", b"NOOP"):
            writer.write(ok)
        elif verb == b"ENABLE":
            writer.write(b"* ENABLED QRESYNC\r\n" + ok)
        elif verb == b"LIST":
            writer.write(b'* LIST () "/" INBOX\r\n' + ok)
        elif verb == b"STATUS":
            writer.write(b"* STATUS INBOX (" + self._status() + b")\r\n" + ok)
        elif verb == b"SELECT":
            writer.write(
                b"* %d EXISTS\r\n* OK [UIDVALIDITY %d] ok\r\n* OK [UIDNEXT 4] ok\r\n"
                b"* OK [HIGHESTMODSEQ %d] ok\r\n" % (len(self.messages), UIDVALIDITY, self.modseq)
            )
            if b"QRESYNC" in command and self.vanished_all:
                writer.write(b"* VANISHED (EARLIER) 1:4294967295\r\n")
            writer.write(tag + b" OK [READ-WRITE] done\r\n")
        elif command.upper().startswith(b"UID SEARCH"):
            if self.on_search is not None:
                await self.on_search(tag, writer)
            else:
                writer.write(b"* SEARCH " + b" ".join(b"%d" % u for u in self.messages) + b"\r\n" + ok)
        elif command.upper().startswith(b"UID FETCH"):
            if self.on_fetch is not None:
                await self.on_fetch(tag, writer)
            else:
                self._fetch(command, writer)
                writer.write(ok)
        elif verb == b"IDLE":
            writer.write(b"+ idling\r\n")
            if self.vanished_all:
                self.idle_after_vanish.set()
            else:
                self.messages.clear()
                self.vanished_all, self.modseq = True, self.modseq + 1
                writer.write(b"* VANISHED 1:4294967295\r\n")
            await writer.drain()
            if not await reader.readline():  # DONE
                return False
            writer.write(ok)
        elif verb == b"LOGOUT":
            writer.write(b"* BYE\r\n" + ok)
            return False
        else:
            writer.write(tag + b" BAD unknown command\r\n")
        return True

    def _status(self) -> bytes:
        return b"UIDVALIDITY %d UIDNEXT 4 HIGHESTMODSEQ %d" % (UIDVALIDITY, self.modseq)

    def _fetch(self, command: bytes, writer: asyncio.StreamWriter) -> None:
        uid_set = command.split(b" ")[2]
        wanted: set[int] = set()
        for part in uid_set.split(b","):
            lo, _, hi = part.partition(b":")
            wanted.update(range(int(lo), int(hi or lo) + 1))
        for seq, (uid, raw) in enumerate(sorted(self.messages.items()), start=1):
            if uid not in wanted:
                continue
            head = b"* %d FETCH (UID %d FLAGS () MODSEQ (%d)" % (seq, uid, self.modseq)
            if b"RFC822.SIZE" in command:
                head += b" RFC822.SIZE %d" % len(raw)
            if re.search(rb"BODY\.PEEK\[\]", command):
                writer.write(
                    head + b' INTERNALDATE "01-Jan-2026 00:00:00 +0000" BODY[]<0> {%d}\r\n' % len(raw)
                )
                writer.write(raw + b")\r\n")
            else:
                writer.write(head + b")\r\n")


@contextlib.asynccontextmanager
async def connected(
    server: HostileImap, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
) -> AsyncIterator[ImapConnection]:
    conn = ImapConnection(
        "127.0.0.1",
        server.port,
        "none",
        timeout_s=30,
        max_response_bytes=max_response_bytes,
        allow_private=True,
    )
    await conn.connect("hostile", "secret")
    try:
        await conn.select("INBOX")
        yield conn
    finally:
        await conn.close()


async def test_a_literal_larger_than_asked_for_drops_the_connection() -> None:
    async def huge_literal(tag: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* 1 FETCH (UID 1 BODY[]<0> {4294967295}\r\n" + b"x" * 65536)

    async with HostileImap() as server, connected(server) as conn:
        server.on_fetch = huge_literal
        with pytest.raises(ResponseTooLarge, match=f"literal of 4294967295 bytes; at most {MAX_RAW_BYTES} "):
            await conn.uid_fetch("1", f"(UID BODY.PEEK[]<0.{MAX_RAW_BYTES}>)")
        await server.client_closed.wait()  # dropped, not read on
        with pytest.raises(ResponseTooLarge):
            await conn.imap.noop()


async def test_a_response_beyond_its_cap_drops_the_connection() -> None:
    """Literals each within the per-message cap, four of them beyond the fetch's byte cap."""

    async def too_much(tag: bytes, writer: asyncio.StreamWriter) -> None:
        for uid in range(1, 5):
            writer.write(b"* %d FETCH (UID %d BODY[]<0> {%d}\r\n" % (uid, uid, MAX_RAW_BYTES))
            writer.write(b"x" * MAX_RAW_BYTES + b")\r\n")
        writer.write(tag + b" OK done\r\n")  # well formed: only the size is wrong

    async with HostileImap() as server, connected(server) as conn:
        server.on_fetch = too_much
        with pytest.raises(ResponseTooLarge, match=f"more than {MiB} bytes"):
            await conn.uid_fetch("1:4", f"(UID BODY.PEEK[]<0.{MAX_RAW_BYTES}>)", max_response_bytes=MiB)
        await server.client_closed.wait()


async def test_a_line_without_end_drops_the_connection() -> None:
    async def endless(tag: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* SEARCH " + b"1 " * MiB)  # 2 MiB and no CRLF

    async with HostileImap() as server, connected(server, max_response_bytes=MiB) as conn:
        server.on_search = endless
        with pytest.raises(ResponseTooLarge, match=f"more than {MiB} bytes"):
            await conn.uid_list()
        await server.client_closed.wait()


@pytest.fixture
async def producer(kafka_settings: KafkaSettings, topics: None) -> AsyncIterator[AIOKafkaProducer]:
    async with make_producer(kafka_settings) as p:
        yield p


def deleted_events() -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "flightlog_imap_events_total", {"type": "message.deleted"}
    )
    return value or 0.0


async def test_vanished_of_the_whole_uid_space_is_clamped_to_the_uids_held(
    router: ShardRouter, producer: AIOKafkaProducer
) -> None:
    """After an initial sync of 3 messages, the server pushes ``VANISHED 1:4294967295`` and then
    reports it on the QRESYNC SELECT: the sync deletes the 3 UIDs it holds, and nothing else."""
    store = SyncStore(router, SecretBox.from_settings())
    settings = ImapSettings(
        imap_poll_interval_s=3600.0,
        imap_backoff_base_s=0.2,
        imap_backoff_max_s=1.0,
        imap_allow_private_hosts=True,
    )
    async with HostileImap(messages=3) as server:
        app, _ = await create_application(router, app_name("hostile"))
        account = await create_account(
            router, app.id, f"h{uuid.uuid4().hex[:8]}@example.org", provider="imap"
        )
        await store.insert_account(account.id, app.id, "127.0.0.1", server.port, "none", "hostile", "secret")
        deleted_before = deleted_events()
        sync = AccountSync(account.id, store, producer, settings)
        task = asyncio.create_task(sync.run())
        try:
            await asyncio.wait_for(sync.synced_once.wait(), 60)
            (inbox,) = await store.folders(account.id)
            assert await store.uid_stats(account.id, inbox.id) == (3, 3)
            # the push, the QRESYNC SELECT with the huge set, then IDLE again: the sync is done
            await asyncio.wait_for(server.idle_after_vanish.wait(), 60)
            assert sync.state == "running"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert await store.uid_stats(account.id, inbox.id) == (0, 0)
        assert deleted_events() - deleted_before == 3
        (inbox,) = await store.folders(account.id)
        assert inbox.message_count == 0 and inbox.highestmodseq == 6
