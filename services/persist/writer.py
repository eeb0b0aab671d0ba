"""Version-guarded writes of postflight records into one shard, with the change log row.

A row has two versions (libs.events.PostflightRecord): ``version`` for status, flags and
times, and ``content_version`` for what the message says, because transform drops a final
message's content from its state and later records carry flags without content
(``content_version`` 0). One transaction per shard batch, one statement per step whatever the
number of records (a statement per record was most of persist's time); :func:`write_shards`
writes the batches of one server's shards in one transaction, reading all their accounts in one
statement and taking all their change locks in one (``UNION ALL``, in shard order):

1. read the batch's accounts with a shared lock, and for those without a row the shard's
   ``erased_accounts``, building the rows meanwhile (the client's work beside the server's): the
   records of an erased account are dropped and counted (:mod:`libs.erasure` writes that row,
   then deletes the account's row, which waits for this lock), so a record still in flight cannot
   bring an erased account back;
2. full records: one multi-row ``INSERT ... ON DUPLICATE KEY UPDATE`` (:func:`upsert_statement`)
   where
   - status, flags and times take the record's value only over a lower ``version``;
   - content columns take it only over a lower ``content_version``, and then only where the
     record's value is not NULL (a record never blanks a stored field), so content that arrives
     after a content-less record of a higher version still lands; ``participants`` (an object with
     a member per role) is merged per role under the same rule, since a record carries only the
     roles its content sets;
   - ``redacted`` and ``deleted`` are sticky, and an erased row's erasable columns (subject,
     snippet, body, attachments) stay NULL whatever arrives later and whatever the versions: an
     erasure is for ever;
   - both versions are assigned last (GREATEST), so the conditions above compare with the old
     values (MariaDB assigns left to right, later expressions seeing earlier assignments);
   - the ``prev_*`` columns are assigned first, from the stored values;
   and ``RETURNING`` the state of each row as written and as the statement found it (its
   ``prev_*``; NULL: inserted), in the order of the rows, so a message's first row tells its
   state before the batch without a read of its own (a ``SELECT ... FOR UPDATE`` of the rows
   before the upsert cost a statement per shard transaction);
3. patch records (``record.patch``, a change to a message transform no longer holds): the rows
   only patches touch are locked and read (``SELECT ... FOR UPDATE``); the patches are computed
   in version order against the states so far (:func:`patch_assignments`), so a patch finds the
   row its own batch created, and written as one ``UPDATE`` per patched row (patches are rare:
   they are for messages transform forgot); a patch without a row changes nothing;
4. compare each row's final state with its state before the batch (steps 2 and 3): a row whose
   version or content version went up, or that was newly erased, really changed and gets exactly
   one ``changes`` row (never two for one message in one transaction), with the status it moved
   the message to, if it moved it
   (:func:`status_change`: the webhooks ``message.sent``, ``message.delivered``, ...); the
   threads of the rows that changed (the thread each was in and the one it is in now) are
   recomputed from their messages in one statement, and a thread whose aggregate changed gets a
   ``changes`` row of its own (:mod:`libs.threads`);
5. check the shard bits of every id (the bug #199 guard), lock the shard's change order
   (:func:`lock_changes`), recompute the touched threads (under that lock, see
   :mod:`libs.threads`), insert the change rows in one statement and commit.

Values travel as SQL literals built per type (:func:`libs.db.literals.values_sql`), the text the
driver's escaping would produce, without its generic dispatch per value.

Replays change nothing: a record is a no-op (and writes no change) unless its version, its
content version or its erasure is news to the row. Reordering lands the same row: content of a
lower content version arriving after a higher one only fills the fields still empty (every field
ends with the value of the highest content version that carried one). Such a fill writes no
change row of its own; the records are rare (a late content fill, parked, overtaken by a later
one). Several records of one
message in one batch are written as separate rows of the one statement, content in the order it
was set (:func:`latest_per_message`), so a batch lands as its records would one by one.

A write fails in one of three ways (:func:`classify`), and the worker treats each differently:

- ``PERMANENT``: this data can never be written, however often it is tried. :class:`UnstorableRecord`
  (a row could not be built: a time outside DATETIME, a key over its bytes, anything raised while
  converting one record), MariaDB's data errors (too long, out of range, incorrect value or
  string, NULL in a NOT NULL column, a failed CHECK such as JSON validity, a packet over
  ``max_allowed_packet``) and JSON encoding errors. The worker isolates the record and dead-letters it.
- ``UNAVAILABLE``: the shard cannot take writes now, whatever the records: lost or refused
  connections, a server shutting down or read-only (a failover), too many connections, access
  denied, a schema that does not match the statement (a shard not yet migrated, or moved away:
  the driver's ProgrammingError), a shard fenced read-only for a move (``ShardReadOnly``), a write
  that timed out, a shard missing from the map or refused by the
  bug #199 guard. None of these is one record's fault, so none may dead-letter one.
- ``TRANSIENT``: the shard answered with an error that may pass (lock wait timeout, deadlock) or
  with one we do not know; retried, and charged to the record when it fails on its own.

Exceptions::

    WriteError              root of this module's errors
    └── UnstorableRecord    one record cannot be turned into a row (permanent); carries the record
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Final

import asyncmy.errors
import orjson
from asyncmy.cursors import Cursor
from prometheus_client import Counter

from libs.changelog import lock_changes
from libs.db import union_all
from libs.db.literals import values_sql
from libs.events import MAX_KEY_BYTES, MessageDoc, PostflightRecord, storable_utc
from libs.ids import ShardBitsMismatch, check_shard
from libs.messages import BODY_RAW, CONTENT_COLUMNS, ERASABLE_COLUMNS, FLAG_COLUMNS, FLAG_FIELDS, encode_body
from libs.shards import ShardReadOnly, ShardRouter, UnknownShard
from libs.threads import update_threads
from services.persist.relay import CommittedChange

__all__ = [
    "Failure",
    "RowState",
    "ShardWriteResult",
    "UnstorableRecord",
    "WriteError",
    "change_kind",
    "classify",
    "content_version",
    "erases",
    "latest_per_message",
    "patch_assignments",
    "row",
    "upsert_statement",
    "write_shard",
    "write_shards",
]

_INSERT_COLUMNS: Final = (
    "account_id", "message_key", *FLAG_COLUMNS, *CONTENT_COLUMNS, "redacted", "deleted",
    "content_version", "version",
)  # fmt: skip
_ROW_PLACEHOLDER: Final = "(" + ", ".join(["%s"] * len(_INSERT_COLUMNS)) + ")"
_NEWER: Final = "VALUES(version) > version"
_NEWER_CONTENT: Final = "VALUES(content_version) > content_version"
# Evaluated before redacted and deleted are assigned, so it sees the stored row and the record.
_ERASED: Final = "(redacted OR deleted OR VALUES(redacted) OR VALUES(deleted))"


def _content_update(column: str) -> str:
    if column == "body_encoding":
        # Follows the body it describes: the record's only when the record's body is taken (so it
        # is assigned before the body, and sees the stored one).
        return (
            f"body_encoding = IF({_ERASED}, {BODY_RAW}, IF(VALUES(body) IS NOT NULL AND ({_NEWER_CONTENT}"
            " OR body IS NULL), VALUES(body_encoding), body_encoding))"
        )
    if column == "participants":
        # An object with a member per role: a record carries the roles its content sets (a late
        # event may set cc alone), so newer content replaces the roles it has (JSON_MERGE_PATCH:
        # the second argument's members win) and older content fills only the roles still absent.
        # JSON_MERGE_PATCH of a NULL is NULL, hence the COALESCEs.
        new, old = "VALUES(participants)", "participants"
        return (
            f"participants = IF({_NEWER_CONTENT},"
            f" COALESCE(JSON_MERGE_PATCH({old}, {new}), {new}, {old}),"
            f" COALESCE(JSON_MERGE_PATCH({new}, {old}), {old}, {new}))"
        )
    # Newer content wins where it has a value; older content only fills what is still empty.
    kept = f"IF({_NEWER_CONTENT}, COALESCE(VALUES({column}), {column}), COALESCE({column}, VALUES({column})))"
    if column in ERASABLE_COLUMNS:
        return f"{column} = IF({_ERASED}, NULL, {kept})"
    return f"{column} = {kept}"


_GUARDED_UPDATE: Final = ", ".join(
    [f"{c} = IF({_NEWER}, VALUES({c}), {c})" for c in FLAG_COLUMNS]
    + [_content_update("body_encoding")]
    + [_content_update(c) for c in CONTENT_COLUMNS if c != "body_encoding"]
    + ["redacted = redacted OR VALUES(redacted)", "deleted = deleted OR VALUES(deleted)"]
    # last: every condition above compares with the stored versions
    + ["content_version = GREATEST(content_version, VALUES(content_version))"]
    + ["version = GREATEST(version, VALUES(version))"]
)


# MariaDB error numbers (asyncmy.constants.ER, plus MariaDB's own) that say the data is at fault.
# The driver maps some of these to OperationalError, not DataError, so the number decides.
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
    asyncmy.errors.InterfaceError,  # the connection is closed
    asyncmy.errors.ProgrammingError,  # the schema does not match: no such table or column
    asyncmy.errors.NotSupportedError,
    TimeoutError,
    OSError,
    UnknownShard,
    ShardReadOnly,  # the shard is fenced for a move: park until the map names its new cluster
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
    """The MariaDB (or client) error number of a driver error, if it has one."""
    if isinstance(exc, asyncmy.errors.MySQLError) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


def classify(exc: BaseException) -> Failure:
    """Which kind of failure ``exc`` is; see the module docstring."""
    if isinstance(exc, UnstorableRecord | orjson.JSONEncodeError | asyncmy.errors.DataError):
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
    patches_without_row: int = 0  # patches of messages with no row: nothing to change, not an error
    erased: int = 0  # records of erased accounts: dropped, never written
    committed: Sequence[CommittedChange] = ()  # the change rows, for the change relay


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


def upsert_statement(
    table: str, rows: int, *, rows_sql: str | None = None, keep_previous: bool = False
) -> str:
    """The version-guarded multi-row upsert of ``rows`` messages: placeholders, or the rows'
    literals when ``rows_sql`` is given (:func:`libs.db.literals.values_sql`), as persist sends it.
    ``keep_previous``: a row's ``prev_*`` columns take its state as the statement found it, as
    persist's writer returns them (the bench's raw upsert leaves them out)."""
    update = f"{_KEEP_PREVIOUS}, {_GUARDED_UPDATE}" if keep_previous else _GUARDED_UPDATE
    return (
        f"INSERT INTO {table} ({', '.join(_INSERT_COLUMNS)}) VALUES "
        + (rows_sql if rows_sql is not None else ", ".join([_ROW_PLACEHOLDER] * rows))
        + f" ON DUPLICATE KEY UPDATE {update}"
    )


def _json_or_null(items: list[Any]) -> str | None:
    """A JSON array, or NULL for an empty one (the gateway reads both as [])."""
    return orjson.dumps(items).decode() if items else None


def _participants_json(m: MessageDoc) -> str | None:
    """The ``participants`` column: a member per role the record knows, NULL when it knows none."""
    roles: dict[str, list[dict[str, str | None]]] = {}
    if m.sender is not None:
        roles["from"] = [{"name": m.sender.name, "email": m.sender.email}]
    for role, people in (("to", m.to), ("cc", m.cc), ("bcc", m.bcc), ("reply_to", m.reply_to)):
        if people:
            roles[role] = [{"name": p.name, "email": p.email} for p in people]
    return orjson.dumps(roles).decode() if roles else None


def content_version(record: PostflightRecord) -> int:
    """The version the record's content was set at; records older than the field: their version."""
    return record.version if record.content_version is None else record.content_version


