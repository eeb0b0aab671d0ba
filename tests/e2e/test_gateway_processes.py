"""Two gateway processes sharing one port (SO_REUSEPORT), as `FLIGHTLOG_GATEWAY_PROCESSES=2` runs
them: both serve, one of them dispatches webhooks (the lock elects it), /metrics reached through
the port counts the requests of both, and a key revoked through one is refused by both within the
key cache's TTL.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from typing import Any, Final

import aiohttp
import pytest

from cli.services import LocalService, management_address
from cli.stack import Stack
from libs.accounts import create_api_key
from libs.shards import ShardMap, ShardRouter
from tests.e2e.conftest import E2E_ENV, E2E_INSTANCE, E2E_PORT_OFFSET
from tests.e2e.gateway_helpers import bearer
from tests.e2e.webhook_harness import FAST
from tests.polling import eventually

pytestmark = pytest.mark.e2e

PORT: Final = 8080 + E2E_PORT_OFFSET + 21
ACTIVE: Final = re.compile(rb'^flightlog_webhook_dispatcher_active\{pid="(\d+)"\} ([0-9.]+)$', re.M)


@pytest.fixture(scope="module")
def gateways(stack: Stack, shard_map: ShardMap) -> Iterator[LocalService]:
    env = {
        **E2E_ENV,
        **{
            f"FLIGHTLOG_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in FAST.items()
        },
        "FLIGHTLOG_GATEWAY_KEY_CACHE_TTL_S": "2",
    }
    svc = LocalService(
        "gateway", PORT, stack.settings.state_dir, env=env, instance=f"{E2E_INSTANCE}-reuseport", processes=2
    )
    svc.start(wait_s=90)  # returns once each of the two processes has answered ready
    try:
        yield svc
    finally:
        svc.stop(timeout_s=20)


def _metrics() -> bytes:
    with urllib.request.urlopen(
        f"{management_address(f'http://127.0.0.1:{PORT}')}/metrics", timeout=2
    ) as resp:
        body: bytes = resp.read()
        return body


def _dispatchers() -> dict[int, float]:
    return {int(pid): float(value) for pid, value in ACTIVE.findall(_metrics())}


def _accounts_ok() -> float:
    found = re.search(
        rb'^flightlog_gateway_requests_total\{method="GET",route="/v1/accounts",status="200"\} ([0-9.]+)$',
        _metrics(),
        re.M,
    )
    return float(found.group(1)) if found else 0.0


async def test_two_processes_share_the_port(
    gateways: LocalService, router: ShardRouter, tenant_factory: Any
) -> None:
    pids = {p.pid() for p in gateways.procs}
    assert len(pids) == 2 and None not in pids

    # one leader: both processes report the gauge (through whichever answers the scrape)
    await eventually(
        lambda: set(_dispatchers()) == pids and sorted(_dispatchers().values()) == [0.0, 1.0],
        30,
        "one of the two processes to lead the webhook dispatch",
    )

    tenant = await tenant_factory(router.shard_map.shards[:1])
    before = _accounts_ok()
    for _ in range(20):
        # a connection per request: the kernel spreads connections, not requests
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{gateways.address}/v1/accounts", headers=bearer(tenant.api_key)) as resp,
        ):
            assert resp.status == 200
    assert _accounts_ok() - before == 20

    # A key revoked through the port: the process that revoked it refuses it at once, the other
    # one once its cached answer is older than the TTL (2 s here).
    _, second = await create_api_key(router, tenant.application.id)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateways.address}/v1/api-keys", headers=bearer(second)) as resp:
            key_id = next(k["id"] for k in (await resp.json())["data"] if second.startswith(k["prefix"]))
        async with http.delete(
            f"{gateways.address}/v1/api-keys/{key_id}", headers=bearer(tenant.api_key)
        ) as resp:
            assert resp.status == 200

    async def refused_by_every_process() -> bool:
        for _ in range(10):
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{gateways.address}/v1/accounts", headers=bearer(second)) as resp,
            ):
                if resp.status != 401:
                    return False
        return True

    await eventually(refused_by_every_process, 30, "the revoked key to be refused by both processes")
