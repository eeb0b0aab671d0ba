"""The outbox of sent mail and the accounts' SMTP servers: the SQL the gateway and the sender share.

The gateway writes a message's row (:meth:`OutboxStore.put`) before it answers 202; the sender
claims due rows with a lease, records each submission before and after the SMTP conversation,
and schedules retries (see ``libs/db/migrations/shard/0210_outbox.sql`` for the states). SMTP
servers are in the global schema (``smtp_accounts``); an account without SMTP credentials of its
own logs in with its IMAP ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import asyncmy.errors
from pydantic_settings import BaseSettings, SettingsConfigDict

from libs.crypto import SecretBox
from libs.ids import shard_of
from libs.sending import SendRequest
from libs.shards import ShardRouter

__all__ = [
    "IdempotencyConflict",
    "OutboxRow",
    "OutboxState",
    "OutboxStore",
    "SmtpAccount",
    "SmtpSettings",
]


class SmtpSettings(BaseSettings):
    """Which SMTP servers an account may name (the gateway) and which CAs their certificates may
    chain to (the sender), as ``ImapAccountsSettings`` does for IMAP."""

    model_config = SettingsConfigDict(env_prefix="FLIGHTLOG_", extra="ignore", frozen=True)

    # PEM certificates trusted besides the system's (the local stack's Postfix uses Dovecot's
    # self-signed certificate); certificates are always verified.
    smtp_tls_ca_file: str | None = None
    # Accounts may name hosts that resolve to loopback or private addresses (the local stack).
    smtp_allow_private_hosts: bool = False
    # The ports an account's SMTP server may use: submission 587 (STARTTLS) and 465 (implicit
    # TLS); the API refuses others, so the platform cannot be pointed at arbitrary services.
    smtp_allowed_ports: tuple[int, ...] = (465, 587)


ER_DUP_ENTRY = 1062  # the key is taken: the idempotency key was used before


class OutboxState(StrEnum):
    PENDING = "pending"
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    FAILED = "failed"


class IdempotencyConflict(Exception):
    """An idempotency key already sent a different message."""


@dataclass(frozen=True, slots=True)
class SmtpAccount:
    account_id: int
    host: str
    port: int
    tls_mode: str
    username: str
    password: str
    reuses_imap_login: bool


@dataclass(frozen=True, slots=True)
class OutboxRow:
    request: SendRequest
    state: OutboxState
    attempts: int
    queue_id: str | None


class OutboxStore:
    """Every method is one short transaction; the sender's writes hold only while its lease does."""

    def __init__(self, router: ShardRouter, box: SecretBox) -> None:
        self._router = router
        self._box = box

    async def _execute(self, shard: int | None, sql: str, args: tuple[Any, ...]) -> tuple[list[Any], int]:
        pool = self._router.global_pool if shard is None else await self._router.pool(shard)
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(sql, args)
            rows = list(await cur.fetchall())
            await conn.commit()
            return rows, int(cur.rowcount)  # type: ignore[call-overload]

    # The SMTP servers (global schema).

    async def set_smtp(
        self,
        account_id: int,
        application_id: int,
        host: str,
        port: int,
        tls_mode: str,
        username: str | None,
        password: str | None,
    ) -> None:
        secret = None if password is None else self._box.encrypt(password)
        await self._execute(
            None,
            f"INSERT INTO `{self._router.global_schema}`.smtp_accounts (account_id, application_id, host,"
            " port, tls_mode, username, password_enc) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON DUPLICATE KEY UPDATE host = VALUES(host), port = VALUES(port),"
            " tls_mode = VALUES(tls_mode), username = VALUES(username), password_enc = VALUES(password_enc)",
            (account_id, application_id, host, port, tls_mode, username, secret),
        )

    async def smtp(self, account_id: int) -> SmtpAccount | None:
        """The account's server and login (its IMAP login when it has none of its own); None when
        it has no server, or no login at all (an IMAP account disconnected since)."""
        g = self._router.global_schema
        rows, _ = await self._execute(
            None,
            f"SELECT s.host, s.port, s.tls_mode, s.username, s.password_enc, i.username, i.password_enc"
            f" FROM `{g}`.smtp_accounts s LEFT JOIN `{g}`.imap_accounts i ON i.account_id = s.account_id"
            " WHERE s.account_id = %s",
            (account_id,),
        )
        if not rows:
            return None
        host, port, tls_mode, user, secret, imap_user, imap_secret = rows[0]
        reuse = user is None
        if reuse:
            user, secret = imap_user, imap_secret
        if not user or not secret:
            return None
        return SmtpAccount(account_id, host, int(port), tls_mode, user, self._box.decrypt(secret), reuse)

    async def smtp_public(self, account_id: int) -> dict[str, Any] | None:
        rows, _ = await self._execute(
            None,
            f"SELECT host, port, tls_mode, username FROM `{self._router.global_schema}`.smtp_accounts"
            " WHERE account_id = %s",
            (account_id,),
        )
        if not rows:
            return None
        host, port, tls_mode, user = rows[0]
        return {
            "host": host,
            "port": int(port),
            "tls_mode": tls_mode,
            "username": user,
            "reuses_imap_login": user is None,
        }

    # The outbox (the account's shard).

    async def put(self, request: SendRequest) -> SendRequest:
        """Store a message to send; the one stored before when its key is known (a repeat of the
        same request), or IdempotencyConflict when that one was different."""
        body = request.model_dump_json().encode()
        # What the client asked for, without what the gateway fixed when it took the request.
        digest = hashlib.sha256(request.message.model_dump_json().encode()).digest()
        shard = shard_of(request.account_id)
        table = self._router.table(shard, "outbox")
        key = request.message_key.encode()
        try:
            await self._execute(
                shard,
                f"INSERT INTO {table} (account_id, message_key, request, request_sha256)"
                " VALUES (%s, %s, %s, %s)",
                (request.account_id, key, body, digest),
            )
            return request
        except asyncmy.errors.IntegrityError as exc:
            if exc.args[0] != ER_DUP_ENTRY:
                raise
        rows, _ = await self._execute(
            shard,
            f"SELECT request, request_sha256 FROM {table} WHERE account_id = %s AND message_key = %s",
            (request.account_id, key),
        )
        if bytes(rows[0][1]) != digest:
            raise IdempotencyConflict(request.message_key)
        return SendRequest.model_validate_json(bytes(rows[0][0]))

    async def row(self, account_id: int, message_key: str) -> OutboxRow | None:
        shard = shard_of(account_id)
        rows, _ = await self._execute(
            shard,
            f"SELECT request, state, attempts, queue_id FROM {self._router.table(shard, 'outbox')}"
            " WHERE account_id = %s AND message_key = %s",
            (account_id, message_key.encode()),
        )
        return _row(rows[0]) if rows else None

    async def claim(self, shard: int, owner: str, lease_s: float, limit: int) -> list[OutboxRow]:
        """Lease up to ``limit`` due rows of the shard to ``owner``: those nobody holds, those
        whose lease ran out, and the owner's own (a restarted sender takes its rows back at once)."""
        table = self._router.table(shard, "outbox")
        due = (
            "state IN ('pending', 'submitting') AND next_attempt_at <= NOW(6)"
            " AND (lease_owner IS NULL OR lease_until < NOW(6) OR lease_owner = %s)"
        )
        _, claimed = await self._execute(
            shard,
            f"UPDATE {table} SET lease_owner = %s, lease_until = NOW(6) + INTERVAL %s MICROSECOND"
            f" WHERE {due} ORDER BY next_attempt_at LIMIT %s",
            (owner, int(lease_s * 1e6), owner, limit),
        )
        if not claimed:
            return []
        rows, _ = await self._execute(
            shard,
            f"SELECT request, state, attempts, queue_id FROM {table}"
            " WHERE lease_owner = %s AND state IN ('pending', 'submitting') AND next_attempt_at <= NOW(6)"
            " ORDER BY next_attempt_at LIMIT %s",
            (owner, limit),
        )
        return [_row(r) for r in rows]

    async def _update(
        self, request: SendRequest, owner: str, assignments: str, args: tuple[Any, ...]
    ) -> bool:
        shard = shard_of(request.account_id)
        _, changed = await self._execute(
            shard,
            f"UPDATE {self._router.table(shard, 'outbox')} SET {assignments}"
            " WHERE account_id = %s AND message_key = %s AND lease_owner = %s",
            (*args, request.account_id, request.message_key.encode(), owner),
        )
        return changed == 1

    async def mark_submitting(self, request: SendRequest, owner: str) -> bool:
        """Record that the end of DATA is about to go: from here the message is never submitted
        again. False when the lease was lost (another sender has the row)."""
        return await self._update(request, owner, "state = 'submitting'", ())

    async def mark_submitted(
        self, request: SendRequest, owner: str, queue_id: str | None, note: str | None
    ) -> None:
        await self._update(
            request,
            owner,
            "state = 'submitted', queue_id = %s, last_error = %s, lease_owner = NULL, lease_until = NULL",
            (queue_id[:255] if queue_id else None, note[:1000] if note else None),
        )

    async def mark_failed(self, request: SendRequest, owner: str, error: str) -> None:
        await self._update(
            request,
            owner,
            "state = 'failed', last_error = %s, lease_owner = NULL, lease_until = NULL",
            (error[:1000],),
        )

    async def defer(self, request: SendRequest, owner: str, error: str, delay_s: float) -> None:
        """Try again after ``delay_s``: the server never took the message (a 4xx or a broken
        connection before the end of DATA)."""
        await self._update(
            request,
            owner,
            "state = 'pending', attempts = attempts + 1, last_error = %s,"
            " next_attempt_at = NOW(6) + INTERVAL %s MICROSECOND, lease_owner = NULL, lease_until = NULL",
            (error[:1000], int(delay_s * 1e6)),
        )


def _row(r: Any) -> OutboxRow:
    return OutboxRow(SendRequest.model_validate_json(bytes(r[0])), OutboxState(r[1]), int(r[2]), r[3])
