"""IMAP accounts: where their sync state is kept, and how a change of one is announced.

Two services share this: the gateway creates accounts and changes their credentials (and shows
their sync state), ingest syncs them. Neither may import the other, so the store and the
announcement live here.

State: accounts and folders in the global schema (``imap_accounts``, ``imap_folders``), the UID
map of each folder in the account's shard (``imap_uids``). Announcements: the compacted topic
``flightlog.imap-accounts`` (key: the account id; value: its credentials version; a tombstone
stops its sync), which ingest's instances divide between them as a consumer group.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from pydantic_settings import BaseSettings, SettingsConfigDict

from libs.crypto import SecretBox
from libs.ids import shard_of
from libs.kafka import IMAP_ACCOUNTS
from libs.oauth import Tokens
from libs.shards import ShardRouter

__all__ = [
    "AccountRow",
    "FolderRow",
    "ImapAccountsSettings",
    "OAuthCredentials",
    "SyncStore",
    "UidEntry",
    "publish_account",
]


class ImapAccountsSettings(BaseSettings):
    """Where IMAP account announcements go (``FLIGHTLOG_IMAP_ACCOUNTS_TOPIC``) and which CAs an
    IMAP server's certificate may chain to; ingest's sync settings extend this, so the gateway
    and ingest read the same variables."""

    model_config = SettingsConfigDict(env_prefix="FLIGHTLOG_", extra="ignore", frozen=True)

    imap_accounts_topic: str = IMAP_ACCOUNTS  # `flightlog topics create` makes it
    # PEM certificates trusted besides the system's, for servers with a private CA or a
    # self-signed certificate (the local stack's Dovecot); certificates are always verified.
    # ingest's sync and the gateway's content fetches both connect with it.
    imap_tls_ca_file: str | None = None
    # Accounts may name hosts that resolve to loopback or private addresses (the local stack);
    # off, such a host is refused by the API and, should its DNS change later, by every connection.
    imap_allow_private_hosts: bool = False
    # The ports an account may name (IMAP 143 with STARTTLS, IMAPS 993): the API refuses others, so
    # the platform cannot be pointed at arbitrary services.
    imap_allowed_ports: tuple[int, ...] = (143, 993)


async def publish_account(
    producer: AIOKafkaProducer,
    settings: ImapAccountsSettings,
    account_id: int,
    credentials_version: int | None,
) -> None:
    """Announce an account (or, with None, its removal) to whichever ingest instance owns it."""
    value = (
        None
        if credentials_version is None
        else orjson.dumps({"account_id": str(account_id), "credentials_version": credentials_version})
    )
    await producer.send_and_wait(settings.imap_accounts_topic, value, key=str(account_id).encode())


@dataclass(slots=True)
class OAuthCredentials:
    """An OAuth2 account's login: ``mechanism`` None lets the server's capabilities choose
    (:data:`libs.imap.client.LOGIN_METHODS`); ``expires_at`` None: the access token's expiry is
    not known."""

    provider: str
    refresh_token: str
    access_token: str | None = None
    expires_at: datetime | None = None
    mechanism: str | None = None

    def __repr__(self) -> str:  # never the tokens
        return (
            f"OAuthCredentials({self.provider!r}, mechanism={self.mechanism!r}, expires_at={self.expires_at})"
        )


@dataclass(slots=True)
class AccountRow:
    account_id: int
    application_id: int
    host: str
    port: int
    tls_mode: str
    username: str
    password: str  # empty for an OAuth2 account
    credentials_version: int
    state: str
    oauth: OAuthCredentials | None = None


@dataclass(slots=True)
class FolderRow:
    id: int
    name: str
    role: str | None
    uidvalidity: int | None
    highestmodseq: int | None
    uidnext: int | None
    state: str
    message_count: int


@dataclass(frozen=True, slots=True)
class UidEntry:
    uid: int
    message_key: str
    flags: str


class SyncStore:
    """SQL of the sync state. Every method is one short transaction."""

    def __init__(self, router: ShardRouter, box: SecretBox) -> None:
        self._router = router
        self._box = box
        self._g = router.global_schema

    async def _global(self, sql: str, args: tuple[Any, ...] = ()) -> tuple[list[tuple[Any, ...]], int]:
        async with self._router.global_pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(sql, args)
            rows = list(await cur.fetchall())
            await conn.commit()
            return rows, int(cur.lastrowid or 0)

    async def insert_account(
        self,
        account_id: int,
        application_id: int,
        host: str,
        port: int,
        tls_mode: str,
        username: str,
        password: str,
        oauth: OAuthCredentials | None = None,
    ) -> None:
        """A new account; with ``oauth`` it logs in with tokens and ``password`` is ignored."""
        await self._global(
            f"INSERT INTO `{self._g}`.imap_accounts (account_id, application_id, host, port, tls_mode,"
            " username, password_enc, auth_method, oauth_provider, sasl_mechanism, refresh_token_enc,"
            " access_token_enc, access_token_expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
            " %s, %s)",
            (account_id, application_id, host, port, tls_mode, username, *self._secrets(password, oauth)),
        )

    def _secrets(self, password: str, oauth: OAuthCredentials | None) -> tuple[Any, ...]:
        """password_enc through access_token_expires_at, as stored."""
        if oauth is None:
            return (self._box.encrypt(password), "password", None, None, None, None, None)
        return (
            b"", "oauth2", oauth.provider, oauth.mechanism, self._box.encrypt(oauth.refresh_token),
            self._box.encrypt(oauth.access_token) if oauth.access_token else None, _naive(oauth.expires_at),
        )  # fmt: skip

    async def update_credentials(
        self, account_id: int, username: str, password: str, oauth: OAuthCredentials | None = None
    ) -> int:
        """New credentials (a password, or with ``oauth`` tokens); the version goes up, so the
        sync restarts with them."""
        await self._global(
            f"UPDATE `{self._g}`.imap_accounts SET username = %s, password_enc = %s, auth_method = %s,"
            " oauth_provider = %s, sasl_mechanism = %s, refresh_token_enc = %s, access_token_enc = %s,"
            " access_token_expires_at = %s,"
            " credentials_version = credentials_version + 1, state = 'pending', last_error = NULL"
            " WHERE account_id = %s",
            (username, *self._secrets(password, oauth), account_id),
        )
        rows, _ = await self._global(
            f"SELECT credentials_version FROM `{self._g}`.imap_accounts WHERE account_id = %s", (account_id,)
        )
        return int(rows[0][0])

    async def disconnect(self, account_id: int) -> None:
        """Forget the password and mark the account ``disconnected`` (its sync is stopped through
        the accounts topic); new credentials connect it again."""
        await self._global(
            f"UPDATE `{self._g}`.imap_accounts SET password_enc = '', refresh_token_enc = NULL,"
            " access_token_enc = NULL, access_token_expires_at = NULL, state = 'disconnected',"
            " last_error = NULL, credentials_version = credentials_version + 1 WHERE account_id = %s",
            (account_id,),
        )

    async def account(self, account_id: int) -> AccountRow | None:
        rows, _ = await self._global(
            f"SELECT account_id, application_id, host, port, tls_mode, username, password_enc,"
            " credentials_version, state, auth_method, oauth_provider, sasl_mechanism, refresh_token_enc,"
            " access_token_enc, access_token_expires_at"
            f" FROM `{self._g}`.imap_accounts WHERE account_id = %s",
            (account_id,),
        )
        if not rows:
            return None
        r = rows[0]
        oauth = None
        if r[9] == "oauth2" and r[12]:  # no refresh token once disconnected
            oauth = OAuthCredentials(
                r[10], self._box.decrypt(r[12]), self._box.decrypt(r[13]) if r[13] else None,
                r[14].replace(tzinfo=UTC) if r[14] else None, r[11],
            )  # fmt: skip
        return AccountRow(
            int(r[0]),
            int(r[1]),
            r[2],
            int(r[3]),
            r[4],
            r[5],
            self._box.decrypt(r[6]) if r[6] else "",  # empty once disconnected, and for OAuth2
            int(r[7]),
            r[8],
            oauth,
        )

    async def save_tokens(self, account_id: int, credentials_version: int, tokens: Tokens) -> bool:
        """Keep what a refresh gave (a rotated refresh token too). Only while the credentials are
        the ones refreshed: new credentials given meanwhile win. Returns whether they were kept."""
        sets, args = (
            "access_token_enc = %s, access_token_expires_at = %s",
            [
                self._box.encrypt(tokens.access_token),
                _naive(tokens.expires_at),
            ],
        )
        if tokens.refresh_token is not None:
            sets += ", refresh_token_enc = %s"
            args.append(self._box.encrypt(tokens.refresh_token))
        async with self._router.global_pool.acquire() as conn, conn.cursor() as cur:
            changed = await cur.execute(
                f"UPDATE `{self._g}`.imap_accounts SET {sets} WHERE account_id = %s"
                " AND credentials_version = %s AND auth_method = 'oauth2' AND state <> 'disconnected'",
                (*args, account_id, credentials_version),
            )
            await conn.commit()
        return bool(changed)

    async def account_public(self, account_id: int) -> dict[str, Any] | None:
        rows, _ = await self._global(
            "SELECT host, port, tls_mode, username, state, last_error, last_sync_at, credentials_version,"
            " auth_method, oauth_provider, sasl_mechanism"
            f" FROM `{self._g}`.imap_accounts WHERE account_id = %s",
            (account_id,),
        )
        if not rows:
            return None
        r = rows[0]
        return {
            "host": r[0], "port": int(r[1]), "tls_mode": r[2], "username": r[3], "state": r[4],
            "last_error": r[5], "last_sync_at": r[6].isoformat() if r[6] else None,
            "credentials_version": int(r[7]), "auth": r[8], "oauth_provider": r[9], "sasl_mechanism": r[10],
        }  # fmt: skip

    async def set_account_state(self, account_id: int, state: str, error: str | None = None) -> None:
        await self._global(
            f"UPDATE `{self._g}`.imap_accounts SET state = %s, last_error = %s,"
            " last_sync_at = IF(%s = 'running', CURRENT_TIMESTAMP(6), last_sync_at)"
            # a worker that has not yet seen the tombstone must not revive a disconnected account
            " WHERE account_id = %s AND state <> 'disconnected'",
            (state, error[:1000] if error else None, state, account_id),
        )

    async def folders(self, account_id: int) -> list[FolderRow]:
        rows, _ = await self._global(
            f"SELECT id, name, role, uidvalidity, highestmodseq, uidnext, state, message_count"
            f" FROM `{self._g}`.imap_folders WHERE account_id = %s AND deleted = 0 ORDER BY id",
            (account_id,),
        )
        return [
            FolderRow(int(r[0]), r[1], r[2], _int(r[3]), _int(r[4]), _int(r[5]), r[6], int(r[7]))
            for r in rows
        ]

    async def folders_public(self, account_id: int) -> list[dict[str, Any]]:
        rows, _ = await self._global(
            "SELECT id, name, role, state, message_count, last_sync_at, last_error, uidvalidity,"
            " highestmodseq"
            f" FROM `{self._g}`.imap_folders WHERE account_id = %s AND deleted = 0 ORDER BY id",
            (account_id,),
        )
        return [
            {"id": str(r[0]), "name": r[1], "role": r[2], "state": r[3], "message_count": int(r[4]),
             "last_sync_at": r[5].isoformat() if r[5] else None, "last_error": r[6],
             "uidvalidity": _int(r[7]), "highestmodseq": _int(r[8])}
            for r in rows
        ]  # fmt: skip

    async def add_folder(self, account_id: int, name: str, role: str | None) -> FolderRow:
        # Not for an erased account (libs.erasure): a sync still running must not bring it back.
        _, folder_id = await self._global(
            f"INSERT INTO `{self._g}`.imap_folders (account_id, name, role) SELECT %s, %s, %s FROM DUAL"
            f" WHERE NOT EXISTS (SELECT 1 FROM `{self._g}`.account_erasures WHERE account_id = %s)",
            (account_id, name, role, account_id),
        )
        return FolderRow(folder_id, name, role, None, None, None, "initial", 0)

    async def update_folder(
        self, folder: FolderRow, *, error: str | None = None, synced: bool = False
    ) -> None:
        await self._global(
            f"UPDATE `{self._g}`.imap_folders SET name = %s, role = %s, uidvalidity = %s, highestmodseq = %s,"
            " uidnext = %s, state = %s, message_count = %s, last_error = %s,"
            " last_sync_at = IF(%s, CURRENT_TIMESTAMP(6), last_sync_at) WHERE id = %s",
            (folder.name, folder.role, folder.uidvalidity, folder.highestmodseq, folder.uidnext, folder.state,
             folder.message_count, error[:1000] if error else None, synced, folder.id),
        )  # fmt: skip

    async def delete_folder(self, folder_id: int) -> None:
        await self._global(f"UPDATE `{self._g}`.imap_folders SET deleted = 1 WHERE id = %s", (folder_id,))

    async def uids(self, account_id: int, folder_id: int) -> dict[int, UidEntry]:
        """The folder's whole UID map."""
        return await self._uid_entries(account_id, folder_id, [("", ())])

    async def uids_in(self, account_id: int, folder_id: int, uids: Collection[int]) -> dict[int, UidEntry]:
        """The entries of ``uids`` that the folder's map holds."""
        return await self._uid_entries(account_id, folder_id, _in_chunks("uid", sorted(uids)))

    async def uids_in_ranges(
        self, account_id: int, folder_id: int, ranges: Sequence[tuple[int, int]]
    ) -> dict[int, UidEntry]:
        """The entries whose UID lies in one of the inclusive ``ranges``: a server's UID set read
        without expanding it (``1:4294967295`` is one primary-key range scan, which returns only
        what the folder holds)."""
        chunks = [
            (
                " AND (" + " OR ".join(["uid BETWEEN %s AND %s"] * len(part)) + ")",
                [v for r in part for v in r],
            )
            for part in (ranges[i : i + _CHUNK] for i in range(0, len(ranges), _CHUNK))
        ]
        return await self._uid_entries(account_id, folder_id, chunks)

    async def uids_with_keys(
        self, account_id: int, folder_id: int, keys: Collection[str]
    ) -> dict[int, UidEntry]:
        """Every entry of the folder holding one of ``keys`` (a duplicate copy has two UIDs)."""
        return await self._uid_entries(
            account_id, folder_id, _in_chunks("message_key", sorted(k.encode() for k in keys))
        )

    async def uid_stats(self, account_id: int, folder_id: int) -> tuple[int, int]:
        """(how many UIDs the folder's map holds, the highest of them or 0): one index range."""
        shard = shard_of(account_id)
        pool = await self._router.pool(shard)
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT COUNT(*), COALESCE(MAX(uid), 0) FROM {self._router.table(shard, 'imap_uids')}"
                " WHERE account_id = %s AND folder_id = %s",
                (account_id, folder_id),
            )
            count, top = await cur.fetchone()
            await conn.commit()
        return int(count), int(top)

    async def _uid_entries(
        self, account_id: int, folder_id: int, chunks: Sequence[tuple[str, Sequence[Any]]]
    ) -> dict[int, UidEntry]:
        """The folder's entries matching any of ``chunks``, each a condition and its arguments
        (one query each)."""
        shard = shard_of(account_id)
        pool = await self._router.pool(shard)
        sql = (
            f"SELECT uid, message_key, flags FROM {self._router.table(shard, 'imap_uids')}"
            " WHERE account_id = %s AND folder_id = %s"
        )
        out: dict[int, UidEntry] = {}
        async with pool.acquire() as conn, conn.cursor() as cur:
            for where, args in chunks:
                await cur.execute(sql + where, (account_id, folder_id, *args))
                for r in await cur.fetchall():
                    out[int(r[0])] = UidEntry(int(r[0]), bytes(r[1]).decode(), r[2])
            await conn.commit()
        return out

    async def put_uids(self, account_id: int, folder_id: int, entries: list[UidEntry]) -> None:
        if not entries:
            return
        shard = shard_of(account_id)
        pool = await self._router.pool(shard)
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT 1 FROM {self._router.table(shard, 'erased_accounts')} WHERE account_id = %s",
                (account_id,),
            )
            if await cur.fetchone() is not None:  # erased (libs.erasure): a sync still running writes nothing
                await conn.commit()
                return
            await cur.executemany(
                f"INSERT INTO {self._router.table(shard, 'imap_uids')}"
                " (account_id, folder_id, uid, message_key,"
                " flags) VALUES (%s, %s, %s, %s, %s)"
                " ON DUPLICATE KEY UPDATE message_key = VALUES(message_key),"
                " flags = VALUES(flags)",
                [(account_id, folder_id, e.uid, e.message_key.encode(), e.flags[:500]) for e in entries],
            )
            await conn.commit()

    async def drop_uids(self, account_id: int, folder_id: int, uids: list[int] | None = None) -> None:
        shard = shard_of(account_id)
        pool = await self._router.pool(shard)
        table = self._router.table(shard, "imap_uids")
        async with pool.acquire() as conn, conn.cursor() as cur:
            if uids is None:
                await cur.execute(
                    f"DELETE FROM {table} WHERE account_id = %s AND folder_id = %s", (account_id, folder_id)
                )
            else:
                for i in range(0, len(uids), 1000):
                    chunk = uids[i : i + 1000]
                    marks = ",".join(["%s"] * len(chunk))
                    await cur.execute(
                        f"DELETE FROM {table} WHERE account_id = %s AND folder_id = %s AND uid IN ({marks})",
                        (account_id, folder_id, *chunk),
                    )
            await conn.commit()


_CHUNK = 1000  # values or ranges per query


def _in_chunks(column: str, values: Sequence[Any]) -> list[tuple[str, Sequence[Any]]]:
    return [
        (f" AND {column} IN ({','.join(['%s'] * len(part))})", part)
        for part in (values[i : i + _CHUNK] for i in range(0, len(values), _CHUNK))
    ]


def _naive(when: datetime | None) -> datetime | None:
    """A UTC time as the DATETIME columns hold it (no zone)."""
    return None if when is None else when.astimezone(UTC).replace(tzinfo=None)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)
