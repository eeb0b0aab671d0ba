"""Applications (tenants), their API keys, and accounts placed on shards.

An account is created on a chosen shard (named, or the smallest by measured size) and its id
carries that shard's bits, so everything about it routes by a bit shift. API keys are random,
shown once, and stored as SHA-256 digests.

:class:`AccountDirectory` answers the two questions every request asks ("whose key is this?",
"which application owns this account?") from bounded TTL caches, so the hot path does not hit
MySQL for every request.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from cachetools import TTLCache

from libs.db import insert_guarded
from libs.ids import shard_of
from libs.shards import (
    SIZE_BUCKET_BYTES,
    ShardMap,
    ShardMoved,
    ShardRouter,
    UnknownShard,
    schema_gone,
    shard_sizes,
)

__all__ = [
    "API_KEY_PREFIX",
    "Account",
    "AccountDirectory",
    "ApiKey",
    "Application",
    "application_exists",
    "create_account",
    "create_api_key",
    "create_application",
    "hash_api_key",
    "least_loaded_shard",
    "list_accounts",
    "list_api_keys",
    "revoke_api_key",
]

API_KEY_PREFIX: Final = "flk_"
# How long an account read waits for a shard move to publish where the shard went, after its
# fence renamed the copy the map names: the move's write pause (the last changes copied and
# verified), seconds on a large shard. Past it the read fails with ShardMoved (ingest: 503).
MOVE_WAIT_S: Final = 15.0
MOVE_POLL_S: Final = 0.05


@dataclass(frozen=True, slots=True)
class Application:
    id: int
    name: str


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    application_id: int
    email: str
    provider: str


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as it is stored: never the key itself, only its first characters."""

    id: int
    application_id: int
    key_prefix: str
    created_at: datetime
    revoked_at: datetime | None


def hash_api_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _new_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


_KEY_COLUMNS: Final = "id, application_id, key_prefix, created_at, revoked_at"


def _api_key(row: tuple[object, ...]) -> ApiKey:
    id_, app_id, prefix, created_at, revoked_at = row
    assert isinstance(created_at, datetime)
    assert revoked_at is None or isinstance(revoked_at, datetime)
    return ApiKey(int(str(id_)), int(str(app_id)), str(prefix), created_at, revoked_at)


async def application_exists(router: ShardRouter, application_id: int) -> bool:
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT 1 FROM `{router.global_schema}`.applications WHERE id = %s", (application_id,)
        )
        found = await cur.fetchone()
        await conn.commit()
    return found is not None


async def create_api_key(router: ShardRouter, application_id: int) -> tuple[ApiKey, str]:
    """Add a key to an application; the key is returned once and only its digest is stored."""
    key = _new_key()
    schema = router.global_schema
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        try:
            await cur.execute(
                f"INSERT INTO `{schema}`.api_keys (application_id, key_hash, key_prefix) VALUES (%s, %s, %s)",
                (application_id, hash_api_key(key), key[:12]),
            )
            await cur.execute(
                f"SELECT {_KEY_COLUMNS} FROM `{schema}`.api_keys WHERE id = %s", (cur.lastrowid,)
            )
            row = await cur.fetchone()
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
    return _api_key(row), key


async def list_api_keys(router: ShardRouter, application_id: int) -> list[ApiKey]:
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT {_KEY_COLUMNS} FROM `{router.global_schema}`.api_keys"
            " WHERE application_id = %s ORDER BY id",
            (application_id,),
        )
        rows = await cur.fetchall()
        await conn.commit()
    return [_api_key(r) for r in rows]


async def revoke_api_key(
    router: ShardRouter, application_id: int, key_id: int
) -> tuple[ApiKey, bytes] | None:
    """Revoke one of the application's keys (idempotent); returns it and its digest, None if not its."""
    schema = router.global_schema
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        try:
            await cur.execute(
                f"UPDATE `{schema}`.api_keys SET revoked_at = UTC_TIMESTAMP(6)"
                " WHERE id = %s AND application_id = %s AND revoked_at IS NULL",
                (key_id, application_id),
            )
            await cur.execute(
                f"SELECT {_KEY_COLUMNS}, key_hash FROM `{schema}`.api_keys"
                " WHERE id = %s AND application_id = %s",
                (key_id, application_id),
            )
            row = await cur.fetchone()
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
    return None if row is None else (_api_key(row[:5]), bytes(row[5]))


