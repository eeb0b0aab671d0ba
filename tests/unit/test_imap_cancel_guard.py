"""libs.aio.wait_for keeps a cancel that Python 3.11's asyncio.wait_for loses.

The race is made deterministic: the awaited future gets its result and the waiting task its
cancel in the same loop turn, before the task runs again."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from libs.aio import cancelling, raise_if_cancelling, wait_for

WaitFor = Callable[[Awaitable[int], float], Coroutine[Any, Any, int]]


async def _race(wait: WaitFor) -> asyncio.Task[int]:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(wait(future, 60.0))
    await asyncio.sleep(0)  # the task now waits on the future
    future.set_result(1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return task


async def test_asyncio_wait_for_loses_the_cancel_on_311_only() -> None:
    """Why libs.aio exists: on 3.11 the stdlib drops the cancel; 3.12 rewrote wait_for and keeps
    it, so there the helper is only a second way to the same answer."""
    task = await _race(asyncio.wait_for)
    if sys.version_info < (3, 12):
        assert not task.cancelled() and task.result() == 1
    else:
        assert task.cancelled()


async def test_the_helper_keeps_the_cancel() -> None:
    task = await _race(wait_for)
    assert task.cancelled()


async def test_a_loop_that_only_waits_ends_on_cancel() -> None:
    """The shape of the IDLE loop, the relay's and the dispatcher's sleeps: cancelled while its
    wait completes, it must end rather than wait again."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            await wait_for(queue.get(), 60.0)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    queue.put_nowait(1)  # wakes the getter in the same turn as the cancel below
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() and rounds == 1


async def test_a_cancel_the_awaited_code_swallows_is_raised() -> None:
    started = asyncio.Event()

    async def swallows() -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return 2  # a library that turns a cancel into a result
        return 0

    task = asyncio.create_task(wait_for(swallows(), 60.0))
    await started.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()


async def test_timeout_and_result() -> None:
    assert await wait_for(asyncio.sleep(0, result=3), 60.0) == 3
    with pytest.raises(TimeoutError):
        await wait_for(asyncio.Event().wait(), 0.01)
    assert not cancelling()
    raise_if_cancelling()  # nothing pending: no-op


async def test_cleanup_after_a_cancel_can_still_wait() -> None:
    """A task that was cancelled may wait in its cleanup (the IDLE loop's DONE): a cancel
    pending on entry is not raised again by a wait that completes."""
    done: list[int] = []

    async def worker() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            assert cancelling()
            done.append(await wait_for(asyncio.sleep(0, result=4), 60.0))
            with pytest.raises(asyncio.CancelledError):
                raise_if_cancelling()

    task = asyncio.create_task(worker())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() and done == [4]
