"""kill -9 of the sender in the middle of a batch of sends: every message arrives exactly once."""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest

from cli.stack import Stack
from libs.ids import shard_of
from libs.shards import ShardRouter
from tests.e2e.conftest import Pipeline
from tests.e2e.send_helpers import maildir_message_ids, two_mailboxes
from tests.polling import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MESSAGES = 40
ROUNDS = 3  # batches tried until a kill lands while some of a batch are sent and some are not
SENT_WITHIN_S = 120.0


async def outbox_states(router: ShardRouter, account_id: int) -> Counter[str]:
    shard = shard_of(account_id)
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT state, COUNT(*) FROM {router.table(shard, 'outbox')}"
            " WHERE account_id = %s GROUP BY state",
            (account_id,),
        )
        rows = await cur.fetchall()
        await conn.commit()
    return Counter({state: int(n) for state, n in rows})


async def test_kill_the_sender_mid_batch_sends_each_message_once(
    pipeline: Pipeline, stack: Stack, router: ShardRouter, tenant_factory: Any, http: aiohttp.ClientSession
) -> None:
    async with AsyncExitStack() as exits:
        a, gw_a, b, _ = await two_mailboxes(exits, pipeline, stack, router, tenant_factory, http)
        sender = pipeline.services["sender"]
        message_ids: list[str] = []
        at_kill: Counter[str] = Counter()
        for round_ in range(ROUNDS):
            done_before = (await outbox_states(router, a.account_id))["submitted"]

            async def send(n: int, round_: int = round_) -> str:
                status, accepted = await gw_a.call(
                    "POST",
                    f"/v1/accounts/{a.account_id}/messages/send",
                    {"to": [{"email": b.address}], "subject": f"crash {round_}.{n}", "text": "once"},
                )
                assert status == 202, accepted
                return str(accepted["message_id"])

            message_ids += await asyncio.gather(*(send(n) for n in range(MESSAGES)))

            async def some_sent(done_before: int = done_before) -> bool:
                return (await outbox_states(router, a.account_id))["submitted"] > done_before

            await eventually(some_sent, SENT_WITHIN_S, "the first sends of the batch")
            assert sender.proc.kill(), "the sender was not running"
            at_kill = await outbox_states(router, a.account_id)
            await asyncio.to_thread(sender.start, wait_s=90)
            if at_kill["pending"] > 0:
                break  # the kill landed mid-batch
        assert at_kill["pending"] > 0, f"every kill came after its batch: {at_kill}"

        async def all_sent() -> bool:
            states = await outbox_states(router, a.account_id)
            return states["submitted"] == len(message_ids)

        await eventually(all_sent, SENT_WITHIN_S, "every message submitted after the restart")

        async def all_arrived() -> bool:
            arrived = Counter(maildir_message_ids(stack, b.address))
            return all(arrived[f"<{m}>"] >= 1 for m in message_ids)

        await eventually(all_arrived, SENT_WITHIN_S, "every message in the recipient's mailbox")
        arrived = Counter(maildir_message_ids(stack, b.address))
        twice = {m: arrived[f"<{m}>"] for m in message_ids if arrived[f"<{m}>"] != 1}
        assert not twice, f"not exactly once: {twice} (states at the kill: {at_kill})"
