"""The services' database user, as the migrations make it: it reads and writes rows in the global
schema and the shard schemas, and cannot create, alter or drop a table or a schema.

The user is one of this test's own, made by :func:`libs.db.migrate.grant_service_user` on the
global server of the local stack (the stack's own development user keeps every privilege), and
dropped at the end. The administrative login here is that development user."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator

import asyncmy
import pytest

from libs.config import AdminDatabaseSettings, DatabaseSettings
from libs.db import MigrationError, connect, shard_schema
from libs.db.migrate import grant_service_user
from libs.shards import ShardMap

pytestmark = pytest.mark.integration

DENIED = {1044, 1142}  # access denied to a schema; a command denied on a table


@pytest.fixture
async def service_user(db_settings: DatabaseSettings) -> AsyncIterator[AdminDatabaseSettings]:
    given = AdminDatabaseSettings(
        admin_db_user=db_settings.db_user,
        admin_db_password=db_settings.db_password,
        db_user=f"test_svc_{uuid.uuid4().hex[:12]}",
        db_password=secrets.token_urlsafe(24),
    )
    admin = given.admin()
    try:
        yield given
    finally:
        async with connect(admin, admin.global_db_host, admin.global_db_port) as conn:
            async with conn.cursor() as cur:
                await cur.execute("DROP USER IF EXISTS %s@%s", (given.db_user, given.db_user_host))
            await conn.commit()


async def _denied(conn: asyncmy.Connection, sql: str) -> None:
    async with conn.cursor() as cur:
        with pytest.raises(asyncmy.errors.Error) as raised:
            await cur.execute(sql)
    assert raised.value.args[0] in DENIED, (sql, raised.value)


async def test_the_services_user_writes_rows_and_cannot_create_or_drop(
    service_user: AdminDatabaseSettings, shard_map: ShardMap
) -> None:
    given = service_user
    admin = given.admin()
    host, port = given.global_db_host, given.global_db_port
    glob = given.global_db_name
    shard = next(
        s for s in shard_map.shards if shard_map.clusters[shard_map.shard_cluster[s]].primary == (host, port)
    )
    schema = shard_schema(shard)
    # Everything the user is refused is tried on scratch objects only: were the grant wrong, the
    # test would fail without dropping anything of the stack's.
    scratch = f"scratch_{uuid.uuid4().hex[:12]}"
    dropped_schema, new_schema = (f"flightlog_shard_test_{uuid.uuid4().hex[:12]}" for _ in range(2))
    async with connect(admin, host, port) as conn:
        await grant_service_user(conn, given)
        await grant_service_user(conn, given)  # again: changes nothing, fails nothing
        async with conn.cursor() as cur:
            await cur.execute(f"CREATE TABLE `{schema}`.`{scratch}` (id INT PRIMARY KEY)")
            await cur.execute(f"CREATE TABLE `{glob}`.`{scratch}` (id INT PRIMARY KEY)")
            await cur.execute(f"CREATE DATABASE `{dropped_schema}`")
    try:
        # the services' login, as a service makes it (DatabaseSettings: db_user, db_password)
        service = DatabaseSettings.model_validate(
            given.model_dump(include=set(DatabaseSettings.model_fields))
        )
        async with connect(service, host, port) as conn:
            async with conn.cursor() as cur:
                await cur.execute(f"SELECT COUNT(*) FROM `{glob}`.shards")
                assert (await cur.fetchone())[0] == len(shard_map.shards)
                await cur.execute(f"INSERT INTO `{schema}`.`{scratch}` (id) VALUES (1), (2)")
                await cur.execute(f"UPDATE `{schema}`.`{scratch}` SET id = 3 WHERE id = 2")
                await cur.execute(f"DELETE FROM `{schema}`.`{scratch}` WHERE id = 1")
                await cur.execute(f"SELECT id FROM `{schema}`.`{scratch}`")
                assert [tuple(row) for row in await cur.fetchall()] == [(3,)]
                await cur.execute(f"UPDATE `{glob}`.shard_map_version SET version = version WHERE id = 1")
            await conn.commit()
            for sql in (
                f"CREATE TABLE `{schema}`.`{scratch}_2` (id INT PRIMARY KEY)",
                f"CREATE TABLE `{glob}`.`{scratch}_2` (id INT PRIMARY KEY)",
                f"CREATE TABLE `{dropped_schema}`.t (id INT PRIMARY KEY)",
                f"DROP TABLE `{schema}`.`{scratch}`",
                f"DROP TABLE `{glob}`.`{scratch}`",
                f"ALTER TABLE `{schema}`.`{scratch}` ADD COLUMN x INT",
                f"TRUNCATE TABLE `{schema}`.`{scratch}`",
                f"CREATE INDEX i ON `{schema}`.`{scratch}` (id)",
                f"CREATE DATABASE `{new_schema}`",
                f"DROP DATABASE `{dropped_schema}`",
                f"GRANT SELECT ON `{glob}`.* TO CURRENT_USER",
            ):
                await _denied(conn, sql)
            async with conn.cursor() as cur:
                # no global privilege: read_only fences this user (READ_ONLY ADMIN or SUPER would not)
                await cur.execute("SHOW GRANTS")
                grants = " ".join(row[0] for row in await cur.fetchall())
            assert "ON *.*" not in grants.replace("USAGE ON *.*", ""), grants
    finally:
        async with connect(admin, host, port) as conn, conn.cursor() as cur:
            for table in (scratch, f"{scratch}_2"):
                await cur.execute(f"DROP TABLE IF EXISTS `{schema}`.`{table}`, `{glob}`.`{table}`")
            for name in (dropped_schema, new_schema):
                await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


async def test_the_services_user_cannot_be_the_admin_user(db_settings: DatabaseSettings) -> None:
    same = AdminDatabaseSettings(admin_db_user=db_settings.db_user, admin_db_password=db_settings.db_password)
    admin = same.admin()
    async with connect(admin, admin.global_db_host, admin.global_db_port) as conn:
        with pytest.raises(MigrationError, match="both 'flightlog'"):
            await grant_service_user(conn, same)
