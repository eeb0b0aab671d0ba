"""The sync of a Gmail account (X-GM-EXT-1) against protocol transcripts replayed over a real
socket (:mod:`tests.imap_replay`): no Gmail server can run here. The transcripts
(``tests/transcripts/gmail-*.imap``) were written from Gmail's published "IMAP Extensions"
document (the greeting, CAPABILITY, LIST with special-use attributes, and the X-GM-MSGID,
X-GM-THRID and X-GM-LABELS responses) and RFC 3501/7162 for the rest; the sync's events go
through the stack's real Kafka and its state through the real MariaDB.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer

from libs.accounts import create_application
from libs.imap_accounts import SyncStore
from libs.shards import ShardRouter
from services.gateway.content import imap_source
from services.gateway.imap_accounts import NewImapAccount, create_imap_account
from services.ingest.imap.settings import ImapSettings
from services.ingest.imap.sync import AccountSync, gmail_key
from tests.imap_replay import ReplayServer, Transcript, load_transcript
from tests.integration.test_imap_sync import (  # the fixtures too: pytest finds them here
    InflightTap,
    imap_settings,
    producer,
    running,
    store,
    tap,
)
from tests.polling import eventually
from tests.scratch import app_name

pytestmark = pytest.mark.timeout(120)
__all__ = ["imap_settings", "producer", "store", "tap"]

USER = "someone@gmail.com"
PASSWORD = "app-password"
A, B, C, D, E = (1278455344230334865 + n for n in (0, 1, 2, 3, 4))
THREAD = 1266894439832287888


def _message(name: str, subject: str, extra: str = "") -> bytes:
    return (
        f"From: Ann <ann@example.com>\r\nTo: {USER}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{name}@example.com>\r\n{extra}Date: Mon, 16 Nov 2026 10:00:00 +0000\r\n\r\n"
        f"Body of {name}.\r\n"
    ).encode()


MESSAGES = {
    "a": _message("a", "Lunch?"),
    "b": _message("b", "Re: Lunch?", "In-Reply-To: <a@example.com>\r\n"),
    "c": _message("c", "Lunch, important"),
    "d": _message("d", "New mail"),
    "e": _message("e", "After the reset"),
}


def transcript(name: str) -> Transcript:
    sizes = {f"size_{k}": str(len(v)) for k, v in MESSAGES.items()}
    return load_transcript(name, user=USER, password=PASSWORD, **sizes)


def session(*parts: str) -> Transcript:
    """One connection: the transcripts ``parts`` played one after the other."""
    loaded = [transcript(p) for p in parts]
    return Transcript("+".join(parts), tuple(step for t in loaded for step in t.steps))


@contextlib.asynccontextmanager
async def gmail(*sessions: Transcript) -> AsyncIterator[ReplayServer]:
    async with ReplayServer(list(sessions), dict(MESSAGES)) as server:
        yield server
    assert not server.mismatches, server.mismatches


@pytest.fixture
def settings(imap_settings: ImapSettings) -> ImapSettings:
    # no periodic poll while a transcript waits in IDLE: every command is in the transcript
    return imap_settings.model_copy(update={"imap_poll_interval_s": 600.0})


async def gmail_account(
    router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer, settings: ImapSettings, port: int
) -> tuple[int, ImapSettings]:
    allowed = settings.model_copy(update={"imap_allowed_ports": (port,)})
    app, _ = await create_application(router, app_name("gmail"))
    body = NewImapAccount(
        email=USER, host="127.0.0.1", port=port, tls_mode="none", username=USER, password=PASSWORD
    )
    created = await create_imap_account(router, store, producer, allowed, app.id, body)
    return int(created["id"]), allowed


def by_key(events: list[dict[str, object]]) -> dict[object, dict[str, object]]:
    return {e["message_key"]: e for e in events}


async def test_initial_sync_labels_threads_and_new_mail(
    router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer, settings: ImapSettings,
    tap: InflightTap,
) -> None:  # fmt: skip
    one = session("gmail-login", "gmail-initial-sync", "gmail-push-and-labels")
    async with gmail(one) as server:
        account_id, settings = await gmail_account(router, store, producer, settings, server.port)
        got = tap.watch(account_id)
        async with running(AccountSync(account_id, store, producer, settings)):
            await eventually(lambda: len(got.of("message.synced")) == 4, 60, "a, b, c and d synced")
            await eventually(lambda: len(got.of("message.updated")) == 1, 60, "a's label change")
            await eventually(lambda: server.played == [one.name], 30, "the whole transcript")
        (folder,) = await store.folders(account_id)
        synced = by_key(got.of("message.synced"))
        # one message per X-GM-MSGID, whatever its labels: never a copy per label or folder
        assert set(synced) == {gmail_key(folder.id, m) for m in (A, B, C, D)}
        a, b, c, d = (synced[gmail_key(folder.id, m)] for m in (A, B, C, D))
        assert base64.b64decode(a["content"]["raw_mime"]) == MESSAGES["a"]  # type: ignore[index]
        assert a["flags"] == {"unread": False, "starred": False, "labels": ["\\Inbox", "Work"]}
        assert c["flags"] == {
            "unread": True, "starred": True, "labels": ["\\Inbox", "\\Important", "Muy Importante", "Été"]
        }  # fmt: skip
        # the thread from X-GM-THRID, the same for the three messages Gmail put in one thread
        assert {e["content"]["thread_key"] for e in (a, b, c)} == {f"gm:{THREAD}"}  # type: ignore[index]
        assert d["content"]["thread_key"] == f"gm:{D}"  # type: ignore[index]
        assert b["direction"] == "outbound" and a["direction"] == "inbound"  # \Sent is outbound
        (updated,) = got.of("message.updated")
        assert updated["message_key"] == gmail_key(folder.id, A)
        assert updated["flags"] == {"unread": False, "starred": False, "labels": ["\\Inbox", "Receipts"]}
        assert folder.name == "[Gmail]/All Mail"  # INBOX, Work, Sent Mail, ... are labels, not synced
        # the gateway finds where to read a message's content from its key and the UID map
        source = await imap_source(store, account_id, gmail_key(folder.id, A))
        assert source is not None and (source.folder, source.uid) == ("[Gmail]/All Mail", 2)


async def test_uidvalidity_change_maps_uids_back_by_message_id(
    router: ShardRouter, store: SyncStore, producer: AIOKafkaProducer, settings: ImapSettings,
    tap: InflightTap,
) -> None:  # fmt: skip
    first = session("gmail-login", "gmail-initial-sync")
    second = session("gmail-login", "gmail-uidvalidity")
    async with gmail(first, second) as server:
        account_id, settings = await gmail_account(router, store, producer, settings, server.port)
        got = tap.watch(account_id)
        sync = AccountSync(account_id, store, producer, settings)
        async with running(sync):
            await asyncio.wait_for(sync.synced_once.wait(), 60)
            await eventually(lambda: server.played == [first.name], 30, f"into IDLE {server.mismatches}")
        assert len(got.of("message.synced")) == 3
        async with running(AccountSync(account_id, store, producer, settings)):
            await eventually(lambda: len(got.of("message.synced")) == 4, 60, "e synced")
            await eventually(lambda: len(got.of("message.deleted")) == 2, 60, "b and c deleted")
            await eventually(
                lambda: server.played == [first.name, second.name],
                30,
                f"both transcripts {server.mismatches}",
            )
        await tap.read_up_to_now()
        (folder,) = await store.folders(account_id)
        # a kept its key and its labels: no event for it, and no second synced event
        synced = [e["message_key"] for e in got.of("message.synced")]
        assert sorted(synced) == sorted(gmail_key(folder.id, m) for m in (A, B, C, E))
        assert {e["message_key"] for e in got.of("message.deleted")} == {
            gmail_key(folder.id, B),
            gmail_key(folder.id, C),
        }
        assert not got.of("message.updated")
        uids = await store.uids(account_id, folder.id)
        assert {u: e.message_key for u, e in uids.items()} == {
            10: gmail_key(folder.id, A),
            11: gmail_key(folder.id, E),
        }