def erases(record: PostflightRecord) -> bool:
    """Whether the record erases the message's content (a full record; for patches see
    :func:`patch_assignments`)."""
    return record.deleted or record.message.redacted


def row(record: PostflightRecord) -> tuple[tuple[Any, ...], int, int]:
    """The values of one full record's row, raw body bytes and stored body bytes.

    Raises :class:`UnstorableRecord` for a record that no retry could write (whatever went wrong
    while converting it: this is pure code over the record's own data).
    """
    try:
        return _row(record)
    except Exception as exc:
        raise UnstorableRecord(record, f"{type(exc).__name__}: {exc}") from exc


def _row(record: PostflightRecord) -> tuple[tuple[Any, ...], int, int]:
    m: MessageDoc = record.message
    version = content_version(record)
    # NULL where the record has nothing to say: the upsert keeps the stored value there.
    body: bytes | None = None
    subject: str | None = None
    snippet: str | None = None
    attachments: str | None = None
    encoding, raw_len = BODY_RAW, 0
    channel: str | None = None
    sender: str | None = None
    to: str | None = None
    cc: str | None = None
    error_code: str | None = None
    thread_key: str | None = None
    size_bytes: int | None = None
    warnings: str | None = None
    participants: str | None = None
    sent_at: datetime | None = None
    message_id: str | None = None
    in_reply_to: str | None = None
    references: str | None = None
    if version > 0:  # 0: a record without content (a flags change); its doc's content is not content
        channel, error_code, thread_key, size_bytes, message_id, in_reply_to = (
            m.channel, m.error_code, m.thread_key, m.size_bytes, m.message_id, m.in_reply_to,
        )  # fmt: skip
        sender = m.sender.email if m.sender is not None else None
        # An empty list is NULL too: transform's doc cannot tell "no recipients" from "not known"
        to = _json_or_null([p.email for p in m.to])
        cc = _json_or_null([p.email for p in m.cc])
        warnings, references = _json_or_null(m.parse_warnings), _json_or_null(m.references)
        participants = _participants_json(m)
        sent_at = _utc_naive("date", m.date)
        if not erases(record):  # privacy: an erased message keeps none of these
            body, encoding = encode_body(m.body_text, m.body_html)
            if body is not None:
                raw_len = len(orjson.dumps({"text": m.body_text, "html": m.body_html}))
            subject, snippet = m.subject, m.snippet
            attachments = _json_or_null([a.model_dump(mode="json") for a in m.attachments])
    values = (
        record.account_id, _key(record),
        m.status, m.direction, m.unread, m.starred, m.folder, orjson.dumps(m.labels).decode(), m.source,
        _utc_naive("occurred_at", m.occurred_at), _utc_naive("final_at", m.final_at),
        channel, sender, to, cc, subject, snippet, body, encoding, error_code, attachments,
        thread_key, size_bytes, warnings, participants, sent_at, message_id, in_reply_to, references,
        m.redacted, record.deleted, version, record.version,
    )  # fmt: skip
    return values, raw_len, len(body) if body is not None else 0


