"""Webhook endpoints, deliveries and the attempt log in the global schema.

Endpoint secrets are encrypted at rest with Fernet (``FLIGHTLOG_WEBHOOKS_SECRET_KEY``, a
comma-separated key list for rotation: the first key encrypts) and decrypted only to sign.
Every write to ``webhook_endpoints`` bumps ``webhook_endpoints_version`` in the same
transaction, which is how dispatchers notice they must reload.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

from libs.crypto import SecretBox
from libs.shards import ShardRouter
from libs.webhooks import generate_secret

__all__ = [
    "DEFAULT_EVENT_TYPES",
    "DELIVERY_STATES",
    "EVENT_TYPES",
    "ORDERINGS",
    "STATUS_EVENT_TYPES",
    "Attempt",
    "Delivery",
    "Endpoint",
    "NewDelivery",
    "WebhookStore",
    "utcnow",
]

# What an endpoint created without event types subscribes to: every change of every object.
DEFAULT_EVENT_TYPES: Final = (
    "message.created", "message.updated", "message.deleted",
    "thread.created", "thread.updated", "thread.deleted",
)  # fmt: skip
# A change that moved a message to one of these statuses is delivered as this type instead of
# message.created or message.updated, to the endpoints that subscribe to it by name.
STATUS_EVENT_TYPES: Final = {
    "sent": "message.sent", "delivered": "message.delivered",
    "undelivered": "message.undelivered", "failed": "message.failed",
}  # fmt: skip
EVENT_TYPES: Final = (*DEFAULT_EVENT_TYPES, *STATUS_EVENT_TYPES.values())
# How a lane treats an event its receiver refuses permanently; see the dispatcher's docstring.
SKIP_REFUSED: Final = "skip_refused"
STRICT: Final = "strict"
ORDERINGS: Final = (SKIP_REFUSED, STRICT)
DELIVERY_STATES: Final = ("pending", "delivered", "failed", "cancelled")

_ENDPOINT_COLUMNS: Final = (
    "id, application_id, url, description, event_types, account_ids, secret_enc, previous_secret_enc,"
    " previous_secret_expires_at, enabled, disabled_reason, disabled_at, created_at, updated_at, ordering"
)
_DELIVERY_COLUMNS: Final = (
    "id, endpoint_id, account_id, change_id, webhook_id, event_type, payload, state, attempts,"
    " next_attempt_at, last_status, last_error, replay_of, created_at, event_at, finished_at, refusals"
)


def utcnow() -> datetime:
    """Naive UTC, as DATETIME columns hold it."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class Endpoint:
    id: int
    application_id: int
    url: str
    description: str
    event_types: tuple[str, ...]
    account_ids: frozenset[int] | None
    secret: str
    previous_secret: str | None
    previous_secret_expires_at: datetime | None
    enabled: bool
    disabled_reason: str | None
    disabled_at: datetime | None
    created_at: datetime
    updated_at: datetime
    ordering: str = SKIP_REFUSED

    def signing_secrets(self, now: datetime) -> list[str]:
        """The current secret, plus the previous one while its grace period lasts."""
        found = [self.secret]
        if (
            self.previous_secret
            and self.previous_secret_expires_at is not None
            and self.previous_secret_expires_at > now
        ):
            found.append(self.previous_secret)
        return found

    def wants(self, event_type: str, account_id: int) -> bool:
        return event_type in self.event_types and (self.account_ids is None or account_id in self.account_ids)

    def public(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "url": self.url,
            "description": self.description,
            "event_types": list(self.event_types),
            "account_ids": None if self.account_ids is None else sorted(str(a) for a in self.account_ids),
            "ordering": self.ordering,
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "disabled_at": _iso(self.disabled_at),
            "previous_secret_expires_at": _iso(self.previous_secret_expires_at)
            if self.previous_secret
            else None,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class NewDelivery:
    endpoint_id: int
    account_id: int
    change_id: int
    event_type: str
    payload: bytes
    event_at: datetime


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    endpoint_id: int
    account_id: int
    change_id: int
    webhook_id: str
    event_type: str
    payload: bytes
    state: str
    attempts: int
    next_attempt_at: datetime
    last_status: int | None
    last_error: str | None
    replay_of: int | None
    created_at: datetime
    event_at: datetime
    finished_at: datetime | None
    refusals: int = 0  # permanent refusals in a row (4xx but 408 and 429)

    def public(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "endpoint_id": str(self.endpoint_id),
            "account_id": str(self.account_id),
            "change_id": str(self.change_id),
            "webhook_id": self.webhook_id,
            "event_type": self.event_type,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": _iso(self.next_attempt_at) if self.state == "pending" else None,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "replay_of": None if self.replay_of is None else str(self.replay_of),
            "created_at": _iso(self.created_at),
            "event_at": _iso(self.event_at),
            "finished_at": _iso(self.finished_at),
        }


@dataclass(frozen=True, slots=True)
class Attempt:
    attempt: int
    started_at: datetime
    latency_ms: int
    status_code: int | None
    error: str | None
    response_excerpt: bytes | None = field(repr=False)

    def public(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "started_at": _iso(self.started_at),
            "latency_ms": self.latency_ms,
            "status_code": self.status_code,
            "error": self.error,
            "response_excerpt": None
            if self.response_excerpt is None
            else self.response_excerpt.decode("utf-8", "replace"),
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="microseconds") + "Z"


def webhook_id_of(change_id: int) -> str:
    """One id per event, the same on every retry and replay (receivers deduplicate on it)."""
    return f"evt_{change_id}"


class WebhookStore:
    """Database access for the API and the dispatcher.

    :param router: the open shard router (only its global pool is used).
    :param secret_key: comma-separated Fernet keys: the first encrypts endpoint secrets, every
        one decrypts (:class:`libs.crypto.SecretBox`), so the key rotates like the IMAP one.
    """

    def __init__(self, router: ShardRouter, secret_key: str) -> None:
        self._router = router
        self._box = SecretBox(secret_key)

    @property
    def _schema(self) -> str:
        return self._router.global_schema

    def _t(self, name: str) -> str:
        return f"`{self._schema}`.`{name}`"

    def _endpoint(self, row: Sequence[Any]) -> Endpoint:
        accounts = orjson.loads(row[5]) if row[5] is not None else None
        return Endpoint(
            id=int(row[0]),
            application_id=int(row[1]),
            url=row[2],
            description=row[3],
            event_types=tuple(orjson.loads(row[4])),
            account_ids=None if accounts is None else frozenset(int(a) for a in accounts),
            secret=self._box.decrypt(row[6]),
            previous_secret=self._box.decrypt(row[7]) if row[7] is not None else None,
            previous_secret_expires_at=row[8],
            enabled=bool(row[9]),
            disabled_reason=row[10],
            disabled_at=row[11],
            created_at=row[12],
            updated_at=row[13],
            ordering=row[14],
        )

    async def _write(self, sql: str, args: Sequence[Any], *, bump: bool = True) -> int:
        """Run one statement (and the version bump) in a transaction; returns lastrowid."""
        async with self._router.global_pool.acquire() as conn, conn.cursor() as cur:
            try:
                await cur.execute(sql, args)
                rowid = int(cur.lastrowid or 0)
                if bump:
                    await cur.execute(
                        f"UPDATE {self._t('webhook_endpoints_version')} SET version = version + 1"
                    )
                await conn.commit()
            except BaseException:
                await conn.rollback()
                raise
        return rowid

    async def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self._router.global_pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(sql, args)
            rows = await cur.fetchall()
            await conn.commit()
        return list(rows)

    # -- endpoints -------------------------------------------------------------------------

    async def version(self) -> int:
        rows = await self._read(f"SELECT version FROM {self._t('webhook_endpoints_version')} WHERE id = 1")
        return int(rows[0][0])

    async def count_endpoints(self, application_id: int) -> int:
        rows = await self._read(
            f"SELECT COUNT(*) FROM {self._t('webhook_endpoints')} WHERE application_id = %s AND deleted = 0",
            (application_id,),
        )
        return int(rows[0][0])

    async def create_endpoint(
        self,
        application_id: int,
        url: str,
        description: str,
        event_types: Sequence[str],
        account_ids: Iterable[int] | None,
        ordering: str = SKIP_REFUSED,
    ) -> Endpoint:
        secret = generate_secret()
        endpoint_id = await self._write(
            f"INSERT INTO {self._t('webhook_endpoints')}"
            " (application_id, url, description, event_types, account_ids, secret_enc, created_at, ordering)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (
                application_id,
                url,
                description,
                orjson.dumps(list(event_types)).decode(),
                None if account_ids is None else orjson.dumps(sorted(account_ids)).decode(),
                self._box.encrypt(secret),
                utcnow(),  # compared with change times, which the relay gives in UTC
                ordering,
            ),
        )
        endpoint = await self.endpoint(application_id, endpoint_id)
        assert endpoint is not None
        return endpoint

    async def endpoint(self, application_id: int | None, endpoint_id: int) -> Endpoint | None:
        """One endpoint that is not deleted; ``application_id`` None skips the ownership check."""
        where = "id = %s AND deleted = 0" + ("" if application_id is None else " AND application_id = %s")
        args = (endpoint_id,) if application_id is None else (endpoint_id, application_id)
        rows = await self._read(
            f"SELECT {_ENDPOINT_COLUMNS} FROM {self._t('webhook_endpoints')} WHERE {where}", args
        )
        return self._endpoint(rows[0]) if rows else None

    async def endpoints(self, application_id: int | None = None) -> list[Endpoint]:
        where = "deleted = 0" + ("" if application_id is None else " AND application_id = %s")
        rows = await self._read(
            f"SELECT {_ENDPOINT_COLUMNS} FROM {self._t('webhook_endpoints')} WHERE {where} ORDER BY id",
            () if application_id is None else (application_id,),
        )
        return [self._endpoint(r) for r in rows]

    async def update_endpoint(self, endpoint: Endpoint, changes: dict[str, Any]) -> None:
        """``changes`` maps column -> value for url, description, event_types, account_ids, enabled,
        ordering."""
        sets, args = [], []
        for column, value in changes.items():
            if column in ("event_types", "account_ids"):
                value = (
                    None
                    if value is None
                    else orjson.dumps(sorted(value) if column == "account_ids" else list(value)).decode()
                )
            sets.append(f"{column} = %s")
            args.append(value)
            if column == "enabled" and value:
                sets += ["disabled_reason = NULL", "disabled_at = NULL"]
        if sets:
            await self._write(
                f"UPDATE {self._t('webhook_endpoints')} SET {', '.join(sets)} WHERE id = %s",
                [*args, endpoint.id],
            )

    async def rotate_secret(self, endpoint: Endpoint, grace_s: float) -> str:
        secret = generate_secret()
        await self._write(
            f"UPDATE {self._t('webhook_endpoints')} SET previous_secret_enc = secret_enc,"
            " previous_secret_expires_at = %s, secret_enc = %s WHERE id = %s",
            (utcnow() + timedelta(seconds=grace_s), self._box.encrypt(secret), endpoint.id),
        )
        return secret

    async def delete_endpoint(self, endpoint: Endpoint) -> None:
        async with self._router.global_pool.acquire() as conn, conn.cursor() as cur:
            try:
                await cur.execute(
                    f"UPDATE {self._t('webhook_endpoints')} SET deleted = 1, enabled = 0 WHERE id = %s",
                    (endpoint.id,),
                )
                await cur.execute(
                    f"UPDATE {self._t('webhook_deliveries')} SET state = 'cancelled', finished_at = %s"
                    " WHERE endpoint_id = %s AND state = 'pending'",
                    (utcnow(), endpoint.id),
                )
                await cur.execute(f"UPDATE {self._t('webhook_endpoints_version')} SET version = version + 1")
                await conn.commit()
            except BaseException:
                await conn.rollback()
                raise

    async def disable_endpoint(self, endpoint_id: int, reason: str) -> None:
        await self._write(
            f"UPDATE {self._t('webhook_endpoints')} SET enabled = 0, disabled_reason = %s, disabled_at = %s"
            " WHERE id = %s",
            (reason[:1000], utcnow(), endpoint_id),
        )

    # -- deliveries ------------------------------------------------------------------------

    async def insert_deliveries(self, deliveries: Sequence[NewDelivery]) -> None:
        """Record deliveries to make; re-recording one (same endpoint and change) is a no-op. None
        is recorded for an erased account (libs.erasure): its changes may still be in
        flightlog.changes after the erasure removed its deliveries."""
        if not deliveries:
            return
        accounts = sorted({d.account_id for d in deliveries})
        erased = {
            int(r[0])
            for r in await self._read(
                f"SELECT account_id FROM {self._t('account_erasures')}"
                f" WHERE account_id IN ({', '.join(['%s'] * len(accounts))})",
                accounts,
            )
        }
        deliveries = [d for d in deliveries if d.account_id not in erased]
        if not deliveries:
            return
        values = []
        now = utcnow()
        for d in deliveries:
            values += [d.endpoint_id, d.account_id, d.change_id, d.change_id, webhook_id_of(d.change_id),
                       d.event_type, d.payload, d.event_at, now, now]  # fmt: skip
        await self._write(
            f"INSERT IGNORE INTO {self._t('webhook_deliveries')}"
            " (endpoint_id, account_id, change_id, dedupe, webhook_id, event_type, payload, event_at,"
            " created_at, next_attempt_at) VALUES "
            + ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"] * len(deliveries)),
            values,
            bump=False,
        )

    def _delivery(self, row: Sequence[Any]) -> Delivery:
        return Delivery(
            int(row[0]), int(row[1]), int(row[2]), int(row[3]), row[4], row[5], bytes(row[6]), row[7],
            int(row[8]), row[9], row[10], row[11], None if row[12] is None else int(row[12]),
            row[13], row[14], row[15], int(row[16]),
        )  # fmt: skip

    async def pending_lanes(self) -> list[tuple[int, int]]:
        """(endpoint, account) pairs with pending deliveries, of enabled endpoints."""
        rows = await self._read(
            f"SELECT DISTINCT d.endpoint_id, d.account_id FROM {self._t('webhook_deliveries')} d"
            f" JOIN {self._t('webhook_endpoints')} e ON e.id = d.endpoint_id"
            " WHERE d.state = 'pending' AND e.enabled = 1 AND e.deleted = 0"
        )
        return [(int(a), int(b)) for a, b in rows]

    async def lane(self, endpoint_id: int, account_id: int, limit: int) -> list[Delivery]:
        """The first pending deliveries of an (endpoint, account) lane, in the order they must go."""
        rows = await self._read(
            f"SELECT {_DELIVERY_COLUMNS} FROM {self._t('webhook_deliveries')}"
            " WHERE endpoint_id = %s AND account_id = %s AND state = 'pending'"
            " ORDER BY change_id, id LIMIT %s",
            (endpoint_id, account_id, limit),
        )
        return [self._delivery(r) for r in rows]

    async def record_attempt(
        self,
        delivery: Delivery,
        *,
        started_at: datetime,
        latency_ms: int,
        status_code: int | None,
        error: str | None,
        excerpt: bytes | None,
        state: str,
        next_attempt_at: datetime | None,
        refusals: int = 0,
    ) -> None:
        """Log one failed attempt and move the delivery to ``state`` (pending: retried at
        ``next_attempt_at``); ``refusals`` is its new count of permanent refusals in a row."""
        attempt = delivery.attempts + 1
        async with self._router.global_pool.acquire() as conn, conn.cursor() as cur:
            try:
                await cur.execute(
                    f"INSERT INTO {self._t('webhook_attempts')} (delivery_id, endpoint_id, attempt,"
                    " started_at, latency_ms, status_code, error, response_excerpt)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    (delivery.id, delivery.endpoint_id, attempt, started_at, latency_ms, status_code,
                     None if error is None else error[:1000], excerpt),
                )  # fmt: skip
                await cur.execute(
                    f"UPDATE {self._t('webhook_deliveries')} SET attempts = %s, state = %s, last_status = %s,"
                    " last_error = %s, next_attempt_at = COALESCE(%s, next_attempt_at), finished_at = %s,"
                    " refusals = %s WHERE id = %s AND state = 'pending'",
                    (attempt, state, status_code, None if error is None else error[:1000], next_attempt_at,
                     None if state == "pending" else utcnow(), refusals, delivery.id),
                )  # fmt: skip
                await conn.commit()
            except BaseException:
                await conn.rollback()
                raise

    async def record_successes(
        self, done: Sequence[tuple[Delivery, datetime, int, int, bytes | None]]
    ) -> None:
        """Record many delivered attempts (delivery, started_at, latency_ms, status, excerpt) at once."""
        if not done:
            return
        now = utcnow()
        async with self._router.global_pool.acquire() as conn, conn.cursor() as cur:
            try:
                await cur.execute(
                    f"INSERT INTO {self._t('webhook_attempts')} (delivery_id, endpoint_id, attempt,"
                    " started_at, latency_ms, status_code, response_excerpt) VALUES "
                    + ", ".join(["(%s, %s, %s, %s, %s, %s, %s)"] * len(done)),
                    [v for d, started, lat, status, excerpt in done
                     for v in (d.id, d.endpoint_id, d.attempts + 1, started, lat, status, excerpt)],
                )  # fmt: skip
                await cur.executemany(
                    f"UPDATE {self._t('webhook_deliveries')} SET attempts = %s, state = 'delivered',"
                    " last_status = %s, last_error = NULL, finished_at = %s"
                    " WHERE id = %s AND state = 'pending'",
                    [(d.attempts + 1, status, now, d.id) for d, _, _, status, _ in done],
                )
                await conn.commit()
            except BaseException:
                await conn.rollback()
                raise

    async def delivery(self, endpoint_id: int, delivery_id: int) -> tuple[Delivery, list[Attempt]] | None:
        rows = await self._read(
            f"SELECT {_DELIVERY_COLUMNS} FROM {self._t('webhook_deliveries')}"
            " WHERE id = %s AND endpoint_id = %s",
            (delivery_id, endpoint_id),
        )
        if not rows:
            return None
        attempts = await self._read(
            "SELECT attempt, started_at, latency_ms, status_code, error, response_excerpt"
            f" FROM {self._t('webhook_attempts')} WHERE delivery_id = %s ORDER BY id",
            (delivery_id,),
        )
        return self._delivery(rows[0]), [
            Attempt(int(a), s, int(lat), sc, err, None if ex is None else bytes(ex))
            for a, s, lat, sc, err, ex in attempts
        ]

    async def deliveries(
        self, endpoint_id: int, *, state: str | None, before_id: int | None, limit: int
    ) -> list[Delivery]:
        where, args = ["endpoint_id = %s"], [endpoint_id]
        if state is not None:
            where.append("state = %s")
            args.append(state)  # type: ignore[arg-type]
        if before_id is not None:
            where.append("id < %s")
            args.append(before_id)
        rows = await self._read(
            f"SELECT {_DELIVERY_COLUMNS} FROM {self._t('webhook_deliveries')} WHERE {' AND '.join(where)}"
            " ORDER BY id DESC LIMIT %s",
            [*args, limit],
        )
        return [self._delivery(r) for r in rows]

    async def replay(self, endpoint_id: int, delivery_ids: Sequence[int]) -> int:
        """Queue copies of deliveries (same webhook-id and payload) in their lanes, in change order
        among the lane's pending ones. Any state replays: a delivery that failed, after its
        receiver refused it, is sent again as a new delivery with a fresh count of attempts."""
        if not delivery_ids:
            return 0
        placeholders = ", ".join(["%s"] * len(delivery_ids))
        now = utcnow()  # naive UTC like every other time here, not the server's CURRENT_TIMESTAMP
        async with self._router.global_pool.acquire() as conn, conn.cursor() as cur:
            try:
                count = await cur.execute(
                    f"INSERT INTO {self._t('webhook_deliveries')} (endpoint_id, account_id, change_id,"
                    " dedupe, webhook_id, event_type, payload, replay_of, event_at, created_at,"
                    " next_attempt_at)"
                    " SELECT endpoint_id, account_id, change_id, NULL, webhook_id, event_type, payload,"
                    f" COALESCE(replay_of, id), event_at, %s, %s FROM {self._t('webhook_deliveries')}"
                    f" WHERE endpoint_id = %s AND id IN ({placeholders}) ORDER BY id",
                    [now, now, endpoint_id, *delivery_ids],
                )
                await conn.commit()
            except BaseException:
                await conn.rollback()
                raise
        return count

    async def deliveries_between(
        self, endpoint_id: int, since: datetime, until: datetime, limit: int
    ) -> list[int]:
        """Ids of original (not replayed) deliveries created in [since, until)."""
        rows = await self._read(
            f"SELECT id FROM {self._t('webhook_deliveries')} WHERE endpoint_id = %s AND created_at >= %s"
            " AND created_at < %s AND replay_of IS NULL ORDER BY id LIMIT %s",
            (endpoint_id, since, until, limit),
        )
        return [int(r[0]) for r in rows]

    async def prune(self, finished_before: datetime, limit: int = 1000) -> int:
        """Delete up to ``limit`` finished deliveries (and their attempts) older than the cut-off, and
        cancel pending ones as old (an endpoint disabled that long); returns how many rows went."""
        ids = [
            int(r[0])
            for r in await self._read(
                f"SELECT id FROM {self._t('webhook_deliveries')} WHERE state <> 'pending'"
                " AND finished_at < %s LIMIT %s",
                (finished_before, limit),
            )
        ]
        placeholders = ", ".join(["%s"] * len(ids))
        async with self._router.global_pool.acquire() as conn, conn.cursor() as cur:
            try:
                # deliveries of a disabled endpoint wait for it only as long as the log is kept
                expired = await cur.execute(
                    f"UPDATE {self._t('webhook_deliveries')} SET state = 'cancelled', finished_at = %s,"
                    " last_error = 'expired while the endpoint was disabled'"
                    " WHERE state = 'pending' AND created_at < %s LIMIT %s",
                    (utcnow(), finished_before, limit),
                )
                if not ids:
                    await conn.commit()
                    return expired
                await cur.execute(
                    f"DELETE FROM {self._t('webhook_attempts')} WHERE delivery_id IN ({placeholders})", ids
                )
                await cur.execute(
                    f"DELETE FROM {self._t('webhook_deliveries')} WHERE id IN ({placeholders})", ids
                )
                await conn.commit()
            except BaseException:
                await conn.rollback()
                raise
        return expired + len(ids)
