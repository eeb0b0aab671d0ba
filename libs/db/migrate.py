"""Versioned, idempotent schema migrations for the global schema and every shard schema.

Migrations are SQL files named ``NNNN_name.sql`` under ``migrations/global`` and
``migrations/shard``. Each schema records what it has applied in ``schema_migrations``; DDL in
MySQL is not transactional, so every statement is written to be safe to run again
(``IF NOT EXISTS``) and the version is recorded only after the whole file applied.

Migrations run as the administrative user (``admin_db_user``); :func:`grant_service_user` makes
the services' user on each server they migrate, with data privileges only (:data:`SERVICE_PRIVILEGES`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import asyncmy

from libs.config import AdminDatabaseSettings
from libs.db import MigrationError, shard_schema
from libs.ids import auto_increment_start

__all__ = [
    "SERVICE_PRIVILEGES",
    "Migration",
    "ensure_auto_increment",
    "grant_service_user",
    "load_migrations",
    "migrate_global",
    "migrate_shard",
]

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")
# What the services' user may do in the global schema and in every shard schema: read and write
# rows. No CREATE, DROP, ALTER, INDEX or GRANT, and no global privilege (READ_ONLY ADMIN or SUPER
# would let a fenced primary take its writes).
SERVICE_PRIVILEGES: Final = "SELECT, INSERT, UPDATE, DELETE"
# Every shard schema, those made later included (`_` escaped: it is a wildcard in grants).
_SHARD_SCHEMAS: Final = r"flightlog\_shard\_%"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def _split_statements(sql: str) -> tuple[str, ...]:
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return tuple(s.strip() for s in "\n".join(lines).split(";") if s.strip())


def load_migrations(kind: str) -> list[Migration]:
    found = []
    for path in sorted((MIGRATIONS_DIR / kind).glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], _split_statements(path.read_text())))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions in {kind}: {versions}")
    return found


async def _apply(conn: asyncmy.Connection, schema: str, kind: str) -> list[int]:
    async with conn.cursor() as cur:
        await cur.execute(
            f"CREATE DATABASE IF NOT EXISTS `{schema}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        )
        await conn.select_db(schema)
        await cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INT UNSIGNED NOT NULL PRIMARY KEY,"
            " name VARCHAR(128) NOT NULL,"
            " applied_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))"
        )
        await cur.execute("SELECT version FROM schema_migrations")
        done = {row[0] for row in await cur.fetchall()}
        applied = []
        for migration in load_migrations(kind):
            if migration.version in done:
                continue
            try:
                for statement in migration.statements:
                    await cur.execute(statement)
            except Exception as exc:
                await conn.rollback()
                raise MigrationError(
                    f"{schema}: migration {migration.version:04d}_{migration.name} failed: {exc}"
                ) from exc
            await cur.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            await conn.commit()
            applied.append(migration.version)
            logger.info("applied %s migration %04d to %s", kind, migration.version, schema)
        return applied


async def grant_service_user(conn: asyncmy.Connection, settings: AdminDatabaseSettings) -> None:
    """Create the services' user on the server of ``conn`` (an administrative connection) if it
    is missing, set its password to ``db_password`` (the settings are the truth: a rotated
    password takes effect here), and grant it :data:`SERVICE_PRIVILEGES` on the global schema and
    every shard schema. Grants only add: a user made elsewhere with more privileges keeps them
    (the local stack's development user has every privilege)."""
    user, host = settings.db_user, settings.db_user_host
    if user == settings.admin_db_user:
        raise MigrationError(
            f"FLIGHTLOG_DB_USER and FLIGHTLOG_ADMIN_DB_USER are both {user!r}: the services need a"
            " user of their own, without the administrative privileges"
        )
    async with conn.cursor() as cur:
        await cur.execute(
            "CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s", (user, host, settings.db_password)
        )
        await cur.execute("ALTER USER %s@%s IDENTIFIED BY %s", (user, host, settings.db_password))
        # `_` and `%` are wildcards in a grant's schema name; `%%` is the driver's literal `%`
        for schema in (settings.global_db_name.replace("_", r"\_"), _SHARD_SCHEMAS):
            pattern = schema.replace("%", "%%")
            await cur.execute(f"GRANT {SERVICE_PRIVILEGES} ON `{pattern}`.* TO %s@%s", (user, host))
    await conn.commit()
    logger.info("services' user %s@%s: %s on the flightlog schemas", user, host, SERVICE_PRIVILEGES)


async def migrate_global(conn: asyncmy.Connection, schema: str) -> list[int]:
    return await _apply(conn, schema, "global")


async def migrate_shard(conn: asyncmy.Connection, shard: int) -> list[int]:
    schema = shard_schema(shard)
    applied = await _apply(conn, schema, "shard")
    await ensure_auto_increment(conn, shard)
    return applied


async def ensure_auto_increment(conn: asyncmy.Connection, shard: int) -> list[str]:
    """Raise every auto-increment counter of the shard to at least ``(shard << 48) + 1``.

    Safe to run at any time: a counter already past the start is left alone. Returns the tables
    that needed repair.
    """
    schema = shard_schema(shard)
    start = auto_increment_start(shard)
    repaired = []
    async with conn.cursor() as cur:
        await cur.execute(
            "SELECT TABLE_NAME, AUTO_INCREMENT FROM information_schema.TABLES"
            " WHERE TABLE_SCHEMA = %s AND AUTO_INCREMENT IS NOT NULL",
            (schema,),
        )
        for table, current in await cur.fetchall():
            if int(current) < start:
                await cur.execute(f"ALTER TABLE `{schema}`.`{table}` AUTO_INCREMENT = {start}")
                repaired.append(table)
    await conn.commit()
    return repaired
