"""Versioned, idempotent schema migrations for the global schema and every shard schema.

Migrations are SQL files named ``NNNN_name.sql`` under ``migrations/global`` and
``migrations/shard``. Each schema records what it has applied in ``schema_migrations``; DDL in
MySQL is not transactional, so every statement is written to be safe to run again
(``IF NOT EXISTS``) and the version is recorded only after the whole file applied.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncmy

from libs.db import MigrationError, shard_schema
from libs.ids import auto_increment_start

__all__ = ["Migration", "ensure_auto_increment", "load_migrations", "migrate_global", "migrate_shard"]

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")


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
