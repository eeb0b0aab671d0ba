"""The change relay's idle wait: a commit of the writer in the same process wakes its shard, and
hands over the rows it committed."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any, cast

from services.persist.relay import ChangeRelay, CommittedChange, RelaySettings, following


def _relay() -> ChangeRelay:
    return ChangeRelay(cast(Any, None), cast(Any, None))  # neither is touched by the idle wait


async def test_a_notified_shard_does_not_wait_out_its_idle_poll() -> None:
    relay = _relay()
    relay.notify(3)
    async with asyncio.timeout(5):  # far below the 60 s asked for: the wait ended on the wake-up
        await relay._idle(3, 60)


async def test_another_shards_commit_does_not_wake_it() -> None:
    relay = _relay()
    relay.notify(4)
    waiting = asyncio.ensure_future(relay._idle(3, 60))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    relay.notify(3)
    async with asyncio.timeout(5):
        await waiting


def _change(id_: int) -> CommittedChange:
    return CommittedChange(id_, 7, None, "message", 100 + id_, "created", 1, Decimal("1764547200.5"), None)


def test_handed_rows_that_follow_the_position_are_published_without_a_read() -> None:
    # in id order whatever the order the commits were handed in (two writes of one shard at once)
    assert following([_change(12), _change(11)], 10) == [_change(11), _change(12)]
    assert following([_change(9), _change(10), _change(11)], 10) == [_change(11)]  # a read had 9, 10


def test_a_gap_or_nothing_new_means_a_read() -> None:
    # 11 is another writer's row, or an id a rolled-back transaction took: only a read can tell
    assert following([_change(12), _change(13)], 10) is None
    assert following([_change(11), _change(13)], 10) is None
    assert following([_change(10)], 10) is None
    assert following([], 10) is None


async def test_rows_are_held_only_while_leading_and_up_to_a_read() -> None:
    relay = ChangeRelay(cast(Any, None), cast(Any, None), RelaySettings(relay_batch_size=3))
    relay.notify(2, [_change(1)])
    assert relay._handed.get(2, []) == []  # a standby: its tails do not run
    relay.active = True
    relay.notify(2, [_change(1), _change(2)])
    relay.notify(2, [_change(3)])
    assert relay._handed[2] == [_change(1), _change(2), _change(3)]
    relay.notify(2, [_change(4)])  # past a read's worth: dropped, the tail reads
    assert relay._handed[2] == []
