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

On a server with Gmail's extensions (X-GM-EXT-1) only All Mail is synced and watched in IDLE; the
key is ``imap:<folder id>:gm<X-GM-MSGID>``, the thread ``gm:<X-GM-THRID>``, and X-GM-LABELS are the
message's labels (a label change is a flag change). After a login, as in every periodic pass, a
folder whose STATUS is that of its last complete sync is not synced again.
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
    MAX_LABELS,
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
from libs.imap_login import AccountLogin
from libs.inflight import publish_inflight
from libs.mime import MAX_RAW_BYTES, message_id_of
from libs.oauth import OAuthError, OAuthSettings, TokenRefused
from libs.sending import SEND_KEY_PREFIX, message_key_of
from libs.shards import ShardError
from services.ingest.imap.settings import ImapSettings

__all__ = ["AccountSync", "LoginGate", "gmail_key", "internaldate", "message_key", "tenant_error"]

logger = logging.getLogger(__name__)

SOURCE: Final = "imap"
INBOX: Final = "INBOX"
_STATUS_UIDVALIDITY: Final = re.compile(rb"UIDVALIDITY (\d{1,19})\b")
_STATUS_ITEM: Final = re.compile(rb"(UIDVALIDITY|UIDNEXT|HIGHESTMODSEQ) (\d{1,19})\b", re.IGNORECASE)
# OAuthError: a token endpoint that cannot be reached, a provider not configured here (TokenRefused,
# a subclass, is caught before: the account waits for new tokens)
_TRANSIENT: Final = (
    ImapError,
    OSError,
    TimeoutError,
    KafkaError,
    asyncmy.errors.Error,
    ShardError,
    OAuthError,
)

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

MAX_LABEL_CHARS: Final = 100  # libs.events.Label
_SIZE_FETCH_UIDS: Final = 5_000  # UIDs per RFC822.SIZE fetch: a ~300 KiB answer, a short command
_ITEM_OVERHEAD_BYTES: Final = 4096  # a FETCH item's bytes beside its literal (UID, flags, date)


class LoginGate:
    """At most ``per_host`` logins at a time to one server host, shared by every account of an
    ingest instance: after a restart its accounts all log in at once, and a provider meets
    thousands of simultaneous logins from one address with throttling (or its ``[UNAVAILABLE]``).
    A slot is held from the connection's start to the end of its login; the sync after it is not
    bounded here. A host's entry lives only while a login to it runs or waits."""

    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self._hosts: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def slot(self, host: str) -> AsyncGenerator[None]:
        key = host.lower()
        gate, users = self._hosts.get(key, (asyncio.Semaphore(self.per_host), 0))
        self._hosts[key] = (gate, users + 1)
        try:
            async with gate:
                yield
        finally:
            gate, users = self._hosts[key]
            if users == 1:
                del self._hosts[key]
            else:
                self._hosts[key] = (gate, users - 1)


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
    if isinstance(exc, TokenRefused):
        # RFC 6749's error code only (invalid_grant: revoked or expired); the provider's own
        # description goes to the log
        return f"the OAuth2 provider refused the refresh token ({exc.error}); give the account new tokens"
    if isinstance(exc, OAuthError):
        return "the OAuth2 provider's token endpoint could not be used; retrying"
    if isinstance(exc, HostRefused):
        return "the IMAP server's host is not allowed: it resolves to a loopback or private address"
    return "the IMAP server could not be reached or did not answer as expected; retrying"


def message_key(folder_id: int, header: bytes) -> str:
    return f"imap:{folder_id}:{_identity(header)}"


def _flag_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(f for f in flags if f.lower() != "\\recent"))


def gmail_key(folder_id: int, msgid: int) -> str:
    """A Gmail message's key: All Mail's folder (the only one synced; the gateway reads content
    through it) and the X-GM-MSGID, the same whatever the message's labels and after any
    UIDVALIDITY change or rename of All Mail (whose name depends on the user's language)."""
    return f"imap:{folder_id}:gm{msgid}"


