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

import asyncmy
from asyncmy.cursors import Cursor

from libs.config import DatabaseSettings
from libs.ids import check_shard
from libs.tls import client_context

__all__ = [
    "DatabaseError",
    "MigrationError",
    "connect",
    "create_pool",
    "insert_guarded",
    "leader_lock_name",
    "shard_schema",
    "union_all",
]


class DatabaseError(Exception):
    retriable = False


class MigrationError(DatabaseError):
    pass


def shard_schema(shard: int) -> str:
    """The MySQL schema that holds one logical shard, e.g. ``flightlog_shard_0007``."""
    return f"flightlog_shard_{shard:04d}"


# Run on every new connection. Notes ("database exists" after IF NOT EXISTS) are not problems (the
# driver logs real warnings on its "asyncmy" logger). NO_BACKSLASH_ESCAPES is taken out of the
# session's sql_mode whatever the server's default: the driver escapes with backslashes (its bytes
# escaping ignores the mode), and so does libs.db.literals (persist's writer).
_INIT_COMMAND = (
    "SET SESSION sql_notes = 0, sql_mode = TRIM(BOTH ',' FROM"
    " REPLACE(CONCAT(',', @@SESSION.sql_mode, ','), ',NO_BACKSLASH_ESCAPES,', ','))"
)


def _conn_kwargs(settings: DatabaseSettings, host: str, port: int) -> dict[str, Any]:
    tls = (
        client_context(
            settings.db_tls_ca_file,
            verify_hostname=settings.db_tls_verify_hostname,
            cert_file=settings.db_tls_cert_file,
            key_file=settings.db_tls_key_file,
        )
        if settings.db_tls
        else None
    )
    return {
        "ssl": tls,
        "host": host,
        "port": port,
        "user": settings.db_user,
        "password": settings.db_password,
        "charset": "utf8mb4",
        "autocommit": False,
        "connect_timeout": settings.db_connect_timeout_s,
        "init_command": _INIT_COMMAND,
    }


async def create_pool(
    settings: DatabaseSettings, host: str, port: int, *, db: str | None = None
) -> asyncmy.Pool:
    """A pool of autocommit-off connections. A connection handed back inside a transaction, or
    one whose query was cancelled mid-read (the driver closes it then), is discarded, not reused;
    a free one whose socket the server closed is replaced when next taken."""
    kwargs = _conn_kwargs(settings, host, port)
    if db is not None:
        kwargs["database"] = db
    return await asyncmy.create_pool(
        minsize=settings.db_pool_min_size,
        maxsize=settings.db_pool_max_size,
        pool_recycle=3600,
        **kwargs,
    )


@asynccontextmanager
async def connect(
    settings: DatabaseSettings, host: str, port: int, *, db: str | None = None
) -> AsyncIterator[asyncmy.Connection]:
    kwargs = _conn_kwargs(settings, host, port)
    if db is not None:
        kwargs["database"] = db
    conn = await asyncmy.connect(**kwargs)
    try:
        yield conn
    finally:
        conn.close()


async def insert_guarded(
    cur: Cursor, shard: int, sql: str, args: Sequence[Any] | None = None, *, rows: int = 1
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


def union_all(selects: Sequence[str]) -> str:
    """One statement of ``selects`` (at least one), read in their order: a server's shards are
    each a schema of their own, and one statement for all of them spares a statement each."""
    return selects[0] if len(selects) == 1 else " UNION ALL ".join(f"({q})" for q in selects)


def leader_lock_name(role: str, global_schema: str) -> str:
    """The ``GET_LOCK`` name that elects one ``role`` leader (the change relay, the webhook
    dispatcher) per deployment. MariaDB's named locks are server-wide, so the name carries the
    deployment's global schema: two deployments sharing a server do not block each other. Names
    are at most 64 characters (MariaDB's limit); a long schema name is hashed."""
    name = f"flightlog.{role}:{global_schema}"
    if len(name) > 64:
        name = f"flightlog.{role}:{hashlib.sha256(global_schema.encode()).hexdigest()[:24]}"
    return name
