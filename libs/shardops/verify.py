"""Compare two copies of a shard schema: chunked checksums, then a row diff where they differ.

The copies are a cluster's primary and its replica (``flightlog shards verify``) or, for a shard
move, its source and target: the function takes two addresses and does not care which.

The method is Vitess VDiff's, in MariaDB's SQL:

1. every table is cut into chunks of ``chunk_rows`` rows by its primary key, the boundaries read
   from the source (keyset: ``WHERE pk > last ORDER BY pk LIMIT 1 OFFSET chunk_rows - 1``);
2. each chunk is summarised on both sides by ``COUNT(*)`` and the ``BIT_XOR`` of 64 bits of each
   row's MD5 (over every column, NULLs marked, so ``NULL`` and ``''`` differ): the servers do the
   hashing and only two numbers per chunk cross the network;
3. a chunk whose summaries differ is compared again, row by row (primary key and row hash), and
   every row missing on one side or different is reported.

The source keeps taking writes while this runs, so a chunk can differ only because the target
has not applied the last writes yet. Before each comparison ``settle`` (for a replica: wait for
the source's current GTID position) runs, and a mismatch counts only when it is still there
after settling again (``rechecks`` times).

``sample`` compares that many randomly chosen rows per table instead of every chunk: the
sampling verifier of the DynamoDB migration, cheap enough to run often.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncmy

from libs.db import connect, shard_schema
from libs.shardops import ShardOpsError, ShardOpsSettings
from libs.shardops.replication import gtid_binlog_pos, wait_for_gtid
from libs.shards import load_shard_map

__all__ = ["RowDiff", "TableReport", "VerifyReport", "verify_replica", "verify_schema"]

Settle = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RowDiff:
    table: str
    key: tuple[Any, ...]
    kind: str  # missing (not on the target), extra (only on the target), different


@dataclass(slots=True)
class TableReport:
    table: str
    rows: int = 0  # rows of the source compared
    chunks: int = 0
    mismatched_chunks: int = 0
    diffs: list[RowDiff] = field(default_factory=list)


@dataclass(slots=True)
class VerifyReport:
    schema: str
    tables: list[TableReport] = field(default_factory=list)
    sampled: bool = False

    @property
    def diffs(self) -> list[RowDiff]:
        return [d for t in self.tables for d in t.diffs]

    @property
    def ok(self) -> bool:
        return not self.diffs

    def lines(self) -> list[str]:
        how = "sampled rows" if self.sampled else "rows"
        out = [
            f"{t.table}: {t.rows} {how}, {t.chunks} chunks, {t.mismatched_chunks} differing,"
            f" {len(t.diffs)} rows differ"
            for t in self.tables
        ]
        out += [f"  {d.table} {d.kind}: key {', '.join(map(str, d.key))}" for d in self.diffs[:100]]
        if len(self.diffs) > 100:
            out.append(f"  ... and {len(self.diffs) - 100} more")
        out.append(f"{self.schema}: {'no mismatch' if self.ok else f'{len(self.diffs)} rows differ'}")
        return out


async def _fetch(conn: asyncmy.Connection, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    async with conn.cursor() as cur:
        await cur.execute(sql, args)
        rows = list(await cur.fetchall())
    await conn.commit()  # a fresh read view for the next statement: the copies move on
    return rows


async def _tables(conn: asyncmy.Connection, schema: str) -> dict[str, tuple[list[str], list[str]]]:
    """Each base table's (primary key columns, all columns), in their order."""
    rows = await _fetch(
        conn,
        "SELECT c.TABLE_NAME, c.COLUMN_NAME, c.COLUMN_KEY = 'PRI', k.ORDINAL_POSITION"
        " FROM information_schema.COLUMNS c JOIN information_schema.TABLES t"
        "  ON t.TABLE_SCHEMA = c.TABLE_SCHEMA AND t.TABLE_NAME = c.TABLE_NAME"
        " LEFT JOIN information_schema.KEY_COLUMN_USAGE k ON k.TABLE_SCHEMA = c.TABLE_SCHEMA"
        "  AND k.TABLE_NAME = c.TABLE_NAME AND k.COLUMN_NAME = c.COLUMN_NAME"
        "  AND k.CONSTRAINT_NAME = 'PRIMARY'"
        " WHERE c.TABLE_SCHEMA = %s AND t.TABLE_TYPE = 'BASE TABLE'"
        " ORDER BY c.TABLE_NAME, c.ORDINAL_POSITION",
        (schema,),
    )
    tables: dict[str, tuple[list[str], list[str]]] = {}
    keys: dict[str, list[tuple[int, str]]] = {}
    for table, column, is_pk, key_pos in rows:
        tables.setdefault(table, ([], []))[1].append(column)
        if is_pk:
            keys.setdefault(table, []).append((int(key_pos), column))
    for table, (pk, _) in tables.items():
        pk.extend(c for _, c in sorted(keys.get(table, [])))
    return {t: v for t, v in tables.items() if v[0]}  # a table without a key cannot be chunked


