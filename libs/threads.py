"""Threads: each (account, thread_key) aggregate recomputed from its messages in persist's transaction.

A thread is the messages of one account that share a ``thread_key`` (libs.mime computes it from
Message-ID, References and In-Reply-To; an application's event may carry one; a message without
one is in no thread). Its row in ``threads`` (shard migration 0014) holds what a mail client lists:
the number of messages that are not deleted, how many of them are unread, the latest message's
time, the subject of the earliest message that has one.

Why recompute rather than count: persist writes at least once, so an increment replayed after a
crash or a redelivery would count twice, while an aggregate recomputed from the message rows
comes out the same however often it runs. The writer calls :func:`update_threads` in the
transaction that wrote the messages, after the message rows, with the thread keys of the messages
that really changed there (old and new key: a message may move from one thread to another), so a
replay (no message changed) costs nothing at all. One statement does the work
(:func:`aggregate_statement`): ``INSERT ... SELECT ... GROUP BY ... ON DUPLICATE KEY UPDATE``
over the touched keys, read through ``ix_messages_thread (account_id, thread_key)``, which
``RETURNING`` the rows as written. The cost is the thread's size, not the batch's: each touched
thread's messages are read again. Measured (batches of 500 new messages, four a thread,
alternating with batches without thread keys in one process, 2 shared cores): +1.7 to +1.9 us of
writer CPU per row (38 us) and +5.6 to +6.6 us of MariaDB CPU per row (33 us), a quarter more
change rows; a batch that adds one message to a 20,000-message thread took 45 ms more.

A thread changes only when its aggregate does: the update keeps the row's ``change_token``
when every aggregate column equals the recomputed one, and sets this write's random token
otherwise, raising ``version`` by one; the returned token tells which rows this statement changed
(``RETURNING`` shows the row after the update, never before). A key whose messages all moved away
returns no row; its thread is emptied by a second statement (rare). A thread left without
messages is reported ``deleted``, and its id is kept should messages come back to it.

Concurrent writers of one shard (batches in flight, the retry consumer, other persist replicas):
the caller holds the shard's ``changes_lock`` (``writer.lock_changes``, taken anyway to commit
change rows in id order) while this runs, so a shard's recomputations run one at a time, each
after the previous one's commit. Under READ COMMITTED (the stack's servers) the SELECT is a
consistent read of the statement's moment and takes no locks, so without that lock two writers
of one thread would each miss the other's uncommitted message, and the last to write would store
its count; with it, the last to recompute sees every message committed before it and its own,
and every writer of a thread's message recomputes the thread. Under REPEATABLE READ the SELECT
reads the latest committed rows with shared locks, with the same result.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Final

from asyncmy.cursors import Cursor

from libs.db.literals import values_sql
from libs.ids import check_shard

__all__ = ["THREAD_COLUMNS", "ThreadChange", "aggregate_statement", "change_kind", "update_threads"]

# (account id, "thread", thread id, change type, version): a row of the shard's ``changes``.
ThreadChange = tuple[int, str, int, str, int]

# The aggregate of one thread's messages, as SELECT expressions over ``messages``. The subject is
# the earliest message's that has one: the minimum of its time (fixed width, 20 characters) and
# subject side by side, the time cut off again.
_AGGREGATE: Final = (
    ("message_count", "SUM(deleted = 0)"),
    ("unread_count", "SUM(unread AND deleted = 0)"),
    ("last_message_at", "MAX(IF(deleted, NULL, occurred_at))"),
    (
        "subject",
        "SUBSTRING(MIN(IF(deleted, NULL, CONCAT(DATE_FORMAT(occurred_at, '%Y%m%d%H%i%s%f'), subject))), 21)",
    ),
    ("content_mark", "BIT_XOR(IF(deleted, 0, content_version))"),
)
THREAD_COLUMNS: Final = tuple(name for name, _ in _AGGREGATE)
_UNCHANGED: Final = " AND ".join(f"{c} <=> VALUES({c})" for c in THREAD_COLUMNS)
_RETURNING: Final = " RETURNING id, account_id, thread_key, version, message_count, change_token"


def aggregate_statement(threads: str, messages: str, keys_sql: str, token: int) -> str:
    """Recompute the threads of ``keys_sql`` (``(account_id, 'key'), ...`` as SQL literals).

    The assignments run left to right, each seeing the ones before: the token first (it compares
    the stored aggregate with the new one), then the version (up by one when the token is this
    write's), then the aggregate itself.
    """
    return (
        f"INSERT INTO {threads} (account_id, thread_key, {', '.join(THREAD_COLUMNS)}, version, change_token)"
        f" SELECT account_id, thread_key, {', '.join(expr for _, expr in _AGGREGATE)}, 1, {int(token)}"
        f" FROM {messages} WHERE (account_id, thread_key) IN ({keys_sql}) GROUP BY account_id, thread_key"
        f" ON DUPLICATE KEY UPDATE change_token = IF({_UNCHANGED}, change_token, VALUES(change_token)),"
        " version = version + (change_token = VALUES(change_token)), "
        + ", ".join(f"{c} = VALUES({c})" for c in THREAD_COLUMNS)
        + _RETURNING
    )


def change_kind(version: int, message_count: int) -> str | None:
    """The change a write made to a thread it changed, now at ``version`` with ``message_count``
    messages (None: a thread created empty, e.g. for a message stored deleted: nothing to say)."""
    if message_count == 0:
        return None if version == 1 else "deleted"
    return "created" if version == 1 else "updated"


async def update_threads(
    cur: Cursor,
    shard: int,
    threads: str,
    messages: str,
    keys: Sequence[tuple[int, str]],
    prefix: str = "",
) -> list[ThreadChange]:
    """Recompute the threads of ``keys`` (account id, thread key) in the caller's transaction and
    return the change rows of those that changed. ``prefix`` bounds the lock waits (the writer's
    ``SET STATEMENT``)."""
    if not keys:
        return []
    token = secrets.randbits(63) + 1  # never 0, the backfill's
    await cur.execute(prefix + aggregate_statement(threads, messages, values_sql(keys), token))
    changes: list[ThreadChange] = []
    seen: set[tuple[int, str]] = set()
    for id_, account_id, key, version, count, row_token in await cur.fetchall():
        check_shard(int(id_), shard)  # the bug #199 guard, as insert_guarded does for inserts
        seen.add((int(account_id), str(key)))
        kind = change_kind(int(version), int(count)) if int(row_token) == token else None
        if kind is not None:
            changes.append((int(account_id), "thread", int(id_), kind, int(version)))
    gone = [k for k in keys if k not in seen]
    if gone:
        changes += await _empty(cur, threads, values_sql(gone), token, prefix)
    return changes


async def _empty(cur: Cursor, threads: str, keys_sql: str, token: int, prefix: str) -> list[ThreadChange]:
    """Empty the threads whose messages all moved to other threads (no message holds their key)."""
    await cur.execute(
        f"{prefix}SELECT id, account_id, version FROM {threads}"
        f" WHERE (account_id, thread_key) IN ({keys_sql}) AND message_count > 0 FOR UPDATE"
    )
    rows = [(int(i), int(a), int(v)) for i, a, v in await cur.fetchall()]
    if not rows:
        return []
    await cur.execute(
        f"{prefix}UPDATE {threads} SET message_count = 0, unread_count = 0, last_message_at = NULL,"
        f" subject = NULL, content_mark = 0, version = version + 1, change_token = {int(token)}"
        f" WHERE id IN ({', '.join(str(i) for i, _, _ in rows)})"
    )
    return [(account_id, "thread", id_, "deleted", version + 1) for id_, account_id, version in rows]
