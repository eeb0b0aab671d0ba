"""Move a logical shard to another cluster while it takes writes (``flightlog shards move``).

A shard is one schema, so a move is a copy of one schema and an update of the map. The copy is
online; only the last step holds writes, and for as short a time as the last changes take:

1. **Snapshot**: ``mariadb-dump --single-transaction --hex-blob`` of the one schema, loaded on
   the target cluster's primary through a pipe (a consistent read view, no lock on the source).
   The source's clock is read just before, as the first watermark.
2. **Catch-up rounds**, writes going on: rows the source changed since the last watermark
   (``updated_at``, which every write of a message moves) are copied again, less a margin for
   transactions that were open across the watermark; append-only tables (``changes``,
   ``accounts``: an auto-increment key and no ``updated_at``) copy the ids above the target's
   highest. Rounds repeat while they still copy many rows.
3. **Fence**: the map marks the shard ``readonly`` (routers that reload raise
   :class:`~libs.shards.ShardReadOnly`, which persist parks), then the source's tables are
   renamed into ``flightlog_moved_shard_NNNN`` in one ``RENAME TABLE``. The rename waits for
   the transactions in flight and is atomic, so from then on no write can land on the source:
   a router still on the old map gets "no such table" (1146), which persist also parks, and
   asks for the map again. Nothing is failed; writes wait on persist-retry.
4. **Last changes and verify**: one more catch-up from the now static copy, then
   :func:`libs.shardops.verify.verify_schema`'s chunk checksums between the fenced copy and the
   target; a row that differs (a delete, a row of a transaction open across a watermark for
   longer than the margin) is copied again by key and the shard verified again. The copy must
   verify clean, or the move is rolled back (tables renamed back, map reopened).
5. **Counters**: every auto-increment counter on the target is raised to the source's, so no id
   is handed out twice, and each is checked for the shard's bits (the MySQL bug #199 guard,
   :func:`libs.db.migrate.ensure_auto_increment` and :func:`libs.ids.check_shard`).
6. **Switch**: in one transaction of the global schema the shard's cluster becomes the target,
   its state ``active`` and the map's version goes up. Parked writes follow the new map.

The write pause is 3 to 6. The fenced copy stays on the old cluster, out of every service's way,
until ``flightlog shards move SHARD --cleanup`` drops it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

import asyncmy

from libs.config import DatabaseSettings
from libs.db import connect, shard_schema
from libs.db.migrate import ensure_auto_increment
from libs.ids import check_shard
from libs.shardops import ShardOpsError, ShardOpsSettings
from libs.shardops.verify import RowDiff, VerifyReport, verify_schema
from libs.shards import Cluster, ShardMap, load_shard_map

__all__ = ["MoveError", "MoveResult", "cleanup_moved", "move_shard", "moved_schema"]

logger = logging.getLogger(__name__)

# A transaction open across a watermark commits rows stamped before it; re-copying this far
# back catches nearly all of them (persist's are milliseconds; the fenced verify catches the
# rest). Longer would only make the fenced round, and so the write pause, longer.
WATERMARK_MARGIN_S: Final = 0.5
CATCH_UP_ROUNDS: Final = 5
SMALL_ROUND_ROWS: Final = 200  # a round this small leaves little for the fenced one: fence now
COPY_BATCH_ROWS: Final = 500
RENAME_LOCK_WAIT_S: Final = 10  # the rename waits this long for transactions in flight


class MoveError(ShardOpsError):
    pass


def moved_schema(shard: int) -> str:
    """Where the fenced source copy waits for ``--cleanup`` (outside ``flightlog_shard_%``, so
    nothing that lists the shard schemas takes it for one)."""
    return f"flightlog_moved_shard_{shard:04d}"


@dataclass(slots=True)
class MoveResult:
    shard: int
    source: str
    target: str
    shard_map_version: int = 0
    snapshot_rows: int = 0
    catch_up_rows: list[int] = field(default_factory=list)  # per round; the last one fenced
    repaired_rows: int = 0  # copied again by key after the fenced verify found them
    verify: VerifyReport | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def write_pause_s(self) -> float:
        """From the fence to the published map (what a writer waits, plus its map reload)."""
        return self.timings_s.get("fenced", 0.0)

    def summary(self) -> str:
        steps = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.timings_s.items())
        rows = "/".join(str(n) for n in self.catch_up_rows)
        return (
            f"shard {self.shard} moved {self.source} -> {self.target} (shard map version"
            f" {self.shard_map_version}); snapshot {self.snapshot_rows} rows, catch-up rounds {rows}"
            f" rows, {self.repaired_rows} repaired; writes fenced {self.write_pause_s * 1000:.0f} ms;"
            f" {steps}"
        )


@dataclass(frozen=True, slots=True)
class _TableInfo:
    name: str
    columns: list[str]
    pk: list[str]
    auto_increment: bool

    @property
    def kind(self) -> str:
        if "updated_at" in self.columns:
            return "updated"
        if self.auto_increment and len(self.pk) == 1:
            return "append"
        return "verify"  # small tables: left to the fenced verify and repair


def _q(name: str) -> str:
    return f"`{name.replace('`', '``')}`"


async def _fetch(conn: asyncmy.Connection, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    async with conn.cursor() as cur:
        await cur.execute(sql, args)
        rows = list(await cur.fetchall())
    await conn.commit()  # a fresh read view for the next statement
    return rows


async def _tables(conn: asyncmy.Connection, schema: str) -> list[_TableInfo]:
    rows = await _fetch(
        conn,
        "SELECT c.TABLE_NAME, c.COLUMN_NAME, c.COLUMN_KEY = 'PRI', c.EXTRA LIKE '%%auto_increment%%'"
        " FROM information_schema.COLUMNS c JOIN information_schema.TABLES t"
        "  ON t.TABLE_SCHEMA = c.TABLE_SCHEMA AND t.TABLE_NAME = c.TABLE_NAME"
        " WHERE c.TABLE_SCHEMA = %s AND t.TABLE_TYPE = 'BASE TABLE'"
        " ORDER BY c.TABLE_NAME, c.ORDINAL_POSITION",
        (schema,),
    )
    out: dict[str, _TableInfo] = {}
    for table, column, is_pk, auto in rows:
        info = out.setdefault(table, _TableInfo(table, [], [], False))
        info.columns.append(column)
        if is_pk:
            info.pk.append(column)
        if auto:
            out[table] = _TableInfo(table, info.columns, info.pk, True)
    return list(out.values())


async def _insert(dst: asyncmy.Connection, ref: str, columns: list[str], rows: list[tuple[Any, ...]]) -> None:
    """REPLACE: a row copied again overwrites its older copy (same primary key)."""
    cols = ", ".join(_q(c) for c in columns)
    marks = "(" + ", ".join(["%s"] * len(columns)) + ")"
    async with dst.cursor() as cur:
        for i in range(0, len(rows), COPY_BATCH_ROWS):
            batch = rows[i : i + COPY_BATCH_ROWS]
            await cur.execute(
                f"REPLACE INTO {ref} ({cols}) VALUES " + ", ".join([marks] * len(batch)),
                [v for r in batch for v in r],
            )
    await dst.commit()


async def _catch_up(
    src: asyncmy.Connection,
    dst: asyncmy.Connection,
    src_schema: str,
    dst_schema: str,
    tables: list[_TableInfo],
    since: datetime,
) -> int:
    copied = 0
    for t in tables:
        cols = ", ".join(_q(c) for c in t.columns)
        src_ref, dst_ref = f"{_q(src_schema)}.{_q(t.name)}", f"{_q(dst_schema)}.{_q(t.name)}"
        if t.kind == "updated":
            rows = await _fetch(
                src,
                f"SELECT {cols} FROM {src_ref} WHERE updated_at >= %s",
                (since - timedelta(seconds=WATERMARK_MARGIN_S),),
            )
        elif t.kind == "append":
            key = _q(t.pk[0])
            (top,) = (await _fetch(dst, f"SELECT COALESCE(MAX({key}), 0) FROM {dst_ref}"))[0]
            rows = await _fetch(src, f"SELECT {cols} FROM {src_ref} WHERE {key} > %s", (int(top),))
        else:
            continue
        if rows:
            await _insert(dst, dst_ref, t.columns, rows)
            copied += len(rows)
    return copied


async def _repair(
    src: asyncmy.Connection,
    dst: asyncmy.Connection,
    src_schema: str,
    dst_schema: str,
    tables: list[_TableInfo],
    diffs: list[RowDiff],
) -> int:
    """Make the target's rows of ``diffs`` the source's: delete them there, copy them again."""
    by_table: dict[str, list[tuple[Any, ...]]] = {}
    for d in diffs:
        by_table.setdefault(d.table, []).append(d.key)
    info = {t.name: t for t in tables}
    for name, keys in by_table.items():
        t = info[name]
        pk = "(" + ", ".join(_q(c) for c in t.pk) + ")"
        mark = "(" + ", ".join(["%s"] * len(t.pk)) + ")"
        for i in range(0, len(keys), COPY_BATCH_ROWS):
            batch = keys[i : i + COPY_BATCH_ROWS]
            where = f"{pk} IN (" + ", ".join([mark] * len(batch)) + ")"
            args = [v for k in batch for v in k]
            cols = ", ".join(_q(c) for c in t.columns)
            rows = await _fetch(src, f"SELECT {cols} FROM {_q(src_schema)}.{_q(name)} WHERE {where}", args)
            async with dst.cursor() as cur:
                await cur.execute(f"DELETE FROM {_q(dst_schema)}.{_q(name)} WHERE {where}", args)
            await dst.commit()
            if rows:
                await _insert(dst, f"{_q(dst_schema)}.{_q(name)}", t.columns, rows)
    return len(diffs)


async def _now(conn: asyncmy.Connection) -> datetime:
    (now,) = (await _fetch(conn, "SELECT NOW(6)"))[0]
    assert isinstance(now, datetime)
    return now


def _tls_options(settings: DatabaseSettings) -> list[str]:
    """The MariaDB client tools' options for the TLS of ``settings`` (verified like libs.db's)."""
    if not settings.db_tls:
        return []
    options = ["--ssl"]
    if settings.db_tls_ca_file is not None:
        options.append(f"--ssl-ca={settings.db_tls_ca_file}")
    if settings.db_tls_verify_hostname:
        options.append("--ssl-verify-server-cert")
    if settings.db_tls_cert_file is not None and settings.db_tls_key_file is not None:
        options += [f"--ssl-cert={settings.db_tls_cert_file}", f"--ssl-key={settings.db_tls_key_file}"]
    return options


async def _snapshot(settings: ShardOpsSettings, source: Cluster, target: Cluster, schema: str) -> None:
    """``mariadb-dump`` of ``schema`` on the source piped into ``mariadb`` on the target."""
    admin = settings.admin()
    env = {**os.environ, "MYSQL_PWD": admin.db_password}  # not on a command line anyone can read
    common = ["-u", admin.db_user, "--default-character-set=utf8mb4", "--protocol=TCP", *_tls_options(admin)]
    read_fd, write_fd = os.pipe()
    try:
        dump = await asyncio.create_subprocess_exec(
            "mariadb-dump", "-h", source.primary_host, "-P", str(source.primary_port), *common,
            "--single-transaction", "--hex-blob", "--skip-lock-tables", "--skip-add-locks",
            "--skip-triggers", "--no-create-db", "--quick", schema,
            stdout=write_fd, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        load = await asyncio.create_subprocess_exec(
            "mariadb", "-h", target.primary_host, "-P", str(target.primary_port), *common, schema,
            stdin=read_fd, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
    finally:
        # the children hold their ends; ours must close so the loader sees the end of the dump
        os.close(read_fd)
        os.close(write_fd)
    (_, dump_err), (_, load_err) = await asyncio.gather(dump.communicate(), load.communicate())
    if dump.returncode or load.returncode:
        raise MoveError(
            f"copying {schema}: mariadb-dump exited {dump.returncode} ({dump_err.decode().strip()[:500]}),"
            f" mariadb exited {load.returncode} ({load_err.decode().strip()[:500]})"
        )


async def _map(settings: ShardOpsSettings) -> ShardMap:
    async with connect(settings, settings.global_db_host, settings.global_db_port) as conn:
        return await load_shard_map(conn, settings.global_db_name)


async def _publish(
    settings: ShardOpsSettings, shard: int, *, cluster_id: int, where_cluster: int, state: str
) -> int:
    """Set the shard's cluster and state, if it is still on ``where_cluster``; bump the version."""
    schema = settings.global_db_name
    async with connect(settings, settings.global_db_host, settings.global_db_port) as conn:
        async with conn.cursor() as cur:
            await cur.execute(f"SELECT version FROM `{schema}`.shard_map_version WHERE id = 1 FOR UPDATE")
            (version,) = await cur.fetchone()
            changed = await cur.execute(
                f"UPDATE `{schema}`.shards SET cluster_id = %s, state = %s"
                " WHERE shard_id = %s AND cluster_id = %s",
                (cluster_id, state, shard, where_cluster),
            )
            if changed != 1:
                await conn.rollback()
                raise MoveError(f"shard {shard} left cluster {where_cluster} in the map meanwhile")
            version = int(version) + 1
            await cur.execute(
                f"UPDATE `{schema}`.shard_map_version SET version = %s WHERE id = 1", (version,)
            )
        await conn.commit()
    return version


