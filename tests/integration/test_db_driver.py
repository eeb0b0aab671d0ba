"""What the project relies on the MySQL driver (asyncmy) for, against the real server: pooled
connections that are never handed out broken (after a cancelled query, a server-side kill, an
open transaction), the session settings every connection starts with, literals that round-trip,
and the first id of a multi-row INSERT."""

from __future__ import annotations

import asyncio

import asyncmy
import asyncmy.errors
import pytest

from libs.config import DatabaseSettings
from libs.db import _INIT_COMMAND, connect, create_pool
from libs.db.literals import values_sql
from tests.polling import eventually

pytestmark = pytest.mark.integration

# Every character backslash escaping treats specially, and bytes that are not UTF-8.
AWKWARD_TEXT = "a'b\"c\\d\x00e\nf\rg\x1ah%_ é 𝄞"
AWKWARD_BYTES = bytes(range(256))


async def _one_connection_pool(db_settings: DatabaseSettings) -> asyncmy.Pool:
    settings = db_settings.model_copy(update={"db_pool_min_size": 1, "db_pool_max_size": 1})
    return await create_pool(settings, db_settings.global_db_host, db_settings.global_db_port)


async def _thread_id(pool: asyncmy.Pool) -> int:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT CONNECTION_ID()")
        (thread_id,) = await cur.fetchone()
        await conn.commit()
    return int(thread_id)


async def test_a_query_cancelled_mid_read_does_not_come_back_from_the_pool(
    db_settings: DatabaseSettings,
) -> None:
    pool = await _one_connection_pool(db_settings)
    try:
        before = await _thread_id(pool)

        async def slow() -> None:
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute("SELECT SLEEP(30)")
                await cur.fetchall()

        task = asyncio.create_task(slow())
        await eventually(lambda: pool.freesize == 0, 10, "the slow query holds the connection")
        await asyncio.sleep(0.2)  # the query is on the wire
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The only connection was the cancelled one: the pool must open a new one, which
        # answers a query at once (a reused one would still owe the SLEEP's result).
        after = await _thread_id(pool)
        assert after != before
    finally:
        pool.close()
        await pool.wait_closed()


async def test_a_free_connection_killed_by_the_server_is_replaced(db_settings: DatabaseSettings) -> None:
    pool = await _one_connection_pool(db_settings)
    try:
        victim = await _thread_id(pool)
        async with connect(db_settings, db_settings.global_db_host, db_settings.global_db_port) as admin:
            async with admin.cursor() as cur:
                await cur.execute("KILL CONNECTION %s", (victim,))

        async def replaced() -> bool:
            try:
                return await _thread_id(pool) != victim
            except asyncmy.errors.OperationalError:
                return False  # handed out before the close was seen: failed, and discarded

        await eventually(replaced, 10, "a new connection replaces the killed one")
    finally:
        pool.close()
        await pool.wait_closed()


async def test_a_connection_handed_back_inside_a_transaction_is_discarded(
    db_settings: DatabaseSettings,
) -> None:
    pool = await _one_connection_pool(db_settings)
    try:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("START TRANSACTION")
            await cur.execute("SELECT CONNECTION_ID()")
            (first,) = await cur.fetchone()
        assert await _thread_id(pool) != first
    finally:
        pool.close()
        await pool.wait_closed()


async def test_sessions_start_without_notes_autocommit_or_no_backslash_escapes(
    db_settings: DatabaseSettings,
) -> None:
    async with connect(db_settings, db_settings.global_db_host, db_settings.global_db_port) as conn:
        async with conn.cursor() as cur:
            await cur.execute("SELECT @@SESSION.sql_notes, @@SESSION.autocommit, @@SESSION.sql_mode")
            notes, autocommit, mode = await cur.fetchone()
    assert (notes, autocommit) == (0, 0)
    assert "NO_BACKSLASH_ESCAPES" not in mode.split(",")


async def test_literals_round_trip_even_where_the_server_default_has_no_backslash_escapes(
    db_settings: DatabaseSettings,
) -> None:
    host, port = db_settings.global_db_host, db_settings.global_db_port
    # The driver sets sql_mode before it runs init_command: this connection starts as a server
    # whose default mode has NO_BACKSLASH_ESCAPES would start it, then libs.db's init_command runs.
    async with connect(db_settings, host, port) as plain:
        async with plain.cursor() as cur:
            await cur.execute("SELECT @@SESSION.sql_mode")
            (default_mode,) = await cur.fetchone()
    kwargs = {
        "host": host,
        "port": port,
        "user": db_settings.db_user,
        "password": db_settings.db_password,
        "sql_mode": f"'{default_mode},NO_BACKSLASH_ESCAPES'",
    }
    conn = await asyncmy.connect(**kwargs)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT @@SESSION.sql_mode")
            (mode,) = await cur.fetchone()
        assert "NO_BACKSLASH_ESCAPES" in mode.split(",")  # the premise: without libs.db's command
    finally:
        conn.close()
    conn = await asyncmy.connect(**kwargs, init_command=_INIT_COMMAND)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT %s, %s", (AWKWARD_TEXT, AWKWARD_BYTES))
            assert await cur.fetchone() == (AWKWARD_TEXT, AWKWARD_BYTES)
            # persist's own literals (libs.db.literals)
            await cur.execute(f"SELECT * FROM (VALUES {values_sql([(AWKWARD_TEXT, AWKWARD_BYTES)])}) AS t")
            assert await cur.fetchone() == (AWKWARD_TEXT, AWKWARD_BYTES)
    finally:
        conn.close()


async def test_lastrowid_of_a_multi_row_insert_is_its_first_id(db_settings: DatabaseSettings) -> None:
    host, port, schema = db_settings.global_db_host, db_settings.global_db_port, db_settings.global_db_name
    async with connect(db_settings, host, port, db=schema) as conn:
        async with conn.cursor() as cur:
            await cur.execute(
                "CREATE TEMPORARY TABLE driver_ids (id BIGINT AUTO_INCREMENT PRIMARY KEY, v INT)"
                " AUTO_INCREMENT = 1000"
            )
            await cur.execute("INSERT INTO driver_ids (v) VALUES (1), (2), (3)")
            first = cur.lastrowid
            await cur.execute("INSERT INTO driver_ids (v) VALUES (4), (5) RETURNING id, v")
            returned = await cur.fetchall()
            await conn.rollback()
    assert first == 1000
    assert list(returned) == [(1003, 4), (1004, 5)]
