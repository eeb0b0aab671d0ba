"""The change relay's idle wait: a commit of the writer in the same process wakes its shard."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from services.persist.relay import ChangeRelay


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