async def _rename(conn: asyncmy.Connection, tables: list[_TableInfo], frm: str, to: str) -> None:
    async with conn.cursor() as cur:
        await cur.execute(f"SET SESSION lock_wait_timeout = {RENAME_LOCK_WAIT_S}")
        await cur.execute(f"CREATE DATABASE IF NOT EXISTS {_q(to)}")
        await cur.execute(
            "RENAME TABLE " + ", ".join(f"{_q(frm)}.{_q(t.name)} TO {_q(to)}.{_q(t.name)}" for t in tables)
        )
    await conn.commit()


async def _copy_counters(
    src: asyncmy.Connection, dst: asyncmy.Connection, src_schema: str, dst_schema: str, shard: int
) -> None:
    """The target's counters at least the source's (no id handed out twice), all with the
    shard's bits."""
    query = (
        "SELECT TABLE_NAME, AUTO_INCREMENT FROM information_schema.TABLES"
        " WHERE TABLE_SCHEMA = %s AND AUTO_INCREMENT IS NOT NULL"
    )
    theirs = {t: int(n) for t, n in await _fetch(src, query, (src_schema,))}
    ours = {t: int(n) for t, n in await _fetch(dst, query, (dst_schema,))}
    async with dst.cursor() as cur:
        for table, counter in theirs.items():
            if ours.get(table, 0) < counter:
                await cur.execute(f"ALTER TABLE {_q(dst_schema)}.{_q(table)} AUTO_INCREMENT = {counter}")
    await dst.commit()
    await ensure_auto_increment(dst, shard)
    for table, counter in await _fetch(dst, query, (dst_schema,)):
        check_shard(int(counter), shard)  # raises ShardBitsMismatch: the move is rolled back
        logger.debug("shard %d: %s AUTO_INCREMENT %d", shard, table, counter)


