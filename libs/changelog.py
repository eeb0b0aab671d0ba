"""Writing a shard's change log (``changes``): what every writer of change rows shares.

persist's writer writes the changes of messages it stores, the gateway's retention job those of
messages it erases; both must keep change ids committing in id order (shard migration 0003).
"""

from __future__ import annotations

from asyncmy.cursors import Cursor

from libs.db import union_all
from libs.shards import ShardRouter

__all__ = ["lock_changes"]


async def lock_changes(cur: Cursor, router: ShardRouter, *shards: int, prefix: str = "") -> None:
    """Serialize the shards' change writers so change ids commit in order (see migration 0003).

    Call it right before inserting change rows, in the transaction that inserts them; ``prefix``
    bounds the lock wait (persist's ``SET STATEMENT innodb_lock_wait_timeout = N FOR``). Several
    shards (of one server) are locked in one statement, in shard order, as every writer takes them.
    """
    locks = [
        f"SELECT id FROM {router.table(shard, 'changes_lock')} WHERE id = 1 FOR UPDATE"
        for shard in sorted(shards)
    ]
    await cur.execute(prefix + union_all(locks))