def latest_per_message(records: Iterable[PostflightRecord]) -> list[PostflightRecord]:
    """The full records of each message that can still change its row, in the order to write them.

    Status and flags need only the highest version. Content needs more: a record of a higher
    version may carry none (content version 0) or only part of it, so every content version in
    the batch is kept (one record each, the highest version: records of one content version
    carry the same content), and so is an erasure no kept record makes. A message's records are
    ordered by content version, so the one statement applies them as if they had arrived one by
    one in the order their content was set. Replays (equal versions) keep the first. What is left
    as one record with content under one of a higher version without any (a message stored when
    sent and delivered in one batch) is folded into one record (:func:`_folded`): one row to write.
    """
    grouped: dict[tuple[int, str], list[PostflightRecord]] = {}
    for r in records:
        grouped.setdefault((r.account_id, r.message_key), []).append(r)
    out: list[PostflightRecord] = []
    for group in grouped.values():
        if len(group) == 1:  # the common case, and what the rules below keep of it
            out += group
            continue
        top = max(group, key=lambda r: r.version)  # max keeps the first of equals
        keep = {id(top): top}
        by_content: dict[int, PostflightRecord] = {}
        for r in group:
            cv = content_version(r)
            if cv > 0 and (cv not in by_content or r.version > by_content[cv].version):
                by_content[cv] = r
        keep.update((id(r), r) for r in by_content.values())
        for erasure in ("deleted", "redacted"):
            if not any(_erases_as(r, erasure) for r in keep.values()):
                erasing = [r for r in group if _erases_as(r, erasure)]
                if erasing:
                    last = max(erasing, key=lambda r: r.version)
                    keep[id(last)] = last
        kept = sorted(keep.values(), key=lambda r: (content_version(r), r.version))
        if len(kept) == 2 and content_version(kept[0]) == 0 and not erases(kept[0]) and not erases(kept[1]):
            kept = [_folded(kept[0], kept[1])]
        out += kept
    return out


