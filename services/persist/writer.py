"""Version-guarded writes of postflight records into one shard, with the change log row.

One transaction per shard batch:

1. lock the rows the batch touches and read their versions (``SELECT ... FOR UPDATE``);
2. ``INSERT ... ON DUPLICATE KEY UPDATE`` where every column takes the new value only when the
   record's version is higher than the stored one (``version`` is assigned last, so the
   conditions compare with the old value);
3. read back ids and versions: a row whose version is now the record's, and was lower or
   missing before, really changed; each such row gets one ``changes`` row;
4. check the shard bits of every id (the bug #199 guard), lock the shard's change order
   (:func:`lock_changes`), insert the change rows and commit.

Replays and reordering therefore change nothing: an equal or lower version is a no-op and
writes no change.

A write fails in one of three ways (:func:`classify`), and the worker treats each differently:

- ``PERMANENT``: this data can never be written, however often it is tried. :class:`UnstorableRecord`
  (a row could not be built: a time outside DATETIME, a key over its bytes, anything raised while
  converting one record), MariaDB's data errors (too long, out of range, incorrect value or
  string, NULL in a NOT NULL column, a failed CHECK such as JSON validity, a packet over
  ``max_allowed_packet``) and JSON encoding errors. The worker isolates the record and dead-letters it.
- ``UNAVAILABLE``: the shard cannot take writes now, whatever the records: lost or refused
  connections, a server shutting down or read-only (a failover), too many connections, access
  denied, a schema that does not match the statement (a shard not yet migrated: pymysql's
  ProgrammingError), a write that timed out, a shard missing from the map or refused by the
  bug #199 guard. None of these is one record's fault, so none may dead-letter one.
- ``TRANSIENT``: the shard answered with an error that may pass (lock wait timeout, deadlock) or
  with one we do not know; retried, and charged to the record when it fails on its own.

Exceptions::

    WriteError              root of this module's errors
    └── UnstorableRecord    one record cannot be turned into a row (permanent); carries the record
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Final

import aiomysql
import orjson
import pymysql

from libs.db import insert_guarded
from libs.events import MAX_KEY_BYTES, MessageDoc, PostflightRecord, storable_utc
from libs.ids import ShardBitsMismatch, check_shard
from libs.shards import ShardRouter, UnknownShard

__all__ = [
    "COMPRESS_MIN_BYTES",
    "Failure",
    "ShardWriteResult",
    "UnstorableRecord",
    "WriteError",
    "classify",
    "decode_body",
    "encode_body",
    "latest_per_message",
    "write_shard",
]

COMPRESS_MIN_BYTES: Final = 256
BODY_RAW: Final = 0
BODY_ZLIB: Final = 1

_CONTENT_COLUMNS: Final = (
    "status", "direction", "channel", "sender", "to_addrs", "cc_addrs", "subject", "snippet",
    "body", "body_encoding", "error_code", "unread", "starred", "folder", "labels", "source",
    "occurred_at", "final_at", "redacted", "deleted",
    "thread_key", "size_bytes", "attachments", "parse_warnings",
)  # fmt: skip
_INSERT_COLUMNS: Final = ("account_id", "message_key", *_CONTENT_COLUMNS, "version")
_ROW_PLACEHOLDER: Final = "(" + ", ".join(["%s"] * len(_INSERT_COLUMNS)) + ")"
_GUARDED_UPDATE: Final = ", ".join(
    [f"{c} = IF(VALUES(version) > version, VALUES({c}), {c})" for c in _CONTENT_COLUMNS]
    + ["version = GREATEST(version, VALUES(version))"]  # last: the IFs above see the old version
)


# MariaDB error numbers (pymysql.constants.ER, plus MariaDB's own) that say the data is at fault.
# pymysql maps some of these to OperationalError, not DataError, so the number decides.
PERMANENT_DB_ERRORS: Final = frozenset({
    1048,  # BAD_NULL_ERROR: NULL in a NOT NULL column
    1153,  # NET_PACKET_TOO_LARGE: over max_allowed_packet (a smaller part may pass)
    1264,  # WARN_DATA_OUT_OF_RANGE
    1265,  # WARN_DATA_TRUNCATED
    1292,  # TRUNCATED_WRONG_VALUE: incorrect datetime value
    1300,  # INVALID_CHARACTER_STRING
    1301,  # WARN_ALLOWED_PACKET_OVERFLOWED
    1366,  # TRUNCATED_WRONG_VALUE_FOR_FIELD: incorrect string value
    1367,  # ILLEGAL_VALUE_FOR_TYPE
    1406,  # DATA_TOO_LONG
    1441,  # DATETIME_FUNCTION_OVERFLOW
    1690,  # DATA_OUT_OF_RANGE (BIGINT UNSIGNED)
    3140,  # MySQL: INVALID_JSON_TEXT
    4025,  # MariaDB: CONSTRAINT_FAILED (the JSON columns' json_valid check)
})  # fmt: skip
# Numbers that say the server cannot take writes now, whatever is written.
UNAVAILABLE_DB_ERRORS: Final = frozenset({
    1040,  # CON_COUNT_ERROR: too many connections
    1044, 1045, 1142,  # access denied (database, user, table)
    1053,  # SERVER_SHUTDOWN
    1290,  # OPTION_PREVENTS_STATEMENT: --read-only, e.g. during a failover
    1836,  # READ_ONLY_MODE
    1927,  # CONNECTION_KILLED
    2002, 2003, 2006, 2013, 2055,  # client: cannot connect, server gone, connection lost
})  # fmt: skip
_UNAVAILABLE_TYPES: Final = (
    pymysql.err.InterfaceError,  # the connection is closed
    pymysql.err.ProgrammingError,  # the schema does not match: no such table or column
    pymysql.err.NotSupportedError,
    TimeoutError,
    OSError,
    UnknownShard,
    ShardBitsMismatch,
)


class Failure(StrEnum):
    PERMANENT = "permanent"  # never writable: isolate and dead-letter
    UNAVAILABLE = "unavailable"  # the shard cannot take writes now: park, not the record's fault
    TRANSIENT = "transient"  # the shard answered with an error that may pass: park and count


class WriteError(Exception):
    retriable: ClassVar[bool] = True


class UnstorableRecord(WriteError):
    """``record`` cannot be turned into a row; ``reason`` says which field and why."""

    retriable = False

    def __init__(self, record: PostflightRecord, reason: str) -> None:
        super().__init__(reason)
        self.record = record
        self.reason = reason


def db_errno(exc: BaseException) -> int | None:
    """The MariaDB (or client) error number of a pymysql error, if it has one."""
    if isinstance(exc, pymysql.err.MySQLError) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


def classify(exc: BaseException) -> Failure:
    """Which kind of failure ``exc`` is; see the module docstring."""
    if isinstance(exc, UnstorableRecord | orjson.JSONEncodeError | pymysql.err.DataError):
        return Failure.PERMANENT
    errno = db_errno(exc)
    if errno in PERMANENT_DB_ERRORS:
        return Failure.PERMANENT
    if errno in UNAVAILABLE_DB_ERRORS or isinstance(exc, _UNAVAILABLE_TYPES):
        return Failure.UNAVAILABLE
    return Failure.TRANSIENT


@dataclass(frozen=True, slots=True)
class ShardWriteResult:
    shard: int
    records: int
    changed: int
    body_bytes_raw: int
    body_bytes_stored: int


def encode_body(text: str | None, html: str | None) -> tuple[bytes | None, int]:
    """Bodies as JSON, zlib-compressed (level 1) when that is smaller; returns (bytes, encoding)."""
    if text is None and html is None:
        return None, BODY_RAW
    raw = orjson.dumps({"text": text, "html": html})
    if len(raw) >= COMPRESS_MIN_BYTES:
        packed = zlib.compress(raw, 1)
        if len(packed) < len(raw):
            return packed, BODY_ZLIB
    return raw, BODY_RAW


def decode_body(data: bytes | None, encoding: int) -> tuple[str | None, str | None]:
    if data is None:
        return None, None
    parsed = orjson.loads(zlib.decompress(data) if encoding == BODY_ZLIB else data)
    return parsed.get("text"), parsed.get("html")


def _utc_naive(name: str, value: datetime | None) -> datetime | None:
    """DATETIME columns hold UTC without a zone; a time they cannot hold is a ValueError.

    Checked again here although the models check it: a record may predate the check, and
    9999-12-31T23:00:00-05:00 is in year 10000 once in UTC, where ``astimezone`` overflows.
    """
    if value is None:
        return None
    try:
        return storable_utc(value).replace(tzinfo=None)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _key(record: PostflightRecord) -> bytes:
    key = record.message_key.encode()
    if len(key) > MAX_KEY_BYTES:
        raise ValueError(f"message_key is {len(key)} bytes in UTF-8; the column holds {MAX_KEY_BYTES}")
    return key


def upsert_statement(table: str, rows: int) -> str:
    """The version-guarded multi-row upsert of ``rows`` messages."""
    return (
        f"INSERT INTO {table} ({', '.join(_INSERT_COLUMNS)}) VALUES "
        + ", ".join([_ROW_PLACEHOLDER] * rows)
        + f" ON DUPLICATE KEY UPDATE {_GUARDED_UPDATE}"
    )


def _json_or_null(items: list[Any]) -> str | None:
    """A JSON array, or NULL for an empty one (the gateway reads both as [])."""
    return orjson.dumps(items).decode() if items else None


def row(record: PostflightRecord) -> tuple[tuple[Any, ...], int, int]:
    """The values of one record's row, raw body bytes and stored body bytes.

    Raises :class:`UnstorableRecord` for a record that no retry could write (whatever went wrong
    while converting it: this is pure code over the record's own data).
    """
    try:
        return _row(record)
    except Exception as exc:
        raise UnstorableRecord(record, f"{type(exc).__name__}: {exc}") from exc


def _row(record: PostflightRecord) -> tuple[tuple[Any, ...], int, int]:
    m: MessageDoc = record.message
    if record.deleted:  # privacy: a deleted message keeps only its tombstone
        body, encoding, raw_len = None, BODY_RAW, 0
        subject = snippet = attachments = None
    else:
        body, encoding = encode_body(m.body_text, m.body_html)
        raw_len = len(orjson.dumps({"text": m.body_text, "html": m.body_html})) if body is not None else 0
        subject, snippet = m.subject, m.snippet
        attachments = _json_or_null([a.model_dump(mode="json") for a in m.attachments])
    values = (
        record.account_id, _key(record),
        m.status, m.direction, m.channel, m.sender,
        orjson.dumps(m.to).decode(), orjson.dumps(m.cc).decode(), subject, snippet,
        body, encoding, m.error_code, m.unread, m.starred, m.folder, orjson.dumps(m.labels).decode(),
        m.source, _utc_naive("occurred_at", m.occurred_at), _utc_naive("final_at", m.final_at),
        m.redacted, record.deleted,
        m.thread_key, m.size_bytes, attachments, _json_or_null(m.parse_warnings),
        record.version,
    )  # fmt: skip
    return values, raw_len, len(body) if body is not None else 0


def latest_per_message(records: Iterable[PostflightRecord]) -> list[PostflightRecord]:
    """Keep the highest version of each message: lower ones would be no-ops anyway."""
    best: dict[tuple[int, str], PostflightRecord] = {}
    for r in records:
        key = (r.account_id, r.message_key)
        if key not in best or r.version > best[key].version:
            best[key] = r
    return list(best.values())


async def _versions(
    cur: aiomysql.Cursor, table: str, keys: Sequence[tuple[int, bytes]], *, lock: bool
) -> dict[tuple[int, bytes], tuple[int, int]]:
    where = ", ".join(["(%s, %s)"] * len(keys))
    args = [v for key in keys for v in key]
    await cur.execute(
        f"SELECT account_id, message_key, id, version FROM {table}"
        f" WHERE (account_id, message_key) IN ({where}){' FOR UPDATE' if lock else ''}",
        args,
    )
    return {(int(a), bytes(k)): (int(i), int(v)) for a, k, i, v in await cur.fetchall()}


async def lock_changes(cur: aiomysql.Cursor, router: ShardRouter, shard: int) -> None:
    """Serialize the shard's change writers so change ids commit in order (see migration 0003).

    Call it right before inserting change rows, in the transaction that inserts them.
    """
    await cur.execute(f"SELECT id FROM {router.table(shard, 'changes_lock')} WHERE id = 1 FOR UPDATE")


async def write_shard(
    router: ShardRouter,
    shard: int,
    records: Sequence[PostflightRecord],
    *,
    lock_wait_timeout_s: int | None = None,
) -> ShardWriteResult:
    """Write one shard's records in one transaction; see the module docstring.

    ``lock_wait_timeout_s`` (whole seconds, as InnoDB takes it) makes a row lock held elsewhere
    an error of the server (1205, ``TRANSIENT``) instead of a wait that the caller's own timeout
    would cut short (``UNAVAILABLE``); None leaves the session's setting.
    """
    records = latest_per_message(records)
    table = router.table(shard, "messages")
    rows = [row(r) for r in records]  # before a connection is taken: UnstorableRecord costs no I/O
    keys = [(r.account_id, r.message_key.encode()) for r in records]
    pool = await router.pool(shard)
    async with pool.acquire() as conn:
        try:
            async with conn.cursor() as cur:
                if lock_wait_timeout_s is not None:
                    await cur.execute("SET SESSION innodb_lock_wait_timeout = %s", (lock_wait_timeout_s,))
                before = await _versions(cur, table, keys, lock=True)
                await cur.execute(
                    upsert_statement(table, len(rows)), [v for values, _, _ in rows for v in values]
                )
                after = await _versions(cur, table, keys, lock=False)
                changes = []
                for record, key in zip(records, keys, strict=True):
                    id_, version = after[key]
                    check_shard(id_, shard)
                    old = before.get(key)
                    if version == record.version and (old is None or old[1] < record.version):
                        kind = "deleted" if record.deleted else ("created" if old is None else "updated")
                        changes.append((record.account_id, "message", id_, kind, record.version))
                if changes:
                    await lock_changes(cur, router, shard)
                    await insert_guarded(
                        cur,
                        shard,
                        f"INSERT INTO {router.table(shard, 'changes')}"
                        " (account_id, object_type, object_id, change_type, version) VALUES "
                        + ", ".join(["(%s, %s, %s, %s, %s)"] * len(changes)),
                        [v for change in changes for v in change],
                        rows=len(changes),
                    )
            await conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):  # a dead connection cannot roll back; it is gone
                await conn.rollback()
            raise
    return ShardWriteResult(
        shard, len(records), len(changes), sum(r[1] for r in rows), sum(r[2] for r in rows)
    )