async def list_accounts(
    router: ShardRouter, application_id: int, *, after_id: int = 0, limit: int = 100
) -> list[Account]:
    """The application's accounts in id order (so in shard order), the first ``limit`` after ``after_id``."""
    found: list[Account] = []
    for shard in router.shard_map.shards:
        if shard < shard_of(after_id) or len(found) >= limit:
            continue
        pool = await router.pool(shard, write=False)
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT id, application_id, email, provider FROM {router.table(shard, 'accounts')}"
                " WHERE application_id = %s AND id > %s ORDER BY id LIMIT %s",
                (application_id, after_id, limit - len(found)),
            )
            rows = await cur.fetchall()
            await conn.commit()
        found.extend(Account(int(r[0]), int(r[1]), r[2], r[3]) for r in rows)
    return found


async def create_application(router: ShardRouter, name: str) -> tuple[Application, str]:
    """Create an application and its first API key; the key is returned once and never stored."""
    key = _new_key()
    schema = router.global_schema
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        try:
            await cur.execute(f"INSERT INTO `{schema}`.applications (name) VALUES (%s)", (name,))
            app_id = int(cur.lastrowid)
            await cur.execute(
                f"INSERT INTO `{schema}`.api_keys (application_id, key_hash, key_prefix) VALUES (%s, %s, %s)",
                (app_id, hash_api_key(key), key[:12]),
            )
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
    return Application(app_id, name), key