def _folded(top: PostflightRecord, content: PostflightRecord) -> PostflightRecord:
    """The one record that writes what ``content`` and then ``top`` (of a higher version, without
    content, neither erasing) write: ``top``'s flags and status over ``content``'s content."""
    doc = content.message.model_copy(update={name: getattr(top.message, name) for name in FLAG_FIELDS})
    return top.model_copy(update={"message": doc, "content_version": content_version(content)})


def _erases_as(record: PostflightRecord, erasure: str) -> bool:
    return record.deleted if erasure == "deleted" else record.message.redacted


@dataclass(frozen=True, slots=True)
class RowState:
    """What the writer compares of a stored row: its id, versions and erasure, the thread it is
    in (:mod:`libs.threads`) and its status."""

    id: int
    version: int
    content_version: int
    redacted: bool
    deleted: bool
    thread_key: str | None = None
    status: str | None = None


def change_kind(before: RowState | None, after: RowState) -> str | None:
    """The change a write made to one row (``before`` None: it did not exist), or None."""
    if before is not None and (
        after.version <= before.version
        and after.content_version <= before.content_version
        and after.redacted == before.redacted
        and after.deleted == before.deleted
    ):
        return None
    if after.deleted:
        return "deleted"  # also a row created deleted: it leaves just its tombstone
    return "created" if before is None else "updated"


