"""One leader per deployment for a role (the change relay, the webhook dispatcher).

Election is a MariaDB named lock (``GET_LOCK``) on a dedicated connection to the global schema's
server: whoever holds it leads, and loses it exactly when that connection dies, so a leader that
hangs or is cut off is replaced without a lease to tune. The others are standbys that try again
every ``standby_poll_s``. A leader's writes that must stop with its leadership go through the
lock's connection (the relay's positions do), so a deposed leader cannot make them any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncmy

from libs.aio import wait_for
from libs.config import DatabaseSettings
from libs.db import connect, leader_lock_name

__all__ = ["lead_until_stopped", "sleep_unless_stopped", "take_lock"]

logger = logging.getLogger(__name__)


async def take_lock(conn: asyncmy.Connection, name: str) -> bool:
    """Whether this connection now holds the named lock (never waits for it)."""
    async with conn.cursor() as cur:
        await cur.execute("SELECT GET_LOCK(%s, 0)", (name,))
        (got,) = await cur.fetchone()
    return bool(got == 1)


async def sleep_unless_stopped(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stopping`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await wait_for(stopping.wait(), max(seconds, 0))


async def lead_until_stopped(
    settings: DatabaseSettings,
    role: str,
    stopping: asyncio.Event,
    lead: Callable[[asyncmy.Connection], Awaitable[None]],
    *,
    standby_poll_s: float,
    error_backoff_s: float,
    on_leading: Callable[[bool], None] | None = None,
) -> None:
    """Run ``lead(conn)`` whenever this process holds the role's lock, until ``stopping`` is set.

    ``lead`` gets the lock's connection and returns when ``stopping`` is set (or raises when it
    can no longer lead: the connection is gone). Then, or on any error, the lock is released by
    closing its connection and the election starts over after ``error_backoff_s``.
    ``on_leading`` hears True when leadership starts and False whenever it may have ended.
    """
    name = leader_lock_name(role, settings.global_db_name)
    while not stopping.is_set():
        try:
            async with connect(settings, settings.global_db_host, settings.global_db_port) as conn:
                if await take_lock(conn, name):
                    logger.info("%s active", role)
                    if on_leading is not None:
                        on_leading(True)
                    await lead(conn)
                else:
                    await sleep_unless_stopped(stopping, standby_poll_s)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s lost or could not take its lock connection; retrying", role)
            await sleep_unless_stopped(stopping, error_backoff_s)
        finally:
            if on_leading is not None:
                on_leading(False)
