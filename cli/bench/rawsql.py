"""The same SQL through each asyncio MySQL driver the bench compares, for the raw figures.

The raw stage's batched upsert and the gateway stage's "same SQL straight to MariaDB" run once per
driver in :data:`DRIVERS`, each over a pool of its own opened with the connection settings the
services use, so a report shows what the fastest client can do beside what the services do.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import resource
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from libs.config import DatabaseSettings

__all__ = ["DRIVERS", "Query", "cpu_s", "driver_version", "raw_pool"]

DRIVERS = ("aiomysql", "asyncmy")

# Runs one statement on a pooled connection, reads every row, commits; returns the rows.
Query = Callable[[str, Sequence[Any]], Awaitable[list[Any]]]


def cpu_s() -> float:
    """This process's CPU time so far (user + sys), in seconds."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def driver_version(driver: str) -> str:
    return importlib.metadata.version(driver)


@asynccontextmanager
async def raw_pool(
    driver: str, settings: DatabaseSettings, host: str, port: int, *, size: int
) -> AsyncIterator[Query]:
    """A :data:`Query` over a pool of ``size`` connections of ``driver`` to ``host:port``."""
    # Both drivers take pymysql's connection keywords and share aiomysql's pool and cursor API;
    # the module is imported here so that a driver missing from the environment fails only this.
    module: Any = importlib.import_module(driver)
    pool = await module.create_pool(
        minsize=1,
        maxsize=size,
        host=host,
        port=port,
        user=settings.db_user,
        password=settings.db_password,
        charset="utf8mb4",
        autocommit=False,
        connect_timeout=max(1, round(settings.db_connect_timeout_s)),
        init_command="SET SESSION sql_notes = 0",
    )

    async def query(sql: str, args: Sequence[Any]) -> list[Any]:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(sql, args)
            rows: list[Any] = await cur.fetchall()
            await conn.commit()
            return rows

    try:
        yield query
    finally:
        pool.close()
        await pool.wait_closed()