def status_change(before: RowState | None, after: RowState) -> str | None:
    """The status a change moved its message to (the change row's ``status``), or None when the
    status stayed. Of several records of one message in one batch only the last status is told."""
    if after.deleted or (before is not None and before.status == after.status):
        return None
    return after.status


def patch_assignments(state: RowState, record: PostflightRecord) -> dict[str, Any]:
    """The columns a patch record sets on its stored row (empty: the patch changes nothing).

    Flags are set only over a lower version; an erasure is applied whenever the row is not yet
    erased that way, whatever the versions, because an erasure must never be lost. A patch that
    applies raises the row's version (to the record's, if higher), as a full record does, so a
    reader waiting for the version to move (the gateway's PATCH) sees it land even when the
    flags were already as asked.
    """
    patch = record.patch
    if patch is None:
        raise ValueError("not a patch record")
    out: dict[str, Any] = {}
    flags = patch.flags
    if flags is not None and state.version < record.version:
        for name in ("unread", "starred", "folder"):
            value = getattr(flags, name)
            if value is not None:
                out[name] = value
        if flags.labels is not None:
            out["labels"] = orjson.dumps(flags.labels).decode()
    redact = patch.redacted and not state.redacted
    # record.deleted too: whichever field transform sets, a deletion must not be lost
    delete = (patch.deleted or record.deleted) and not state.deleted
    if redact:
        out["redacted"] = True
    if delete:
        out["deleted"] = True
    if redact or delete:
        out.update(dict.fromkeys(ERASABLE_COLUMNS))
        out["body_encoding"] = BODY_RAW
        out["content_version"] = max(state.content_version, record.version)
    if out:
        out["version"] = max(state.version, record.version)
    return out


_COMPARED: Final = ("version", "content_version", "redacted", "deleted", "thread_key", "status")
_STATE_COLUMNS: Final = f"id, {', '.join(_COMPARED)}"
# Assigned before anything else, so they take the stored values (MariaDB assigns left to right).
_KEEP_PREVIOUS: Final = ", ".join(f"prev_{c} = {c}" for c in _COMPARED)
# Each row's state as written, then as the statement found it (prev_version NULL: inserted).
_RETURNING_STATES: Final = f" RETURNING {_STATE_COLUMNS}, {', '.join(f'prev_{c}' for c in _COMPARED)}"


def _state(values: Sequence[Any]) -> RowState:
    id_, version, cv, redacted, deleted, thread_key, status = values
    return RowState(int(id_), int(version), int(cv), bool(redacted), bool(deleted), thread_key, status)


