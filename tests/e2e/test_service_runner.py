"""Every service starts through the shared runner: health, readiness, metrics, SIGTERM drain."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest

from cli.services import SERVICE_PORTS, LocalService
from cli.stack import Stack

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("name", sorted(SERVICE_PORTS))
async def test_service_health_metrics_and_sigterm(
    name: str, stack: Stack, shard_map: object, topics: None
) -> None:
    # A port of its own, so a `make dev` instance on the default port does not interfere; for
    # ingest, IMAP sync runs on an accounts topic and group of its own: joining the shared group
    # would move the pipeline's accounts here mid-session and make the drain wait on rebalances.
    env = {
        "FLIGHTLOG_IMAP_ACCOUNTS_TOPIC": "flightlog.test-imap-accounts-runner",
        "FLIGHTLOG_IMAP_CONSUMER_GROUP": "flightlog-ingest-imap-runner-test",
    }
    svc = LocalService(
        name, SERVICE_PORTS[name] + 100, stack.settings.state_dir, env=env, instance="-runner-test"
    )
    await asyncio.to_thread(svc.start)
    try:
        async with aiohttp.ClientSession(svc.address) as http:
            async with http.get("/healthz") as resp:
                assert resp.status == 200
                assert (await resp.json())["service"] == name
            async with http.get("/readyz") as resp:
                assert resp.status == 200
            async with http.get("/metrics") as resp:
                assert resp.status == 200
                assert "python_info" in await resp.text()
        pid = svc.proc.pid()
        assert pid is not None
        svc.proc.signal(signal.SIGTERM)
        popen = svc.proc._popen
        assert popen is not None
        code = await asyncio.to_thread(popen.wait, 30)
        assert code == 0, svc.proc.log_tail()
        assert "draining" in svc.proc.log_tail(50)
    finally:
        await asyncio.to_thread(svc.proc.stop)


def test_stack_up_twice_is_harmless_and_status_answers(stack: Stack) -> None:
    pids = [p.proc.pid() for p in stack.parts]
    stack.up()
    assert [p.proc.pid() for p in stack.parts] == pids
    statuses = stack.status()
    assert {s.name for s in statuses} == {"mariadb-c1", "mariadb-c2", "kafka", "dovecot", "dovecot-plain"}
    assert all(s.running and s.answers for s in statuses), statuses