async def move_shard(
    settings: ShardOpsSettings,
    shard: int,
    to: str,
    *,
    chunk_rows: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> MoveResult:
    """Move ``shard`` to the cluster named ``to``; see the module docstring."""
    say = progress or (lambda line: logger.info("%s", line))
    started = time.monotonic()
    shard_map = await _map(settings)
    source = shard_map.cluster_of(shard)
    target = next((c for c in shard_map.clusters.values() if c.name == to), None)
    if target is None:
        raise MoveError(f"no cluster {to!r} in the shard map (version {shard_map.version})")
    if target.cluster_id == source.cluster_id:
        raise MoveError(f"shard {shard} is on cluster {to} already")
    if shard in shard_map.readonly:
        raise MoveError(f"shard {shard} is read-only: another move in progress? (see the README)")
    schema, fenced = shard_schema(shard), moved_schema(shard)
    result = MoveResult(shard, source.name, target.name)
    admin = settings.admin()

    async with connect(admin, *source.primary) as src, connect(admin, *target.primary) as dst:
        if await _fetch(src, "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (fenced,)):
            raise MoveError(f"{fenced} is still on {source.name}: run --cleanup of the last move first")
        if await _fetch(dst, "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s", (schema,)):
            # not in the map there, so nothing reads it: a failed move's leftover
            logger.warning("dropping %s on %s: a leftover of an earlier move", schema, target.name)
        async with dst.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS {_q(schema)}")
            await cur.execute(f"CREATE DATABASE {_q(schema)}")
        await dst.commit()
        tables = await _tables(src, schema)

        mark = time.monotonic()
        watermark = await _now(src)
        await _snapshot(settings, source, target, schema)
        for t in tables:
            (count,) = (await _fetch(dst, f"SELECT COUNT(*) FROM {_q(schema)}.{_q(t.name)}"))[0]
            result.snapshot_rows += int(count)
        result.timings_s["snapshot"] = time.monotonic() - mark
        say(f"snapshot: {result.snapshot_rows} rows in {result.timings_s['snapshot']:.2f} s")

        mark = time.monotonic()
        for _ in range(CATCH_UP_ROUNDS):
            next_mark = await _now(src)
            copied = await _catch_up(src, dst, schema, schema, tables, watermark)
            watermark = next_mark
            previous = result.catch_up_rows[-1] if result.catch_up_rows else None
            result.catch_up_rows.append(copied)
            # small enough, or no longer shrinking: the writes' own rate, which the fence stops
            if copied <= SMALL_ROUND_ROWS or (previous is not None and copied >= previous * 0.8):
                break
        result.timings_s["catch_up"] = time.monotonic() - mark
        say(f"catch-up: {'/'.join(map(str, result.catch_up_rows))} rows")

        fence_at = time.monotonic()
        await _publish(
            settings, shard, cluster_id=source.cluster_id, where_cluster=source.cluster_id, state="readonly"
        )
        try:
            await _rename(src, tables, schema, fenced)
            mark = time.monotonic()
            result.timings_s["fence"] = mark - fence_at
            result.catch_up_rows.append(await _catch_up(src, dst, fenced, schema, tables, watermark))
            result.timings_s["last_changes"] = time.monotonic() - mark

            mark = time.monotonic()

            async def settle() -> None:  # the source is fenced: nothing to wait for
                return None

            report = await verify_schema(
                src, dst, fenced, settle=settle, chunk_rows=chunk_rows, rechecks=0, target_schema=schema
            )
            for _ in range(2):
                if report.ok:
                    break
                result.repaired_rows += await _repair(src, dst, fenced, schema, tables, report.diffs)
                report = await verify_schema(
                    src, dst, fenced, settle=settle, chunk_rows=chunk_rows, rechecks=0, target_schema=schema
                )
            report.schema = schema
            result.verify = report
            result.timings_s["verify"] = time.monotonic() - mark
            if not report.ok:
                raise MoveError(f"the copy of shard {shard} does not verify: {report.lines()[-1]}")
            await _copy_counters(src, dst, fenced, schema, shard)
            result.shard_map_version = await _publish(
                settings, shard, cluster_id=target.cluster_id, where_cluster=source.cluster_id, state="active"
            )
        except BaseException:
            await _roll_back(settings, src, tables, shard, source, schema, fenced)
            raise
        result.timings_s["fenced"] = time.monotonic() - fence_at
    result.timings_s["total"] = time.monotonic() - started
    say(result.summary())
    return result


async def _roll_back(
    settings: ShardOpsSettings,
    src: asyncmy.Connection,
    tables: list[_TableInfo],
    shard: int,
    source: Cluster,
    schema: str,
    fenced: str,
) -> None:
    """Give the source its tables back and reopen the shard there (the target's copy stays,
    unused, and the next move drops it)."""
    logger.error("shard %d: the move failed; giving %s back its tables", shard, source.name)
    if await _fetch(
        src, "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s LIMIT 1", (fenced,)
    ):
        await _rename(src, tables, fenced, schema)
        async with src.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS {_q(fenced)}")
        await src.commit()
    await _publish(
        settings, shard, cluster_id=source.cluster_id, where_cluster=source.cluster_id, state="active"
    )


async def cleanup_moved(settings: ShardOpsSettings, shard: int) -> list[str]:
    """Drop what a move of ``shard`` left on the clusters it is no longer on: the fenced copy,
    and the empty schema it was renamed out of. Returns ``cluster: schema`` of each drop."""
    shard_map = await _map(settings)
    home = shard_map.cluster_of(shard)
    if shard in shard_map.readonly:
        raise MoveError(f"shard {shard} is being moved: clean up after the move")
    dropped = []
    admin = settings.admin()
    for cluster in shard_map.clusters.values():
        if cluster.cluster_id == home.cluster_id:
            continue
        async with connect(admin, *cluster.primary) as conn:
            for schema in (moved_schema(shard), shard_schema(shard)):
                exists = await _fetch(
                    conn, "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (schema,)
                )
                left = await _fetch(
                    conn, "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s LIMIT 1", (schema,)
                )
                if not exists or (schema == shard_schema(shard) and left):
                    continue  # a live schema of that name is not ours to drop
                async with conn.cursor() as cur:
                    await cur.execute(f"DROP DATABASE {_q(schema)}")
                await conn.commit()
                dropped.append(f"{cluster.name}: {schema}")
    return dropped