def _written(values: Sequence[Any]) -> tuple[RowState | None, RowState]:
    """(before, after) of a row from the upsert's RETURNING (before None: it inserted the row)."""
    id_, now, was = values[0], values[1 : 1 + len(_COMPARED)], values[1 + len(_COMPARED) :]
    return (None if was[0] is None else _state((id_, *was))), _state((id_, *now))


async def _states(
    cur: Cursor,
    table: str,
    keys: Sequence[tuple[int, bytes]],
    prefix: str,
) -> dict[tuple[int, bytes], RowState]:
    """The stored states of ``keys``, locked (``FOR UPDATE``) for the rest of the transaction."""
    if not keys:
        return {}
    await cur.execute(
        f"{prefix}SELECT account_id, message_key, {_STATE_COLUMNS} FROM {table}"
        f" WHERE (account_id, message_key) IN ({values_sql(keys)}) FOR UPDATE"
    )
    return {(int(a), bytes(k)): _state(rest) for a, k, *rest in await cur.fetchall()}


def _patched(state: RowState, assignments: dict[str, Any]) -> RowState:
    """The state of a row after an UPDATE of ``assignments`` (constants: no SQL needed to know it)."""
    return RowState(
        state.id,
        assignments.get("version", state.version),
        assignments.get("content_version", state.content_version),
        bool(assignments.get("redacted", state.redacted)),
        bool(assignments.get("deleted", state.deleted)),
        state.thread_key,
        state.status,
    )


def _checked_key(record: PostflightRecord) -> bytes:
    try:
        return _key(record)
    except Exception as exc:
        raise UnstorableRecord(record, f"{type(exc).__name__}: {exc}") from exc


def _lock_wait(timeout_s: int | None) -> str:
    """The prefix that bounds a statement's lock waits (MariaDB's ``SET STATEMENT``): no round
    trip of its own, and nothing left on the pooled connection."""
    return "" if timeout_s is None else f"SET STATEMENT innodb_lock_wait_timeout = {int(timeout_s)} FOR "


ERASED_RECORDS: Final = Counter(
    "flightlog_persist_erased_account_records_total",
    "Postflight records dropped because their account is erased",
)


async def _accounts(
    cur: Cursor, router: ShardRouter, ids: Mapping[int, set[int]], prefix: str
) -> dict[int, tuple[dict[int, int | None], set[int]]]:
    """For each shard of ``ids`` (of one server, read in one statement): the application of each
    of its accounts that has a row, and which of the others are erased.

    The accounts' rows are share-locked for the rest of the transaction: an erasure records the
    account in ``erased_accounts``, then deletes its row, so it waits for this write (and then
    erases what it wrote), or this write finds the record. Accounts with neither (written
    straight to persist, as tests and benchmarks do) are written, without an application."""
    reads = [
        f"SELECT {int(shard)}, id, application_id FROM {router.table(shard, 'accounts')}"
        f" WHERE id IN ({', '.join(str(int(i)) for i in sorted(accounts))}) LOCK IN SHARE MODE"
        for shard, accounts in sorted(ids.items())
        if accounts
    ]
    out: dict[int, tuple[dict[int, int | None], set[int]]] = {shard: ({}, set()) for shard in ids}
    if not reads:
        return out
    await cur.execute(prefix + union_all(reads))
    for shard, account, app in await cur.fetchall():
        out[int(shard)][0][int(account)] = None if app is None else int(app)
    for shard, accounts in sorted(ids.items()):
        applications, gone = out[shard]
        missing = accounts - applications.keys()
        if missing:  # rare: accounts without a row, erased or never made here
            listed = ", ".join(str(int(i)) for i in sorted(missing))
            erased = router.table(shard, "erased_accounts")
            await cur.execute(f"SELECT account_id FROM {erased} WHERE account_id IN ({listed})")
            gone.update(int(r[0]) for r in await cur.fetchall())
    return out


