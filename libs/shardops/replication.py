"""One MariaDB server's replication state, and the statements that fence and promote it.

Every function takes an open connection of the administrative user (``SET GLOBAL read_only`` and
``STOP SLAVE`` need its privileges) and commits nothing of the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncmy
from asyncmy.cursors import DictCursor

__all__ = [
    "ReplicaStatus",
    "fence",
    "gtid_binlog_pos",
    "promote",
    "replica_status",
    "semi_sync_active",
    "wait_for_gtid",
]


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """What ``SHOW SLAVE STATUS`` says of a replica (``configured`` False: it follows nobody)."""

    configured: bool
    io_running: bool = False
    sql_running: bool = False
    seconds_behind: float | None = None  # None while either thread is stopped
    io_pos: str = ""  # Gtid_IO_Pos: the last GTID received from the primary
    last_error: str = ""

    @property
    def replicating(self) -> bool:
        return self.io_running and self.sql_running


async def _rows(conn: asyncmy.Connection, sql: str, args: Any = None) -> list[dict[str, Any]]:
    async with conn.cursor(DictCursor) as cur:
        await cur.execute(sql, args)
        return list(await cur.fetchall())


async def replica_status(conn: asyncmy.Connection) -> ReplicaStatus:
    rows = await _rows(conn, "SHOW SLAVE STATUS")
    if not rows:
        return ReplicaStatus(configured=False)
    row = rows[0]
    behind = row.get("Seconds_Behind_Master")
    return ReplicaStatus(
        configured=True,
        io_running=row.get("Slave_IO_Running") == "Yes",
        sql_running=row.get("Slave_SQL_Running") == "Yes",
        seconds_behind=None if behind is None else float(behind),
        io_pos=str(row.get("Gtid_IO_Pos") or ""),
        last_error=str(row.get("Last_IO_Error") or row.get("Last_SQL_Error") or ""),
    )


async def gtid_binlog_pos(conn: asyncmy.Connection) -> str:
    rows = await _rows(conn, "SELECT @@gtid_binlog_pos AS pos")
    return str(rows[0]["pos"] or "")


async def semi_sync_active(conn: asyncmy.Connection) -> bool:
    """Whether the primary is waiting for its replica's acknowledgement of every commit now
    (OFF: no replica connected, or the timeout dropped it to asynchronous replication)."""
    rows = await _rows(
        conn,
        "SHOW GLOBAL STATUS WHERE Variable_name IN"
        " ('Rpl_semi_sync_master_status', 'Rpl_semi_sync_master_clients')",
    )
    status = {r["Variable_name"]: r["Value"] for r in rows}
    # the status stays ON with no replica connected until a commit finds none
    return (
        status.get("Rpl_semi_sync_master_status") == "ON"
        and status.get("Rpl_semi_sync_master_clients", "0") != "0"
    )


async def fence(conn: asyncmy.Connection) -> str:
    """Make a primary refuse the services' writes (``read_only``; they see error 1290, which
    persist parks and retries) and return its GTID position: everything it ever committed."""
    async with conn.cursor() as cur:
        await cur.execute("SET GLOBAL read_only = ON")
    return await gtid_binlog_pos(conn)


async def wait_for_gtid(conn: asyncmy.Connection, position: str, timeout_s: float) -> bool:
    """Wait until a replica has applied ``position``; False when ``timeout_s`` ran out first."""
    if not position:
        return True
    rows = await _rows(conn, "SELECT MASTER_GTID_WAIT(%s, %s) AS r", (position, timeout_s))
    return int(rows[0]["r"]) == 0


async def promote(conn: asyncmy.Connection) -> str:
    """Stop following the old primary, forget it and take writes; returns the GTID position the
    new primary starts from. Safe to repeat on a server already promoted."""
    async with conn.cursor() as cur:
        await cur.execute("STOP SLAVE")
        await cur.execute("RESET SLAVE ALL")
        await cur.execute("SET GLOBAL read_only = OFF")
    rows = await _rows(conn, "SELECT @@gtid_current_pos AS pos")
    return str(rows[0]["pos"] or "")
