"""Delta streams woken through the pipeline: persist's change relay publishes the change row on
flightlog.changes and the gateway's change notifier wakes the account's streams.

The pipeline's gateway checks its shards only every 120 s (``GATEWAY_ENV``), far beyond the
waits below, so a stream that gets the change got it through the topic. The delta tests of
test_gateway_delta run the other path: a gateway whose topic says nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from libs.shards import ShardRouter
from tests.e2e.conftest import Pipeline
from tests.e2e.gateway_helpers import bearer, record, seed
from tests.e2e.test_gateway_delta import read_events

pytestmark = pytest.mark.e2e

WAIT_S = 30.0  # the relay publishes within its 50 ms idle poll; this is for a busy machine


async def test_a_committed_change_wakes_every_stream_and_long_poll_of_its_account(
    pipeline: Pipeline, http: Any, tenant_factory: Any, router: ShardRouter
) -> None:
    tenant = await tenant_factory([13, 13])
    account, other = tenant.accounts
    gateway = pipeline.url("gateway")
    base = f"{gateway}/v1/accounts"
    auth = bearer(tenant.api_key)
    async with (
        http.get(f"{base}/{account.id}/delta/stream", params={"heartbeat": "60"}, headers=auth) as one,
        http.get(f"{base}/{account.id}/delta/stream", params={"heartbeat": "60"}, headers=auth) as two,
        http.get(f"{base}/{other.id}/delta/stream", params={"heartbeat": "60"}, headers=auth) as bystander,
    ):
        for resp in (one, two, bystander):
            assert resp.status == 200 and (await read_events(resp, 1))[0] == {"retry": "2000"}
        poll = asyncio.ensure_future(
            http.get(f"{base}/{account.id}/delta", params={"timeout": "30"}, headers=auth)
        )
        await asyncio.sleep(0.5)  # the long-poll has read and waits
        await seed(router, [record(account.id, "through-the-topic")])
        (first,) = await read_events(one, 1, timeout_s=WAIT_S)
        (second,) = await read_events(two, 1, timeout_s=WAIT_S)
        async with await asyncio.wait_for(poll, WAIT_S) as resp:
            page = await resp.json()
        for event in (first, second):
            assert event["event"] == "delta" and '"message_key":"through-the-topic"' in event["data"]
        assert [d["object"]["message_key"] for d in page["deltas"]] == ["through-the-topic"]

        # The other account's stream got nothing; its own change reaches it the same way.
        await seed(router, [record(other.id, "its-own")])
        (event,) = await read_events(bystander, 1, timeout_s=WAIT_S)
        assert event["event"] == "delta" and '"message_key":"its-own"' in event["data"]
