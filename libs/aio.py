"""Waiting that never loses a cancel, on Python 3.11.

Python 3.11's :func:`asyncio.wait_for` returns the awaited result instead of raising when the
awaited future completes in the same loop turn as a cancel of the waiting task (CPython
gh-86296, fixed in 3.12, whose ``wait_for`` is :func:`asyncio.timeout` around a plain ``await``).
The cancel is lost: a loop that only waits runs on, and ``task.cancel(); await task`` never
returns (the hang of a test teardown that commit b01d65f fixed in the IMAP IDLE loop).

* :func:`wait_for` is the 3.12 ``wait_for``, and it also raises if the awaited code itself
  swallowed a cancel of this task that arrived while it waited.
* :func:`raise_if_cancelling` is for loops around a library's own waits (aioimaplib calls
  ``asyncio.wait_for`` inside): call it after each wait.
* :func:`cancelling` says whether the current task has a cancel pending (cleanup after a cancel
  should not wait long, and must not be retried as an ordinary error).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["cancelling", "raise_if_cancelling", "wait_for"]

T = TypeVar("T")


def cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def raise_if_cancelling() -> None:
    if cancelling():
        raise asyncio.CancelledError()


async def wait_for(aw: Awaitable[T], timeout_s: float | None) -> T:
    """``await aw``, raising :class:`TimeoutError` after ``timeout_s`` (None: no limit).

    Unlike 3.11's ``asyncio.wait_for`` it runs a coroutine in the calling task rather than in a
    task of its own, as 3.12's does; on timeout or cancel the awaited future is cancelled.
    """
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("wait_for() must be called from a task")
    # Cancels already pending on entry (cleanup that runs after a cancel) are not ours to raise.
    before = task.cancelling()
    async with asyncio.timeout(timeout_s):
        result = await aw
    if task.cancelling() > before:
        raise asyncio.CancelledError()
    return result
