"""The sync of one IMAP account: folder list, initial sync newest first in batches (resumable;
each bounded in messages and in bytes, planned from RFC822.SIZE),
incremental sync (QRESYNC, else CONDSTORE, else a UID-list comparison), UIDVALIDITY resets,
and IDLE on INBOX with polling of the other folders.

Every change becomes an event on ``flightlog.inflight``: new mail ``message.synced`` (with the raw
message), flag changes and moves ``message.updated``, expunges ``message.deleted``. The UID map in
``imap_uids`` is written only after Kafka acknowledged the events it covers, so a restart or a
move to another instance re-emits at most the last unacknowledged batch, with the same event ids
(transform drops repeated event ids) and the same message keys (so never a second message).

A message key is ``imap:<folder id>:<identity>``, the identity being the Message-ID (or, without
one, a digest of the header block): it survives UIDVALIDITY resets and folder renames. Two copies
of one message in one folder share the key (one message).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable
from datetime import UTC, datetime
from typing import Any, Final

import aioimaplib
import asyncmy.errors
import prometheus_client
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from libs.aio import cancelling, raise_if_cancelling, wait_for
from libs.backoff import backoff_s
from libs.dsn import parse_dsn, report_event
from libs.events import (
    Direction,
    Event,
    EventType,
    MessageContent,
    MessageFlags,
    storable_utc,
)
from libs.imap.client import (
    AuthFailed,
    FetchItem,
    HostRefused,
    ImapConnection,
    ImapError,
    SelectInfo,
    quote_mailbox,
)
from libs.imap.uids import UidSet, format_uid_set, plan_fetch_batches
from libs.imap_accounts import AccountRow, FolderRow, SyncStore, UidEntry
from libs.inflight import publish_inflight
from libs.mime import MAX_RAW_BYTES, message_id_of
from libs.shards import ShardError
from services.ingest.imap.settings import ImapSettings

__all__ = ["AccountSync", "internaldate", "message_key", "tenant_error"]

logger = logging.getLogger(__name__)

SOURCE: Final = "imap"
INBOX: Final = "INBOX"
_STATUS_UIDVALIDITY: Final = re.compile(rb"UIDVALIDITY (\d{1,19})\b")
_STATUS_ITEM: Final = re.compile(rb"(UIDVALIDITY|UIDNEXT|HIGHESTMODSEQ) (\d{1,19})\b", re.IGNORECASE)
_TRANSIENT: Final = (ImapError, OSError, TimeoutError, KafkaError, asyncmy.errors.Error, ShardError)

EVENTS: Final = prometheus_client.Counter(
    "flightlog_imap_events", "Events produced by IMAP sync, by type", ["type"]
)
IDLE_WAKEUPS: Final = prometheus_client.Counter(
    "flightlog_imap_idle_wakeups", "IDLE pushes that led to a sync"
)
POLLED_FOLDERS: Final = prometheus_client.Counter(
    "flightlog_imap_polled_folders", "Folders looked at by the periodic poll, by outcome", ["outcome"]
)
ACCOUNTS_RUNNING: Final = prometheus_client.Gauge("flightlog_imap_accounts_running", "Accounts synced here")
FETCH_BYTES: Final = prometheus_client.Histogram(
    "flightlog_imap_fetch_bytes", "Bytes received per UID FETCH of message bodies or headers",
    buckets=[2**k * 1024 for k in range(6, 15)],  # 64 KiB to 16 MiB
)  # fmt: skip

_SIZE_FETCH_UIDS: Final = 5_000  # UIDs per RFC822.SIZE fetch: a ~300 KiB answer, a short command
_ITEM_OVERHEAD_BYTES: Final = 4096  # a FETCH item's bytes beside its literal (UID, flags, date)


def _identity(header: bytes) -> str:
    msgid = message_id_of(header)
    if msgid is not None:
        return hashlib.blake2b(msgid.strip().encode("utf-8", "replace"), digest_size=16).hexdigest()
    head = header.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0].rstrip(b"\r\n")
    return "h" + hashlib.blake2b(head, digest_size=16).hexdigest()


def tenant_error(exc: BaseException) -> str:
    """What the account's sync state says of a failure. It does not tell a refused connection
    from a timeout or a TLS failure, or repeat what the server said: an account's host and port
    are the tenant's choice, and a detailed error would make the platform a scanner of what
    answers where. The detail goes to the log."""
    if isinstance(exc, AuthFailed):
        return "the IMAP server refused the credentials"
    if isinstance(exc, HostRefused):
        return "the IMAP server's host is not allowed: it resolves to a loopback or private address"
    return "the IMAP server could not be reached or did not answer as expected; retrying"


def message_key(folder_id: int, header: bytes) -> str:
    return f"imap:{folder_id}:{_identity(header)}"


def _flag_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(f for f in flags if f.lower() != "\\recent"))


def internaldate(value: str | None) -> datetime:
    """The server's INTERNALDATE, or now when it is missing, malformed or not storable (a hostile
    server's year 0999 would otherwise fail the event, and the folder's sync with it, for ever)."""
    if value:
        try:
            when = datetime.strptime(value.strip(), "%d-%b-%Y %H:%M:%S %z")
            storable_utc(when)
            return when
        except ValueError:
            pass
    return datetime.now(UTC)


def _event_id(account_id: int, folder: FolderRow, uid: int, kind: str, salt: str = "") -> str:
    digest = hashlib.blake2b(
        f"{account_id}:{folder.id}:{folder.uidvalidity}:{uid}:{kind}:{salt}".encode(), digest_size=20
    ).hexdigest()
    return f"imap-{digest}"


class AccountSync:
    """Syncs one account until cancelled, or until its credentials are refused.

    :param account_id: the account (its row in ``imap_accounts``).
    :param store: sync state.
    :param producer: the shared idempotent ``acks=all`` producer.
    """

    def __init__(
        self, account_id: int, store: SyncStore, producer: AIOKafkaProducer, settings: ImapSettings
    ) -> None:
        self.account_id = account_id
        self.store = store
        self.producer = producer
        self.settings = settings
        self.conn: ImapConnection | None = None
        self.account: AccountRow | None = None
        self.state = "starting"
        self.synced_once = asyncio.Event()

    async def run(self) -> None:
        attempt = 0
        ACCOUNTS_RUNNING.inc()
        try:
            while True:
                try:
                    account = await self.store.account(self.account_id)
                    if account is None:
                        logger.warning("imap account %d is gone; not syncing", self.account_id)
                        return
                    if account.state == "disconnected":
                        logger.info("imap account %d is disconnected; not syncing", self.account_id)
                        return
                    self.account = account
                    await self._session(account, on_connected=lambda: None)
                except AuthFailed as exc:
                    self.state = "auth_failed"
                    logger.warning("imap account %d: %s; waiting for new credentials", self.account_id, exc)
                    await self.store.set_account_state(self.account_id, "auth_failed", tenant_error(exc))
                    return
                except _TRANSIENT as exc:
                    if cancelling():
                        # e.g. a wait_for in a cleanup that timed out after the cancel: not a
                        # connection error to retry, or the task would never end
                        raise asyncio.CancelledError() from exc
                    self.state = "error"
                    # Full jitter: a provider's outage fails its accounts together.
                    delay = backoff_s(
                        attempt + 1,
                        self.settings.imap_backoff_base_s,
                        self.settings.imap_backoff_max_s,
                        jitter="full",
                    )
                    logger.warning("imap account %d: %r; retrying in %.1f s", self.account_id, exc, delay)
                    attempt += 1
                    try:
                        await self.store.set_account_state(self.account_id, "error", tenant_error(exc))
                    except _TRANSIENT:
                        pass
                    await asyncio.sleep(delay)
                else:
                    attempt = 0
                finally:
                    if self.conn is not None:
                        await self.conn.close()
                        self.conn = None
        finally:
            ACCOUNTS_RUNNING.dec()

    async def _session(self, account: AccountRow, on_connected: Callable[[], None]) -> None:
        conn = ImapConnection(
            account.host,
            account.port,
            account.tls_mode,
            self.settings.imap_command_timeout_s,
            ca_file=self.settings.imap_tls_ca_file,
            max_response_bytes=self.settings.imap_max_response_bytes,
            allow_private=self.settings.imap_allow_private_hosts,
        )
        self.conn = conn
        await conn.connect(account.username, account.password, use_condstore=self.settings.imap_use_condstore)
        on_connected()
        await self.sync_all(conn)
        self.state = "running"
        await self.store.set_account_state(self.account_id, "running")
        self.synced_once.set()
        await self._idle_loop(conn)

    async def sync_all(self, conn: ImapConnection) -> None:
        folders = await self._sync_folder_list(conn)
        # INBOX last, so it stays selected for IDLE
        for folder in sorted(folders, key=lambda f: f.name.upper() == INBOX):
            raise_if_cancelling()
            await self.sync_folder(conn, folder)

    async def poll(self, conn: ImapConnection) -> None:
        """The periodic pass: the folder list, then a full sync of only the folders whose STATUS
        moved since their last sync. With CONDSTORE, HIGHESTMODSEQ moves on new mail, flag changes
        and expunges alike, so an unchanged folder costs one STATUS instead of a SELECT, a fetch
        and a write of its sync state. Without CONDSTORE only a full pass sees flag changes, so
        every folder is synced as before."""
        folders = await self._sync_folder_list(conn)
        reselect_inbox = False
        # INBOX last, so it stays selected for IDLE
        for folder in sorted(folders, key=lambda f: f.name.upper() == INBOX):
            raise_if_cancelling()
            is_inbox = folder.name.upper() == INBOX
            # after another folder's SELECT, INBOX is synced (and so selected) again for IDLE
            if not (is_inbox and reselect_inbox) and await self._unchanged(conn, folder):
                POLLED_FOLDERS.labels("unchanged").inc()
                continue
            POLLED_FOLDERS.labels("synced").inc()
            reselect_inbox |= not is_inbox
            await self.sync_folder(conn, folder)

    async def _unchanged(self, conn: ImapConnection, folder: FolderRow) -> bool:
        if not conn.condstore or folder.state != "synced" or folder.highestmodseq is None:
            return False
        response = await conn.imap.status(quote_mailbox(folder.name), "(UIDVALIDITY UIDNEXT HIGHESTMODSEQ)")
        if response.result != "OK":
            return False  # the full sync reports what is wrong with the folder
        status: dict[str, int] = {}
        for line in response.lines:
            # the items follow the last "(": a folder's name may contain anything
            for key, value in _STATUS_ITEM.findall(bytes(line).rpartition(b"(")[2]):
                status[key.decode().upper()] = int(value)
        return (status.get("UIDVALIDITY"), status.get("UIDNEXT"), status.get("HIGHESTMODSEQ")) == (
            folder.uidvalidity,
            folder.uidnext,
            folder.highestmodseq,
        )

    async def _idle_loop(self, conn: ImapConnection) -> None:
        imap = conn.imap
        inbox = next((f for f in await self.store.folders(self.account_id) if f.name.upper() == INBOX), None)
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + self.settings.imap_poll_interval_s
        while True:
            raise_if_cancelling()
            if inbox is None or "IDLE" not in {c.upper() for c in imap.protocol.capabilities}:
                await asyncio.sleep(max(0.0, next_poll - loop.time()))
                await self.poll(conn)
                next_poll = loop.time() + self.settings.imap_poll_interval_s
                continue
            queue = imap.protocol.idle_queue
            while not queue.empty():  # pushes of the last IDLE, already covered by the sync after it
                queue.get_nowait()
            idle = await imap.idle_start(timeout=self.settings.imap_idle_renew_s)
            pushed = False
            try:
                while True:
                    remaining = next_poll - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        lines = await imap.wait_server_push(timeout=remaining)
                    except TimeoutError:
                        break
                    raise_if_cancelling()  # aioimaplib waits with asyncio.wait_for
                    if lines == aioimaplib.STOP_WAIT_SERVER_PUSH:  # the renew timer fired: re-issue IDLE
                        break
                    if any(not bytes(x).startswith(b"OK") for x in lines):
                        pushed = True
                        break
            finally:
                imap.idle_done()
                if cancelling():  # leaving: the connection is closed next, do not wait long
                    with contextlib.suppress(TimeoutError, aioimaplib.AioImapException, OSError, ImapError):
                        await wait_for(idle, 2.0)
                else:
                    await wait_for(idle, self.settings.imap_command_timeout_s)
            if pushed:
                IDLE_WAKEUPS.inc()
                await self.sync_folder(conn, inbox)
            if loop.time() >= next_poll:
                await self.poll(conn)
                inbox = next(
                    (f for f in await self.store.folders(self.account_id) if f.name.upper() == INBOX), None
                )
                next_poll = loop.time() + self.settings.imap_poll_interval_s

    async def _sync_folder_list(self, conn: ImapConnection) -> list[FolderRow]:
        listed = [f for f in await conn.list_folders() if f.selectable]
        rows = await self.store.folders(self.account_id)
        by_name = {r.name: r for r in rows}
        listed_names = {f.name for f in listed}
        gone = {r.id: r for r in rows if r.name not in listed_names}
        result: list[FolderRow] = []
        for item in listed:
            row = by_name.get(item.name)
            if row is None and gone:
                uidvalidity = await self._status_uidvalidity(conn, item.name)
                match = next((g for g in gone.values() if g.uidvalidity == uidvalidity), None)
                if match is not None:
                    logger.info(
                        "imap account %d: folder %r renamed to %r", self.account_id, match.name, item.name
                    )
                    del gone[match.id]
                    match.name, match.role = item.name, item.role
                    await self._announce_rename(match)
                    await self.store.update_folder(match)
                    row = match
            if row is None:
                row = await self.store.add_folder(self.account_id, item.name, item.role)
            elif row.role != item.role:
                row.role = item.role
                await self.store.update_folder(row)
            result.append(row)
        for row in gone.values():
            known = await self.store.uids(self.account_id, row.id)
            await self._emit([self._deleted(row, e) for e in known.values()])
            await self.store.drop_uids(self.account_id, row.id)
            await self.store.delete_folder(row.id)
        return result

    async def _status_uidvalidity(self, conn: ImapConnection, name: str) -> int | None:
        response = await conn.imap.status(quote_mailbox(name), "(UIDVALIDITY)")
        for line in response.lines:
            match = _STATUS_UIDVALIDITY.search(bytes(line))
            if match:
                return int(match[1])
        return None

    async def _announce_rename(self, folder: FolderRow) -> None:
        known = await self.store.uids(self.account_id, folder.id)
        salt = f"rename:{folder.name}"
        await self._emit([self._updated(folder, e.uid, e.message_key, e.flags.split(), salt)
                          for e in known.values()])  # fmt: skip

    async def sync_folder(self, conn: ImapConnection, folder: FolderRow) -> None:
        # With QRESYNC the SELECT itself reports what changed since the last sync, so only those
        # UIDs' entries are read: a push into a big folder does not load its whole UID map.
        incremental = (
            conn.qresync and folder.state == "synced" and folder.highestmodseq is not None
            and folder.uidvalidity is not None
        )  # fmt: skip
        known = None if incremental else await self.store.uids(self.account_id, folder.id)
        info = await conn.select(folder.name, uidvalidity=folder.uidvalidity, modseq=folder.highestmodseq)
        if known is None:
            if info.uidvalidity == folder.uidvalidity and info.vanished is not None:
                await self._sync_reported_changes(conn, folder, info, info.vanished)
                return
            known = await self.store.uids(self.account_id, folder.id)
        if folder.uidvalidity is not None and info.uidvalidity != folder.uidvalidity:
            logger.info("imap account %d: UIDVALIDITY of %r changed; resyncing", self.account_id, folder.name)
            known = await self._uidvalidity_reset(conn, folder, info, known)
        folder.uidvalidity = info.uidvalidity
        server_uids: set[int] | None = None
        if known:
            server_uids = await self._apply_changes(conn, folder, info, known)
        max_known = max(known) if known else 0
        if server_uids is None:
            start = max_known + 1 if folder.state == "synced" else 1
            listed = (
                await conn.uid_list(max_uids=self.settings.imap_max_folder_uids) if info.exists else set()
            )
            server_uids = {u for u in listed if u >= start}
        new = sorted((u for u in server_uids if u not in known), reverse=True)
        folder.message_count = len(known)
        await self._fetch_new(conn, folder, new, known)
        await self._mark_synced(folder, info, conn)

    async def _sync_reported_changes(
        self, conn: ImapConnection, folder: FolderRow, info: SelectInfo, reported: UidSet
    ) -> None:
        """The QRESYNC path of :meth:`sync_folder`: flag changes and expunges (``reported``) as
        the SELECT reported them, then the UIDs above the highest known one."""
        known = await self.store.uids_in(self.account_id, folder.id, {i.uid for i in info.changed})
        # the server's set is read as ranges in SQL: ``1:4294967295`` costs what we hold
        known.update(await self.store.uids_in_ranges(self.account_id, folder.id, reported.ranges))
        vanished = reported.select(known)
        if vanished:  # every holder of a vanished key: a duplicate copy keeps the message alive
            known.update(
                await self.store.uids_with_keys(
                    self.account_id, folder.id, {known[u].message_key for u in vanished}
                )
            )
        await self._apply_changes(conn, folder, info, known)
        # counted from the map, not kept as a running sum: a sync interrupted between writing
        # the map and the folder's row must not leave the count off for good
        folder.message_count, max_known = await self.store.uid_stats(self.account_id, folder.id)
        listed = (
            await conn.uid_list(first=max_known + 1, max_uids=self.settings.imap_max_folder_uids)
            if info.exists
            else set()
        )
        new = sorted((u for u in listed if u > max_known), reverse=True)
        await self._fetch_new(conn, folder, new, known)
        await self._mark_synced(folder, info, conn)

    async def _mark_synced(self, folder: FolderRow, info: SelectInfo, conn: ImapConnection) -> None:
        folder.highestmodseq = info.highestmodseq if conn.condstore else None
        folder.uidnext = info.uidnext
        folder.state = "synced"
        await self.store.update_folder(folder, synced=True)

    async def _apply_changes(
        self, conn: ImapConnection, folder: FolderRow, info: SelectInfo, known: dict[int, UidEntry]
    ) -> set[int] | None:
        """Flag changes and expunges of known messages; returns every UID on the server when it had
        to list them (the fallback), None when it did not."""
        server_uids: set[int] | None = None
        max_uids = self.settings.imap_max_folder_uids
        if conn.qresync and folder.highestmodseq is not None and info.vanished is not None:
            changed = info.changed
            vanished = info.vanished.select(known)  # linear in what we hold, whatever the set
        elif conn.condstore and folder.highestmodseq is not None:
            changed = await conn.uid_fetch("1:*", f"(UID FLAGS) (CHANGEDSINCE {folder.highestmodseq})")
            listed = await conn.uid_list(max_uids=max_uids) if info.exists else set()
            vanished = [u for u in known if u not in listed]
            server_uids = listed
        else:
            changed = await conn.uid_fetch("1:*", "(UID FLAGS)") if info.exists else []
            server_uids = {i.uid for i in changed}
            vanished = [u for u in known if u not in server_uids]
        events: list[Event] = []
        updates: list[UidEntry] = []
        for item in changed:
            entry = known.get(item.uid)
            if entry is None:
                continue
            flags = _flag_text(item.flags)
            if flags != entry.flags:
                events.append(
                    self._updated(folder, item.uid, entry.message_key, item.flags, str(item.modseq or flags))
                )
                updates.append(UidEntry(item.uid, entry.message_key, flags))
        # a key may sit on two UIDs (a duplicate copy): delete it only when none is left
        gone_keys = {known[u].message_key for u in vanished} - {
            e.message_key for u, e in known.items() if u not in set(vanished)
        }
        events.extend(self._deleted(folder, known[u]) for u in vanished if known[u].message_key in gone_keys)
        await self._emit(events)
        await self.store.put_uids(self.account_id, folder.id, updates)
        if vanished:
            await self.store.drop_uids(self.account_id, folder.id, vanished)
        for u in vanished:
            known.pop(u, None)
        for e in updates:
            known[e.uid] = e
        return server_uids

    async def _uidvalidity_reset(
        self, conn: ImapConnection, folder: FolderRow, info: SelectInfo, known: dict[int, UidEntry]
    ) -> dict[int, UidEntry]:
        """Map the folder's new UIDs to the keys already synced; only messages never seen are
        fetched again, and only keys no longer present are deleted."""
        folder.uidvalidity = info.uidvalidity
        by_key = {e.message_key: e for e in known.values()}
        uids = sorted(await conn.uid_list(max_uids=self.settings.imap_max_folder_uids)) if info.exists else []
        # cut where a body fetch cuts, so a header above MAX_RAW_BYTES gives the same key
        parts = f"(UID FLAGS BODY.PEEK[HEADER]<0.{MAX_RAW_BYTES}>)"
        kept: dict[int, UidEntry] = {}
        events: list[Event] = []
        async with contextlib.aclosing(self._planned_fetches(conn, uids, parts)) as batches:
            async for items in batches:
                for item in items:
                    key = message_key(folder.id, item.body or b"")
                    old = by_key.get(key)
                    if old is None:
                        continue
                    flags = _flag_text(item.flags)
                    kept[item.uid] = UidEntry(item.uid, key, flags)
                    if flags != old.flags:
                        events.append(self._updated(folder, item.uid, key, item.flags, f"reset:{flags}"))
        still = {e.message_key for e in kept.values()}
        events.extend(self._deleted(folder, e) for e in by_key.values() if e.message_key not in still)
        await self._emit(events)
        await self.store.drop_uids(self.account_id, folder.id)
        await self.store.put_uids(self.account_id, folder.id, list(kept.values()))
        folder.highestmodseq = None
        folder.state = "initial"
        return kept

    async def _fetch_new(
        self, conn: ImapConnection, folder: FolderRow, uids: list[int], known: dict[int, UidEntry]
    ) -> None:
        parts = f"(UID FLAGS RFC822.SIZE INTERNALDATE BODY.PEEK[]<0.{MAX_RAW_BYTES}>)"
        async with contextlib.aclosing(self._planned_fetches(conn, uids, parts)) as batches:
            async for items in batches:
                await self._record_new(folder, items, known)

    async def _record_new(
        self, folder: FolderRow, items: list[FetchItem], known: dict[int, UidEntry]
    ) -> None:
        """One planned batch of new mail: its events, then (once Kafka acknowledged them) its UIDs."""
        events: list[Event] = []
        entries: list[UidEntry] = []
        for item in items:
            if item.uid in known:
                continue
            raw = item.body or b""
            key = message_key(folder.id, raw)
            events.append(self._synced(folder, item, key, raw))
            # A DSN about a message flightlog sent moves that message too (libs.dsn).
            if (report := parse_dsn(raw)) is not None:
                event_id = _event_id(self.account_id, folder, item.uid, "dsn")
                events.append(
                    report_event(self.account_id, report, event_id, internaldate(item.internaldate))
                )
            entries.append(UidEntry(item.uid, key, _flag_text(item.flags)))
        await _uncancelled(self._emit_and_record(folder, events, entries))
        for e in entries:
            known[e.uid] = e
        folder.message_count += len(entries)

    async def _planned_fetches(
        self, conn: ImapConnection, uids: list[int], parts: str
    ) -> AsyncGenerator[list[FetchItem]]:
        """``parts`` of ``uids``, in their order, one batch at a time: at most
        ``imap_batch_size`` messages and ``imap_fetch_batch_bytes`` as planned from RFC822.SIZE.
        A server sending more than planned plus one message is cut off (ResponseTooLarge); items
        it sends for UIDs not asked for, or twice, are dropped."""
        s = self.settings
        for i in range(0, len(uids), _SIZE_FETCH_UIDS):
            raise_if_cancelling()
            chunk = uids[i : i + _SIZE_FETCH_UIDS]
            if len(chunk) <= s.imap_batch_size and len(chunk) * MAX_RAW_BYTES <= s.imap_fetch_batch_bytes:
                batches = [chunk]  # within budget whatever the sizes (new mail): no round trip for them
            else:
                sized = await conn.uid_fetch(format_uid_set(chunk), "(UID RFC822.SIZE)")
                sizes = {item.uid: item.size for item in sized}
                batches = plan_fetch_batches(
                    [(u, sizes[u]) for u in chunk if u in sizes],  # the others were expunged meanwhile
                    max_bytes=s.imap_fetch_batch_bytes,
                    max_messages=s.imap_batch_size,
                    per_message_cap_bytes=MAX_RAW_BYTES,
                )
            for batch in batches:
                raise_if_cancelling()
                items = await conn.uid_fetch(
                    format_uid_set(batch),
                    parts,
                    # one message of slack: RFC822.SIZE is the server's word, and some count it loosely
                    max_response_bytes=s.imap_fetch_batch_bytes
                    + MAX_RAW_BYTES
                    + len(batch) * _ITEM_OVERHEAD_BYTES,
                )
                FETCH_BYTES.observe(conn.last_response_bytes)
                wanted = set(batch)
                fresh = []
                for item in items:
                    if item.uid in wanted:
                        wanted.discard(item.uid)
                        fresh.append(item)
                yield fresh

    def _flags(self, folder: FolderRow, flags: Iterable[str]) -> MessageFlags:
        lowered = {f.lower() for f in flags}
        return MessageFlags(
            unread="\\seen" not in lowered, starred="\\flagged" in lowered, folder=folder.name[:255]
        )

    def _synced(self, folder: FolderRow, item: FetchItem, key: str, raw: bytes) -> Event:
        return Event(
            event_id=_event_id(self.account_id, folder, item.uid, "synced"),
            account_id=self.account_id,
            message_key=key,
            type=EventType.SYNCED,
            occurred_at=internaldate(item.internaldate),
            source=SOURCE,
            direction=Direction.OUTBOUND if folder.role in ("sent", "drafts") else Direction.INBOUND,
            content=MessageContent(
                channel="email",
                raw_mime=base64.b64encode(raw).decode(),
                size_bytes=item.size if item.size is not None else len(raw),
            ),
            flags=self._flags(folder, item.flags),
        )

    def _updated(self, folder: FolderRow, uid: int, key: str, flags: Iterable[str], salt: str) -> Event:
        return Event(
            event_id=_event_id(self.account_id, folder, uid, "updated", salt),
            account_id=self.account_id,
            message_key=key,
            type=EventType.UPDATED,
            occurred_at=datetime.now(UTC),
            source=SOURCE,
            flags=self._flags(folder, flags),
        )

    def _deleted(self, folder: FolderRow, entry: UidEntry) -> Event:
        return Event(
            event_id=_event_id(self.account_id, folder, entry.uid, "deleted"),
            account_id=self.account_id,
            message_key=entry.message_key,
            type=EventType.DELETED,
            occurred_at=datetime.now(UTC),
            source=SOURCE,
        )

    async def _emit_and_record(self, folder: FolderRow, events: list[Event], entries: list[UidEntry]) -> None:
        await self._emit(events)
        await self.store.put_uids(self.account_id, folder.id, entries)

    async def _emit(self, events: list[Event]) -> None:
        if not events:
            return
        now = datetime.now(UTC)
        await publish_inflight(self.producer, [e.model_copy(update={"received_at": now}) for e in events])
        for event in events:
            EVENTS.labels(event.type.value).inc()


async def _uncancelled(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to its end even if we are cancelled meanwhile (then re-raise the cancel): events
    acknowledged by Kafka and their UID rows are written together, or a moved account would
    emit the batch twice."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
