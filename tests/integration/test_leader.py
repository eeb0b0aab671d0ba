"""libs.leader against the real MariaDB: one leader per role, a standby takes over when the
leader's lock connection ends, and stopping ends both (a role of its own per test, so the stack's
relay and dispatcher are not disturbed)."""

from __future__ import annotations

import asyncio
import uuid

import asyncmy
import pytest

from libs.config import DatabaseSettings
from libs.leader import lead_until_stopped

pytestmark = pytest.mark.integration


async def test_one_leads_and_a_standby_takes_over(db_settings: DatabaseSettings, stack: object) -> None:
    role = f"test-leader-{uuid.uuid4().hex[:8]}"
    stopping = asyncio.Event()
    leading: dict[str, bool] = {}
    led: list[str] = []
    new_leader = asyncio.Event()
    resign = {"a": asyncio.Event(), "b": asyncio.Event()}

    def contender(name: str) -> asyncio.Task[None]:
        async def lead(conn: asyncmy.Connection) -> None:
            led.append(name)
            new_leader.set()
            await resign[name].wait()
            if not stopping.is_set():
                raise ConnectionError("lost the lock connection")  # as a dead connection would

        def on_leading(now: bool) -> None:
            leading[name] = now

        run = lead_until_stopped(
            db_settings, role, stopping, lead, standby_poll_s=0.05, error_backoff_s=0.5, on_leading=on_leading
        )
        return asyncio.create_task(run)

    tasks = [contender("a"), contender("b")]
    try:
        async with asyncio.timeout(10):
            await new_leader.wait()
        new_leader.clear()
        first = led[0]
        await asyncio.sleep(0.3)  # the standby polls meanwhile, and stays a standby
        assert led == [first] and leading[first] and not leading.get("b" if first == "a" else "a")
        resign[first].set()  # its lock connection closes: the other one takes the lock
        async with asyncio.timeout(10):
            await new_leader.wait()
        assert led[1] != first and leading[led[1]]
    finally:
        stopping.set()
        for event in resign.values():
            event.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks)
    assert not any(leading.values())