def _q(name: str) -> str:
    return f"`{name.replace('`', '``')}`"


def _row_hash(columns: list[str]) -> str:
    values = ", ".join(_q(c) for c in columns)
    nulls = ", ".join(f"ISNULL({_q(c)})" for c in columns)
    return f"MD5(CONCAT_WS('#', {values}, CONCAT({nulls})))"


def _range(pk: list[str], lo: tuple[Any, ...] | None, hi: tuple[Any, ...] | None) -> tuple[str, list[Any]]:
    key = f"({', '.join(_q(c) for c in pk)})"
    marks = f"({', '.join(['%s'] * len(pk))})"
    where, args = [], []
    if lo is not None:
        where.append(f"{key} > {marks}")
        args += list(lo)
    if hi is not None:
        where.append(f"{key} <= {marks}")
        args += list(hi)
    return (" AND ".join(where) or "TRUE"), args


class _Table:
    def __init__(self, schema: str, table: str, pk: list[str], columns: list[str]) -> None:
        self.name, self.pk = table, pk
        self.ref = f"{_q(schema)}.{_q(table)}"
        self.keys = ", ".join(_q(c) for c in pk)
        self.hash = _row_hash(columns)

    async def boundary(
        self, conn: asyncmy.Connection, lo: tuple[Any, ...] | None, n: int
    ) -> tuple[Any, ...] | None:
        where, args = _range(self.pk, lo, None)
        rows = await _fetch(
            conn,
            f"SELECT {self.keys} FROM {self.ref} WHERE {where} ORDER BY {self.keys} LIMIT 1 OFFSET {n - 1}",
            args,
        )
        return tuple(rows[0]) if rows else None

    async def checksum(
        self, conn: asyncmy.Connection, lo: tuple[Any, ...] | None, hi: tuple[Any, ...] | None
    ) -> tuple[int, int]:
        where, args = _range(self.pk, lo, hi)
        rows = await _fetch(
            conn,
            f"SELECT COUNT(*), COALESCE(BIT_XOR(CAST(CONV(LEFT({self.hash}, 16), 16, 10) AS UNSIGNED)), 0)"
            f" FROM {self.ref} WHERE {where}",
            args,
        )
        return int(rows[0][0]), int(rows[0][1])

    async def hashes(
        self, conn: asyncmy.Connection, lo: tuple[Any, ...] | None, hi: tuple[Any, ...] | None
    ) -> dict[tuple[Any, ...], str]:
        where, args = _range(self.pk, lo, hi)
        rows = await _fetch(conn, f"SELECT {self.keys}, {self.hash} FROM {self.ref} WHERE {where}", args)
        n = len(self.pk)
        return {tuple(r[:n]): str(r[n]) for r in rows}

    async def hashes_of(
        self, conn: asyncmy.Connection, keys: list[tuple[Any, ...]]
    ) -> dict[tuple[Any, ...], str]:
        if not keys:
            return {}
        marks = ", ".join([f"({', '.join(['%s'] * len(self.pk))})"] * len(keys))
        rows = await _fetch(
            conn,
            f"SELECT {self.keys}, {self.hash} FROM {self.ref} WHERE ({self.keys}) IN ({marks})",
            [v for k in keys for v in k],
        )
        n = len(self.pk)
        return {tuple(r[:n]): str(r[n]) for r in rows}


def _diff(
    table: str, source: dict[tuple[Any, ...], str], target: dict[tuple[Any, ...], str]
) -> list[RowDiff]:
    out = [RowDiff(table, k, "missing") for k in source if k not in target]
    out += [RowDiff(table, k, "extra") for k in target if k not in source]
    out += [RowDiff(table, k, "different") for k, h in source.items() if k in target and target[k] != h]
    return sorted(out, key=lambda d: tuple(map(str, d.key)))