async def least_loaded_shard(router: ShardRouter) -> int:
    """The writable shard that is smallest by measured size (data and index bytes, see
    :func:`libs.shards.shard_sizes`). Sizes within :data:`~libs.shards.SIZE_BUCKET_BYTES` of each
    other count as equal (InnoDB's figures move in steps and lag the data); among those the
    fewest accounts win, then the lowest shard id. Read-only shards (moving) take no account."""
    m = router.shard_map

    async def count(shard: int) -> int:
        pool = await router.pool(shard, write=False)
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"SELECT COUNT(*) FROM {router.table(shard, 'accounts')}")
            (n,) = await cur.fetchone()
            await conn.commit()
        return int(n)

    writable = [s for s in m.shards if s not in m.readonly]
    if not writable:
        raise UnknownShard("no writable shard in the shard map")
    sizes = await shard_sizes(router)
    counts = await asyncio.gather(*(count(s) for s in writable))
    return min((sizes.get(s, 0) // SIZE_BUCKET_BYTES, n, s) for s, n in zip(writable, counts, strict=True))[2]


async def create_account(
    router: ShardRouter,
    application_id: int,
    email: str,
    *,
    provider: str = "events",
    shard: int | None = None,
) -> Account:
    if shard is None:
        shard = await least_loaded_shard(router)
    router.shard_map.cluster_of(shard)  # raises UnknownShard for a shard not in the map
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        try:
            account_id = await insert_guarded(
                cur,
                shard,
                f"INSERT INTO {router.table(shard, 'accounts')} (application_id, email, provider)"
                " VALUES (%s, %s, %s)",
                (application_id, email, provider),
            )
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
    return Account(account_id, application_id, email, provider)


class AccountDirectory:
    """Cached look-ups of API keys and account owners: the two questions every request asks.

    Each answer is kept ``ttl_s`` at most, in bounded LRU caches (cachetools' ``TTLCache``), so
    ``ttl_s`` is the longest another process still accepts a key revoked elsewhere; the process
    that revokes a key drops it at once (:meth:`forget_key`). Unknown keys and accounts are kept
    in caches of their own, bounded by ``max_misses``: a client sending a new wrong key with every
    request churns only those, never evicting a key or an account in use, and memory stays
    bounded whatever it sends. The account caches are emptied whenever the shard map's version
    changes (a shard moved or failed over, a shard added or removed).

    :param ttl_s: how long an answer is served from the cache.
    :param max_entries: known keys (and, separately, known accounts) kept at most.
    :param max_misses: unknown keys (and, separately, unknown accounts) kept at most.
    :param timer: the clock of the TTLs (a test's fake clock).
    """

    def __init__(
        self,
        router: ShardRouter,
        ttl_s: float = 30.0,
        *,
        max_entries: int = 50_000,
        max_misses: int = 10_000,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._router = router
        self._keys: TTLCache[bytes, Application] = TTLCache(max_entries, ttl_s, timer)
        self._unknown_keys: TTLCache[bytes, bool] = TTLCache(max_misses, ttl_s, timer)
        self._accounts: TTLCache[int, Account] = TTLCache(max_entries, ttl_s, timer)
        self._unknown_accounts: TTLCache[int, bool] = TTLCache(max_misses, ttl_s, timer)
        self._map_version: int | None = None

    async def application_for_key(self, api_key: str) -> Application | None:
        digest = hash_api_key(api_key)
        app = self._keys.get(digest)
        if app is not None or digest in self._unknown_keys:
            return app
        schema = self._router.global_schema
        async with self._router.global_pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT a.id, a.name FROM `{schema}`.api_keys k JOIN `{schema}`.applications a"
                " ON a.id = k.application_id WHERE k.key_hash = %s AND k.revoked_at IS NULL",
                (digest,),
            )
            row = await cur.fetchone()
            await conn.commit()
        if row is None:
            self._unknown_keys[digest] = True
            return None
        app = self._keys[digest] = Application(int(row[0]), row[1])
        return app

    def cached_application(self, api_key: str) -> Application | None:
        """The application of a key this process knows already, without a look-up; None when
        the key is not cached as known (unknown, or not asked for within the TTL)."""
        return self._keys.get(hash_api_key(api_key))

    def remember_key(self, api_key: str, app: Application) -> None:
        """Answer ``api_key`` with ``app`` from the cache (a benchmark without a database)."""
        self._keys[hash_api_key(api_key)] = app

    def forget_key(self, key_hash: bytes) -> None:
        """Drop a cached key (after its revocation), so this process refuses it at once."""
        self._keys.pop(key_hash, None)

    def _check_map_version(self) -> None:
        version = self._router.shard_map.version
        if version != self._map_version:
            self._accounts.clear()
            self._unknown_accounts.clear()
            self._map_version = version

    def remember_account(self, account: Account) -> None:
        """Answer for ``account`` from the cache (a benchmark without a database)."""
        self._check_map_version()
        self._accounts[account.id] = account

    def forget_account(self, account_id: int) -> None:
        """Drop a cached account (after its erasure), so this process answers 404 at once."""
        self._accounts.pop(account_id, None)

    async def account(self, account_id: int) -> Account | None:
        self._check_map_version()
        account = self._accounts.get(account_id)
        if account is not None or account_id in self._unknown_accounts:
            return account
        shard = shard_of(account_id)
        read_with = self._router.shard_map
        if shard not in read_with.shard_cluster:
            return None
        try:
            row = await self._account_row(shard, account_id)
        except Exception as exc:
            # A move fenced the copy this map points at (its write pause) or finished and dropped
            # it: read again once the map says where the shard is.
            if not schema_gone(exc):
                raise
            if not await self._map_moved_on(shard, read_with):
                raise ShardMoved(f"shard {shard} is not where the shard map says") from exc
            row = await self._account_row(shard, account_id)
        if row is None:
            self._unknown_accounts[account_id] = True
            return None
        account = self._accounts[account_id] = Account(int(row[0]), int(row[1]), row[2], row[3])
        return account

    async def _map_moved_on(self, shard: int, read_with: ShardMap) -> bool:
        """Whether the shard map, within :data:`MOVE_WAIT_S`, moves ``shard`` off the cluster
        ``read_with`` names, or reopens it there (a move rolled back). A move publishes its fence
        (the shard ``readonly``, same cluster) before it renames the source's tables, and the
        new cluster only after the last changes are copied and verified: a map that merely
        changed may still point at the renamed copy."""
        await self._router.reload()
        self._router.request_reload()  # and its reloader polls the map fast for a while
        deadline = time.monotonic() + MOVE_WAIT_S
        while True:
            now = self._router.shard_map
            if now.shard_cluster.get(shard) != read_with.shard_cluster.get(shard) or (
                now.version != read_with.version and shard not in now.readonly
            ):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(MOVE_POLL_S)

    async def _account_row(self, shard: int, account_id: int) -> tuple[Any, ...] | None:
        pool = await self._router.pool(shard, write=False)
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT id, application_id, email, provider FROM {self._router.table(shard, 'accounts')}"
                " WHERE id = %s",
                (account_id,),
            )
            row = await cur.fetchone()
            await conn.commit()
        return None if row is None else tuple(row)

    async def owned_account(self, application_id: int, account_id: int) -> Account | None:
        """The account if it exists and belongs to the application; None otherwise (alike)."""
        account = await self.account(account_id)
        return account if account is not None and account.application_id == application_id else None
