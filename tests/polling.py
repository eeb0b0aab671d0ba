"""The one way tests wait: poll a condition until it holds, fail with what was awaited.

Tests never sleep to synchronise; they poll a check (a plain or an async function) and a
"nothing more arrives" check waits for a positive marker sent after the last event.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

__all__ = ["eventually"]


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str, *, interval_s: float = 0.1
) -> None:
    """Return once ``check()`` holds; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = check()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(interval_s)