async def _insert_changes(
    cur: Cursor,
    router: ShardRouter,
    shard: int,
    changes: Sequence[tuple[int, str, int, str, int, str | None]],
    applications: dict[int, int | None],
) -> list[CommittedChange]:
    """Insert the change rows in one statement; they are returned as the relay publishes them.
    Every id is checked for the shard's bits (the bug #199 guard, as ``insert_guarded`` does)."""
    await cur.execute(
        f"INSERT INTO {router.table(shard, 'changes')}"
        " (account_id, object_type, object_id, change_type, version, status) VALUES "
        + values_sql(changes)
        + " RETURNING id, UNIX_TIMESTAMP(created_at)"
    )
    returned = await cur.fetchall()
    if len(returned) != len(changes):
        raise RuntimeError(f"the insert of {len(changes)} change rows returned {len(returned)}")
    out = []
    for (id_, created), (account, kind, object_id, change, version, status) in zip(
        returned, changes, strict=True
    ):
        check_shard(int(id_), shard)
        out.append(
            CommittedChange(
                int(id_),
                account,
                applications.get(account),
                kind,
                object_id,
                change,
                version,
                created,
                status,
            )
        )
    return out


@dataclass(slots=True)
class _ShardPart:
    """One shard's part of a transaction: its records, rows and keys, then what writing them found."""

    shard: int
    records: Sequence[PostflightRecord]
    full: list[PostflightRecord]  # latest_per_message
    patches: list[PostflightRecord]  # in version order: of two in one batch the later applies last
    rows: list[tuple[tuple[Any, ...], int, int]] = field(default_factory=list)
    rows_sql: str = ""
    changes: list[tuple[int, str, int, str, int, str | None]] = field(default_factory=list)
    threads: list[tuple[int, str]] = field(default_factory=list)  # of the messages that changed, old and new
    applications: dict[int, int | None] = field(default_factory=dict)
    without_row: int = 0
    erased: int = 0

    def build_rows(self) -> None:
        self.rows = [row(r) for r in self.full]
        self.rows_sql = values_sql(values for values, _, _ in self.rows)


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
    return (await write_shards(router, {shard: records}, lock_wait_timeout_s=lock_wait_timeout_s))[0]


async def write_shards(
    router: ShardRouter,
    records: Mapping[int, Sequence[PostflightRecord]],
    *,
    lock_wait_timeout_s: int | None = None,
) -> list[ShardWriteResult]:
    """Write shards of one server in one transaction (see :func:`write_shard`), in shard order:
    every shard's accounts in one read, every shard's rows (steps 1 to 4), every shard's change
    lock in one read, then every shard's change rows (step 5), and one commit. A commit, with the
    binlog and the semi-sync replica's answer, is the most expensive statement of a shard's write.
    Any shard's failure fails them all: the caller writes them one by one to tell which.
    """
    parts = [
        _ShardPart(
            shard,
            records[shard],
            latest_per_message(r for r in records[shard] if r.patch is None),
            sorted((r for r in records[shard] if r.patch is not None), key=lambda r: r.version),
        )
        for shard in sorted(records)
    ]
    pools = {id(pool): pool for pool in [await router.pool(part.shard) for part in parts]}
    if len(pools) != 1:
        raise ValueError(f"shards {sorted(records)} are not on one server")
    prefix = _lock_wait(lock_wait_timeout_s)  # on every statement that may wait for a lock
    async with next(iter(pools.values())).acquire() as conn:
        try:
            async with conn.cursor() as cur:
                accounts = {p.shard: {r.account_id for r in p.records} for p in parts}
                checking = asyncio.ensure_future(_accounts(cur, router, accounts, prefix))
                await asyncio.sleep(0)  # the query is sent: build the rows while the server reads
                try:
                    for part in parts:
                        part.build_rows()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await checking
                    raise
                found = await checking
                for part in parts:
                    part.applications, gone = found[part.shard]
                    await _write_rows(cur, router, part, gone, prefix)
                changed = [part.shard for part in parts if part.changes]
                if changed:
                    await lock_changes(cur, router, *changed, prefix=prefix)
                results = [await _write_changes(cur, router, part, prefix) for part in parts]
            await conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):  # a dead connection cannot roll back; it is gone
                await conn.rollback()
            raise
    return results


