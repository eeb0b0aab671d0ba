"""Every service starts through the shared runner: health, readiness, metrics, SIGTERM drain."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest

from cli.services import SERVICE_PORTS, LocalService
from cli.stack import Stack
from libs.config import KafkaSettings
from libs.kafka import PERSIST_RETRY, POSTFLIGHT
from tests.e2e.conftest import E2E_ENV, E2E_INSTANCE, E2E_PORT_OFFSET
from tests.scratch import commit_end_offsets, group_name, topic_name, transform_topics

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("name", sorted(SERVICE_PORTS))
async def test_service_health_metrics_and_sigterm(
    name: str, stack: Stack, shard_map: object, topics: None, kafka_settings: KafkaSettings
) -> None:
    # A port, an instance id and consumer groups of its own: with the defaults, transform would
    # take `make dev`'s transactional id and fence it, and every consumer would join the shared
    # groups and move their partitions here mid-session. Transform reads and writes topics of its
    # own; persist's group starts at the shared topics' ends, so it has no history to write again.
    group = group_name("runner")
    inflight, postflight, state = await transform_topics(kafka_settings, "runner-transform", 1)
    await commit_end_offsets(kafka_settings, group, POSTFLIGHT)
    await commit_end_offsets(kafka_settings, f"{group}-retry", PERSIST_RETRY)
    env = {
        **E2E_ENV,
        "FLIGHTLOG_INSTANCE_ID": f"{E2E_ENV['FLIGHTLOG_INSTANCE_ID']}-runner",
        "FLIGHTLOG_IMAP_ACCOUNTS_TOPIC": topic_name("runner-imap-accounts"),
        "FLIGHTLOG_IMAP_CONSUMER_GROUP": group,
        "FLIGHTLOG_TRANSFORM_GROUP_ID": group,
        "FLIGHTLOG_TRANSFORM_INFLIGHT_TOPIC": inflight,
        "FLIGHTLOG_TRANSFORM_POSTFLIGHT_TOPIC": postflight,
        "FLIGHTLOG_TRANSFORM_STATE_TOPIC": state,
        "FLIGHTLOG_PERSIST_GROUP_ID": group,
        "FLIGHTLOG_RELAY_ENABLED": "false",
        "FLIGHTLOG_WEBHOOKS_DISPATCHER_IN_GATEWAY": "false",
    }
    svc = LocalService(
        name, SERVICE_PORTS[name] + E2E_PORT_OFFSET - 100, stack.settings.state_dir, env=env,
        instance=f"{E2E_INSTANCE}-runner",
    )  # fmt: skip
    await asyncio.to_thread(svc.start)
    try:
        async with aiohttp.ClientSession(svc.address) as http:
            async with http.get("/healthz") as resp:
                assert resp.status == 200
                assert (await resp.json())["service"] == name
            async with http.get("/readyz") as resp:
                assert resp.status == 200
            async with http.get("/metrics") as resp:
                assert resp.status == 404  # the public port has no /metrics
            async with http.get(f"{svc.management_address}/metrics") as resp:
                assert resp.status == 200
                assert "python_info" in await resp.text()
            async with http.get(f"{svc.management_address}/readyz") as resp:
                assert resp.status == 200
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
    servers = {"kafka", "dovecot", "dovecot-plain", "oauth-server", "dovecot-oauth", "postfix"}
    servers |= {f"mariadb-{c}{role}" for c in ("c1", "c2") for role in ("", "-replica")}
    assert {s.name for s in statuses} == servers
    assert all(s.running and s.answers for s in statuses), statuses