async def verify_schema(
    source: asyncmy.Connection,
    target: asyncmy.Connection,
    schema: str,
    *,
    settle: Settle,
    chunk_rows: int = 1000,
    sample: int | None = None,
    rechecks: int = 2,
    target_schema: str | None = None,
) -> VerifyReport:
    """Compare ``schema`` on ``source`` and ``target``; see the module docstring.

    ``target_schema``: the target's copy has another name (a shard move compares the source's
    fenced copy with the target's live schema)."""
    report = VerifyReport(schema, sampled=sample is not None)
    for name, (pk, columns) in sorted((await _tables(source, schema)).items()):
        table = _Table(schema, name, pk, columns)
        theirs = _Table(target_schema or schema, name, pk, columns)
        tr = TableReport(name)
        report.tables.append(tr)
        if sample is not None:
            await _sample(source, target, table, theirs, tr, sample, settle, rechecks)
            continue
        lo: tuple[Any, ...] | None = None
        while True:
            hi = await table.boundary(source, lo, chunk_rows)
            await settle()
            count, _ = await _chunk_matches(source, target, table, theirs, lo, hi, tr, settle, rechecks)
            tr.rows += count
            tr.chunks += 1
            if hi is None:
                break
            lo = hi
    return report


async def _chunk_matches(
    source: asyncmy.Connection,
    target: asyncmy.Connection,
    table: _Table,
    theirs: _Table,
    lo: tuple[Any, ...] | None,
    hi: tuple[Any, ...] | None,
    tr: TableReport,
    settle: Settle,
    rechecks: int,
) -> tuple[int, bool]:
    for attempt in range(rechecks + 1):
        ours = await table.checksum(source, lo, hi)
        if ours == await theirs.checksum(target, lo, hi):
            return ours[0], True
        if attempt < rechecks:
            await settle()  # the target may only be behind
    tr.mismatched_chunks += 1
    await settle()
    tr.diffs += _diff(table.name, await table.hashes(source, lo, hi), await theirs.hashes(target, lo, hi))
    return ours[0], False


async def _sample(
    source: asyncmy.Connection,
    target: asyncmy.Connection,
    table: _Table,
    theirs: _Table,
    tr: TableReport,
    n: int,
    settle: Settle,
    rechecks: int,
) -> None:
    """``n`` random rows: random offsets into the key order (distinct, so no row twice)."""
    (total,) = (await _fetch(source, f"SELECT COUNT(*) FROM {table.ref}"))[0]
    offsets = sorted(random.sample(range(int(total)), min(n, int(total))))
    keys = []
    for offset in offsets:
        rows = await _fetch(
            source, f"SELECT {table.keys} FROM {table.ref} ORDER BY {table.keys} LIMIT 1 OFFSET {offset}"
        )
        if rows:
            keys.append(tuple(rows[0]))
    tr.rows, tr.chunks = len(keys), 1 if keys else 0
    diffs: list[RowDiff] = []
    for _ in range(rechecks + 1):
        await settle()
        diffs = _diff(table.name, await table.hashes_of(source, keys), await theirs.hashes_of(target, keys))
        # a key of the sample deleted on the source since is not a difference of the copies
        diffs = [d for d in diffs if d.kind != "extra"]
        if not diffs:
            break
    tr.mismatched_chunks = 1 if diffs else 0
    tr.diffs += diffs


async def verify_replica(
    settings: ShardOpsSettings, shard: int, *, sample: int | None = None, chunk_rows: int = 1000
) -> VerifyReport:
    """Compare ``shard`` on its cluster's primary and replica (``flightlog shards verify``).

    Settling waits until the replica has applied the primary's GTID position of that moment
    (up to ``failover_catch_up_timeout_s``; a replica further behind shows as differences).
    """
    async with connect(settings, settings.global_db_host, settings.global_db_port) as conn:
        shard_map = await load_shard_map(conn, settings.global_db_name)
    cluster = shard_map.cluster_of(shard)
    if cluster.replica == cluster.primary:
        raise ShardOpsError(f"shard {shard}'s cluster {cluster.name} has no replica to compare with")
    admin = settings.admin()
    async with connect(admin, *cluster.primary) as source, connect(admin, *cluster.replica) as target:

        async def settle() -> None:
            await wait_for_gtid(target, await gtid_binlog_pos(source), settings.failover_catch_up_timeout_s)
            await target.commit()

        return await verify_schema(
            source, target, shard_schema(shard), settle=settle, chunk_rows=chunk_rows, sample=sample
        )