async def _write_rows(
    cur: Cursor, router: ShardRouter, part: _ShardPart, gone: set[int], prefix: str
) -> None:
    """Steps 1 to 4 of the module docstring for one shard, its accounts read (``gone``: erased)."""
    shard, full, patches = part.shard, part.full, part.patches
    table = router.table(shard, "messages")
    patch_keys = [_checked_key(r) for r in patches]
    full_keys = [(r.account_id, _checked_key(r)) for r in full]
    keys = list(
        dict.fromkeys(full_keys + [(r.account_id, key) for r, key in zip(patches, patch_keys, strict=True)])
    )
    if gone:  # rare: rebuild without the erased accounts' records
        part.erased = sum(1 for r in part.records if r.account_id in gone)
        ERASED_RECORDS.inc(part.erased)
        part.full = full = [r for r in full if r.account_id not in gone]
        kept = [(r, k) for r, k in zip(patches, patch_keys, strict=True) if r.account_id not in gone]
        part.patches = patches = [r for r, _ in kept]
        patch_keys = [k for _, k in kept]
        full_keys = [m for m in full_keys if m[0] not in gone]
        keys = [m for m in keys if m[0] not in gone]
        part.build_rows()
    before: dict[tuple[int, bytes], RowState] = {}
    now: dict[tuple[int, bytes], RowState] = {}
    if part.rows:
        # RETURNING gives each statement row's state after its update and before it, in the
        # order of the rows: a message's first row says what the row was before this batch, its
        # last one the row as written (no read before, none after).
        await cur.execute(
            prefix
            + upsert_statement(table, len(part.rows), rows_sql=part.rows_sql, keep_previous=True)
            + _RETURNING_STATES
        )
        returned = await cur.fetchall()
        if len(returned) != len(part.rows):
            raise RuntimeError(f"the upsert of {len(part.rows)} rows returned {len(returned)}")
        seen: set[tuple[int, bytes]] = set()
        for message, values in zip(full_keys, returned, strict=True):
            was, now[message] = _written(values)
            if message not in seen:  # its first row: the row as it was before this batch
                seen.add(message)
                if was is not None:
                    before[message] = was
    # The rows only patches touch, locked for the rest of the transaction.
    before.update(await _states(cur, table, [m for m in keys if m not in now], prefix))
    now = {**before, **now}
    # Patches in version order against the state so far (the rows are locked: the upsert locked
    # its rows, the SELECT above the others), folded into one UPDATE per row; the rare case, so
    # one statement per patched row.
    patched: dict[tuple[int, bytes], dict[str, Any]] = {}
    for record, key in zip(patches, patch_keys, strict=True):
        message = (record.account_id, key)
        state = now.get(message)
        if state is None:
            part.without_row += 1
            continue
        assignments = patch_assignments(state, record)
        if assignments:
            now[message] = _patched(state, assignments)
            patched.setdefault(message, {}).update(assignments)
    for message, assignments in patched.items():
        await cur.execute(
            f"UPDATE {table} SET {', '.join(f'{c} = %s' for c in assignments)} WHERE id = %s",
            [*assignments.values(), now[message].id],
        )
    threads: dict[tuple[int, str], None] = {}
    for message in keys:
        state = now.get(message)
        if state is None:  # only a patch's, without a row
            continue
        check_shard(state.id, shard)
        old = before.get(message)
        kind = change_kind(old, state)
        if kind is not None:
            part.changes.append(
                (message[0], "message", state.id, kind, state.version, status_change(old, state))
            )
            for thread in (old.thread_key if old is not None else None, state.thread_key):
                if thread is not None:
                    threads[(message[0], thread)] = None
    part.threads = list(threads)


async def _write_changes(cur: Cursor, router: ShardRouter, part: _ShardPart, prefix: str) -> ShardWriteResult:
    """Step 5 for one shard, its change lock held (:func:`libs.changelog.lock_changes`)."""
    committed: list[CommittedChange] = []
    changes, shard = part.changes, part.shard
    if changes:
        # Under the lock: the shard's thread recomputations run one at a time, each seeing every
        # message the ones before it committed (update_threads).
        threads_changed = await update_threads(
            cur, shard, router.table(shard, "threads"), router.table(shard, "messages"), part.threads, prefix
        )
        changes += [(*change, None) for change in threads_changed]
        committed = await _insert_changes(cur, router, shard, changes, part.applications)
    return ShardWriteResult(
        shard,
        len(part.full) + len(part.patches),
        len(changes),
        sum(r[1] for r in part.rows),
        sum(r[2] for r in part.rows),
        part.without_row,
        part.erased,
        committed,
    )