def _key(folder: FolderRow, item: FetchItem) -> str:
    if item.gm_msgid is not None:
        return gmail_key(folder.id, item.gm_msgid)
    header = item.body or b""
    if folder.role == "sent" and (msgid := message_id_of(header)) is not None:
        # The Sent copy of a message flightlog sent (its Message-ID carries the send's token,
        # libs.sending) is that message, not a second one: the copy's flags and folder go to it,
        # and expunging the copy deletes it, as for any synced message.
        sent = message_key_of(msgid)
        if sent is not None:
            return sent
    return message_key(folder.id, header)


def _state_text(item: FetchItem) -> str:
    """What the UID map keeps of a message to see it change: its flags, and on Gmail a digest of
    its labels (the column holds 500 characters; a message may have hundreds of labels)."""
    flags = _flag_text(item.flags)
    if item.gm_labels is None:
        return flags
    digest = hashlib.blake2b("\0".join(sorted(item.gm_labels)).encode(), digest_size=8).hexdigest()
    return f"{flags} gm:{digest}".lstrip()


def _changes(conn: ImapConnection) -> str:
    """The items a flag-change fetch asks for: on Gmail a label change is a change too."""
    return "UID FLAGS X-GM-LABELS" if conn.gmail else "UID FLAGS"


def _idles_in(conn: ImapConnection, folder: FolderRow) -> bool:
    """Whether ``folder`` is the one IDLE watches: INBOX, or on Gmail All Mail (the only one synced)."""
    return folder.role == "all" if conn.gmail else folder.name.upper() == INBOX


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
    :param login: logs the account in (OAuth2 tokens refreshed); None: passwords only.
    :param logins: the instance's bound on concurrent logins per host (one of its own if none).
    """

    def __init__(
        self, account_id: int, store: SyncStore, producer: AIOKafkaProducer, settings: ImapSettings,
        login: AccountLogin | None = None,
        logins: LoginGate | None = None,
    ) -> None:  # fmt: skip
        self.account_id = account_id
        self.store = store
        self.login = login or AccountLogin(store, None, OAuthSettings())
        self.producer = producer
        self.settings = settings
        self.logins = logins or LoginGate(settings.imap_max_concurrent_logins_per_host)
        self.conn: ImapConnection | None = None
        self.account: AccountRow | None = None
        self.state = "starting"
        self.synced_once = asyncio.Event()
        self._relogin_after: datetime | None = None  # the expired access token already logged in again after

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
                    if account.state == "auth_failed":
                        # refused before this worker started (an ingest restart): new credentials
                        # start a new worker. Retrying would storm the server with logins it
                        # refuses and slows on purpose (Dovecot penalises the client address:
                        # 30 such logins held 300 good ones from 2.5 s to 16 s).
                        self.state = "auth_failed"
                        logger.info(
                            "imap account %d: credentials refused; waiting for new ones", self.account_id
                        )
                        return
                    self.account = account
                    await self._session(account, on_connected=lambda: None)
                except (AuthFailed, TokenRefused) as exc:
                    self.state = "auth_failed"
                    logger.warning("imap account %d: %s; waiting for new credentials", self.account_id, exc)
                    await self.store.set_account_state(self.account_id, "auth_failed", tenant_error(exc))
                    return
                except _TRANSIENT as exc:
                    if cancelling():
                        # e.g. a wait_for in a cleanup that timed out after the cancel: not a
                        # connection error to retry, or the task would never end
                        raise asyncio.CancelledError() from exc
                    if self._session_token_expired(exc):
                        # Microsoft 365 ends a session once its access token expires ("Session
                        # invalidated - AccessTokenExpired"): no error, log in again at once
                        logger.info(
                            "imap account %d: %r after its access token expired", self.account_id, exc
                        )
                        continue
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

    def _session_token_expired(self, exc: BaseException) -> bool:
        """Whether a session just lost was logged in with an OAuth2 access token that has expired
        since; once per token, so a failing token endpoint is retried with the backoff."""
        oauth = self.account.oauth if self.account is not None else None
        if oauth is None or oauth.expires_at is None or isinstance(exc, OAuthError):
            return False
        if oauth.expires_at > datetime.now(UTC) or oauth.expires_at == self._relogin_after:
            return False
        self._relogin_after = oauth.expires_at
        return True

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
        async with self.logins.slot(account.host):
            await self.login.connect(conn, account, use_condstore=self.settings.imap_use_condstore)
        on_connected()
        await self.sync_all(conn)
        self.state = "running"
        await self.store.set_account_state(self.account_id, "running")
        self.synced_once.set()
        await self._idle_loop(conn)

    async def sync_all(self, conn: ImapConnection) -> None:
        """The pass after a login: :meth:`poll`, with INBOX selected whatever its STATUS (IDLE
        needs it). After an ingest restart most folders have not changed, and each then costs
        one STATUS and no query of the sync state: a fleet of 1,000 accounts comes back in
        seconds instead of waiting on 30,000 queries."""
        await self.poll(conn, select_inbox=True)

    async def poll(self, conn: ImapConnection, *, select_inbox: bool = False) -> None:
        """The periodic pass: the folder list, then a full sync of only the folders whose STATUS
        moved since their last sync. With CONDSTORE, HIGHESTMODSEQ moves on new mail, flag changes
        and expunges alike, so an unchanged folder costs one STATUS instead of a SELECT, a fetch
        and a write of its sync state. Without CONDSTORE only a full pass sees flag changes, so
        every folder is synced as before."""
        folders = await self._sync_folder_list(conn)
        reselect_inbox = select_inbox
        # INBOX last, so it stays selected for IDLE
        for folder in sorted(folders, key=lambda f: _idles_in(conn, f)):
            raise_if_cancelling()
            is_inbox = _idles_in(conn, folder)
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
        return _as_synced(
            folder, status.get("UIDVALIDITY"), status.get("UIDNEXT"), status.get("HIGHESTMODSEQ")
        )

    async def _idle_loop(self, conn: ImapConnection) -> None:
        imap = conn.imap
        inbox = next((f for f in await self.store.folders(self.account_id) if _idles_in(conn, f)), None)
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
                    (f for f in await self.store.folders(self.account_id) if _idles_in(conn, f)), None
                )
                next_poll = loop.time() + self.settings.imap_poll_interval_s

    async def _sync_folder_list(self, conn: ImapConnection) -> list[FolderRow]:
        listed = [f for f in await conn.list_folders() if f.selectable]
        if conn.gmail and any(f.role == "all" for f in listed):
            # every message of the mailbox once, its labels from X-GM-LABELS (not a copy per label)
            listed = [f for f in listed if f.role == "all"]
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
        if conn.condstore and _as_synced(folder, info.uidvalidity, info.uidnext, info.highestmodseq):
            return  # nothing new, changed or expunged since the last sync: no query, no write
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
            changed = await conn.uid_fetch("1:*", f"({_changes(conn)}) (CHANGEDSINCE {folder.highestmodseq})")
            listed = await conn.uid_list(max_uids=max_uids) if info.exists else set()
            vanished = [u for u in known if u not in listed]
            server_uids = listed
        else:
            changed = await conn.uid_fetch("1:*", f"({_changes(conn)})") if info.exists else []
            server_uids = {i.uid for i in changed}
            vanished = [u for u in known if u not in server_uids]
        events: list[Event] = []
        updates: list[UidEntry] = []
        for item in changed:
            entry = known.get(item.uid)
            if entry is None:
                continue
            flags = _state_text(item)
            if flags != entry.flags:
                events.append(
                    self._updated(folder, item.uid, entry.message_key, item, str(item.modseq or flags))
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
        parts = (
            "(UID FLAGS X-GM-MSGID X-GM-LABELS)"  # the key is the message id: no header to fetch
            if conn.gmail
            else f"(UID FLAGS BODY.PEEK[HEADER]<0.{MAX_RAW_BYTES}>)"
        )
        kept: dict[int, UidEntry] = {}
        events: list[Event] = []
        async with contextlib.aclosing(self._planned_fetches(conn, uids, parts)) as batches:
            async for items in batches:
                for item in items:
                    key = _key(folder, item)
                    old = by_key.get(key)
                    if old is None:
                        continue
                    flags = _state_text(item)
                    kept[item.uid] = UidEntry(item.uid, key, flags)
                    if flags != old.flags:
                        events.append(self._updated(folder, item.uid, key, item, f"reset:{flags}"))
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
        gmail = " X-GM-MSGID X-GM-THRID X-GM-LABELS" if conn.gmail else ""
        parts = f"(UID FLAGS RFC822.SIZE INTERNALDATE{gmail} BODY.PEEK[]<0.{MAX_RAW_BYTES}>)"
        # Pipelined: the next batch is fetched while the last one's events wait for Kafka and its
        # UIDs are written (two batches in memory at most); batches are still recorded in order.
        recording: asyncio.Task[None] | None = None
        try:
            async with contextlib.aclosing(self._planned_fetches(conn, uids, parts)) as batches:
                async for items in batches:
                    if recording is not None:
                        await recording
                    recording = asyncio.create_task(self._record_new(folder, items, known))
            if recording is not None:
                await recording
        finally:
            if recording is not None and not recording.done():
                recording.cancel()  # _record_new still finishes a batch Kafka took (_uncancelled)
            if recording is not None:
                # its own failure, if any, is logged by the retry of the error that ends us here
                with contextlib.suppress(asyncio.CancelledError, *_TRANSIENT):
                    await recording

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
            key = _key(folder, item)
            if key.startswith(SEND_KEY_PREFIX):  # the Sent copy of a message flightlog sent
                events.append(self._updated(folder, item.uid, key, item, "sent-copy"))
                entries.append(UidEntry(item.uid, key, _state_text(item)))
                continue
            events.append(self._synced(folder, item, key, raw))
            # A DSN about a message flightlog sent moves that message too (libs.dsn).
            if (report := parse_dsn(raw)) is not None:
                event_id = _event_id(self.account_id, folder, item.uid, "dsn")
                events.append(
                    report_event(self.account_id, report, event_id, internaldate(item.internaldate))
                )
            entries.append(UidEntry(item.uid, key, _state_text(item)))
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

    def _flags(
        self, folder: FolderRow, flags: Iterable[str], labels: list[str] | None = None
    ) -> MessageFlags:
        lowered = {f.lower() for f in flags}
        unread, starred = "\\seen" not in lowered, "\\flagged" in lowered
        if labels is not None:  # Gmail: labels instead of the folder (every message is in All Mail)
            kept = list(dict.fromkeys(label[:MAX_LABEL_CHARS] for label in labels if label))[:MAX_LABELS]
            return MessageFlags(unread=unread, starred=starred, labels=kept)
        return MessageFlags(unread=unread, starred=starred, folder=folder.name[:255])

    def _synced(self, folder: FolderRow, item: FetchItem, key: str, raw: bytes) -> Event:
        labels = {label.lower() for label in item.gm_labels or ()}
        outbound = folder.role in ("sent", "drafts") or bool(labels & {"\\sent", "\\draft"})
        return Event(
            event_id=_event_id(self.account_id, folder, item.uid, "synced"),
            account_id=self.account_id,
            message_key=key,
            type=EventType.SYNCED,
            occurred_at=internaldate(item.internaldate),
            source=SOURCE,
            direction=Direction.OUTBOUND if outbound else Direction.INBOUND,
            content=MessageContent(
                channel="email",
                raw_mime=base64.b64encode(raw).decode(),
                size_bytes=item.size if item.size is not None else len(raw),
                thread_key=f"gm:{item.gm_thrid}" if item.gm_thrid is not None else None,
            ),
            flags=self._flags(folder, item.flags, item.gm_labels),
        )

    def _updated(
        self, folder: FolderRow, uid: int, key: str, now: FetchItem | Iterable[str], salt: str
    ) -> Event:
        """``now``: the message's FETCH (flags, and labels on Gmail), or its flags alone."""
        flags, labels = (now.flags, now.gm_labels) if isinstance(now, FetchItem) else (now, None)
        return Event(
            event_id=_event_id(self.account_id, folder, uid, "updated", salt),
            account_id=self.account_id,
            message_key=key,
            type=EventType.UPDATED,
            occurred_at=datetime.now(UTC),
            source=SOURCE,
            flags=self._flags(folder, flags, labels),
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


def _as_synced(
    folder: FolderRow, uidvalidity: int | None, uidnext: int | None, highestmodseq: int | None
) -> bool:
    """Whether a folder's STATUS or SELECT values are those of its last complete sync: with
    CONDSTORE, HIGHESTMODSEQ moves on every flag change and expunge, UIDNEXT on every new message."""
    return (
        folder.state == "synced"
        and highestmodseq is not None
        and (uidvalidity, uidnext, highestmodseq)
        == (folder.uidvalidity, folder.uidnext, folder.highestmodseq)
    )


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
