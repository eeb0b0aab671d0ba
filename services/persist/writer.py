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
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import aiomysql
import orjson

from libs.db import insert_guarded
from libs.events import MessageDoc, PostflightRecord
from libs.ids import check_shard
from libs.shards import ShardRouter

__all__ = [
    "COMPRESS_MIN_BYTES",
    "ShardWriteResult",
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


def _utc_naive(value: datetime | None) -> datetime | None:
    """DATETIME columns hold UTC without a zone."""
    return None if value is None else value.astimezone(UTC).replace(tzinfo=None)


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
        record.account_id, record.message_key.encode(),
        m.status, m.direction, m.channel, m.sender,
        orjson.dumps(m.to).decode(), orjson.dumps(m.cc).decode(), subject, snippet,
        body, encoding, m.error_code, m.unread, m.starred, m.folder, orjson.dumps(m.labels).decode(),
        m.source, _utc_naive(m.occurred_at), _utc_naive(m.final_at), m.redacted, record.deleted,
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
    router: ShardRouter, shard: int, records: Sequence[PostflightRecord]
) -> ShardWriteResult:
    """Write one shard's records in one transaction; see the module docstring."""
    records = latest_per_message(records)
    table = router.table(shard, "messages")
    rows = [row(r) for r in records]
    keys = [(r.account_id, r.message_key.encode()) for r in records]
    pool = await router.pool(shard)
    async with pool.acquire() as conn:
        try:
            async with conn.cursor() as cur:
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
