"""MariaDB/MySQL access: connection pools, the guarded insert path and schema migrations.

Exceptions::

    DatabaseError            root of this package's errors
    └── MigrationError       a migration file failed to apply (the version is not recorded)

:class:`libs.ids.ShardBitsMismatch` is raised by :func:`insert_guarded` when the database hands
back an id that does not carry the shard it was written to.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiomysql

from libs.config import DatabaseSettings
from libs.ids import check_shard

__all__ = [
    "DatabaseError",
    "MigrationError",
    "connect",
    "create_pool",
    "insert_guarded",
    "leader_lock_name",
    "shard_schema",
]


class DatabaseError(Exception):
    retriable = False


class MigrationError(DatabaseError):
    pass


def shard_schema(shard: int) -> str:
    """The MySQL schema that holds one logical shard, e.g. ``flightlog_shard_0007``."""
    return f"flightlog_shard_{shard:04d}"


def _conn_kwargs(settings: DatabaseSettings, host: str, port: int) -> dict[str, Any]:
    return {
        "host": host,
        "port": port,
        "user": settings.db_user,
        "password": settings.db_password,
        "charset": "utf8mb4",
        "autocommit": False,
        "connect_timeout": settings.db_connect_timeout_s,
        # Notes ("database exists" after IF NOT EXISTS) are not problems; real warnings still are.
        "init_command": "SET SESSION sql_notes = 0",
    }


async def create_pool(
    settings: DatabaseSettings, host: str, port: int, *, db: str | None = None
) -> aiomysql.Pool:
    kwargs = _conn_kwargs(settings, host, port)
    if db is not None:
        kwargs["db"] = db
    return await aiomysql.create_pool(
        minsize=settings.db_pool_min_size,
        maxsize=settings.db_pool_max_size,
        pool_recycle=3600,
        **kwargs,
    )


@asynccontextmanager
async def connect(
    settings: DatabaseSettings, host: str, port: int, *, db: str | None = None
) -> AsyncIterator[aiomysql.Connection]:
    kwargs = _conn_kwargs(settings, host, port)
    if db is not None:
        kwargs["db"] = db
    conn = await aiomysql.connect(**kwargs)
    try:
        yield conn
    finally:
        conn.close()


async def insert_guarded(
    cur: aiomysql.Cursor, shard: int, sql: str, args: Sequence[Any] | None = None, *, rows: int = 1
) -> int:
    """Run one INSERT into an auto-increment table of ``shard`` and return the first new id.

    Refuses (raises :class:`~libs.ids.ShardBitsMismatch`) when the first or last id of the
    statement does not carry ``shard``: the caller's transaction must then be rolled back, so a
    wrong id is never committed. ``rows`` is how many rows a multi-row INSERT adds; InnoDB gives a
    statement with a known row count consecutive ids.
    """
    await cur.execute(sql, args)
    first = int(cur.lastrowid)
    check_shard(first, shard)
    check_shard(first + rows - 1, shard)
    return first


def leader_lock_name(role: str, global_schema: str) -> str:
    """The ``GET_LOCK`` name that elects one ``role`` leader (the change relay, the webhook
    dispatcher) per deployment. MariaDB's named locks are server-wide, so the name carries the
    deployment's global schema: two deployments sharing a server do not block each other. Names
    are at most 64 characters (MariaDB's limit); a long schema name is hashed."""
    name = f"flightlog.{role}:{global_schema}"
    if len(name) > 64:
        name = f"flightlog.{role}:{hashlib.sha256(global_schema.encode()).hexdigest()[:24]}"
    return name
