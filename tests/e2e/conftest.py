"""Fixtures for end-to-end tests: the services as real processes, and tenants to test with."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from cli.services import SERVICE_PORTS, LocalService, local_imap_env, local_smtp_env
from cli.stack import Stack
from libs.accounts import Account, Application, create_account, create_application
from libs.shards import ShardMap, ShardRouter
from tests.scratch import app_name, group_name, topic_name

# Ports and pid files of their own, so a `make dev` instance on the default ports never
# interferes; two checkouts sharing one stack can set different values.
E2E_PORT_OFFSET = int(os.environ.get("FLIGHTLOG_E2E_PORT_OFFSET", "200"))
E2E_INSTANCE = os.environ.get("FLIGHTLOG_E2E_INSTANCE", "-e2e")
# An instance id of its own: the transform's transactional id derives from it, and two runs with
# the same one would fence each other's transform.
E2E_ENV = {
    "FLIGHTLOG_INSTANCE_ID": f"{socket.gethostname()}{E2E_INSTANCE}",
    # Every test's client is 127.0.0.1 and a service process outlives many tests, so the failed
    # authentications of all of them would count together (revocation tests poll with a revoked
    # key, the fuzzer mangles keys). The limit itself: tests/integration/test_gateway_limits.py.
    "FLIGHTLOG_AUTH_FAILURE_BURST": "1000000",
}
# IMAP accounts the e2e tests register go through a topic and group of this run's (the pipeline's
# ingest and gateway share them), so that `make dev`'s ingest does not sync them, nor this one
# `make dev`'s accounts. Transform and persist stay in the shared groups on purpose: a group of
# their own would have them process every record of the shared topics a second time, beside
# `make dev`'s (two transforms writing one state topic), and start from offset 0 of each.
PIPELINE_IMAP_ENV = {
    "FLIGHTLOG_IMAP_ACCOUNTS_TOPIC": topic_name("imap-accounts"),
    "FLIGHTLOG_IMAP_CONSUMER_GROUP": group_name("imap"),
    **local_imap_env(),
    **local_smtp_env(),
}
# The webhook tests run dispatchers with settings of their own, and only one dispatcher delivers
# at a time: the pipeline's gateway serves the webhook API without one (see test_gateway_wiring).
# Its delta streams' safety check is slower than any wait of a test, so a stream that gets a change
# in time got it through the relay, flightlog.changes and the change notifier.
GATEWAY_ENV = {
    "FLIGHTLOG_WEBHOOKS_DISPATCHER_IN_GATEWAY": "false",
    "FLIGHTLOG_GATEWAY_DELTA_RECHECK_S": "120",
    # The sending crash test posts more than an account's default burst at once.
    "FLIGHTLOG_SEND_BURST_PER_ACCOUNT": "1000",
}
# Two SMTP conversations at once: a batch of sends takes long enough that a kill -9 lands in it.
SENDER_ENV = {"FLIGHTLOG_SENDER_CONCURRENCY": "2", "FLIGHTLOG_SENDER_CLAIM_BATCH": "4"}


@dataclass
class Pipeline:
    services: dict[str, LocalService]

    def url(self, name: str) -> str:
        return self.services[name].address

    def management_url(self, name: str) -> str:
        return self.services[name].management_address


# Package scope: the pipeline stops after the last e2e test, so that its sender, change relay and
# webhook dispatcher do not also work on the rows of the integration tests that run after them
# (a sender of the pipeline once deferred an integration test's outbox row with its own policy).
@pytest.fixture(scope="package")
def pipeline(stack: Stack, shard_map: ShardMap, topics: None) -> Iterator[Pipeline]:
    services = {
        name: LocalService(
            name,
            port + E2E_PORT_OFFSET,
            stack.settings.state_dir,
            env={
                **E2E_ENV,
                **PIPELINE_IMAP_ENV,
                **(GATEWAY_ENV if name == "gateway" else {}),
                **(SENDER_ENV if name == "sender" else {}),
            },
            instance=E2E_INSTANCE,
        )
        for name, port in SERVICE_PORTS.items()
    }
    for svc in services.values():
        svc.start(wait_s=0)
    try:
        for svc in services.values():
            svc.wait_ready(90)
        yield Pipeline(services)
    finally:
        for svc in services.values():
            svc.proc.stop(timeout_s=40)


@dataclass
class Tenant:
    """``created_ms`` is a Kafka timestamp before the tenant existed: its records come later."""

    application: Application
    api_key: str
    accounts: list[Account]
    created_ms: int


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for the test's calls to the services."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest.fixture
async def tenant_factory(router: ShardRouter) -> AsyncIterator[Any]:
    async def make(shards: list[int]) -> Tenant:
        created_ms = int(time.time() * 1000) - 1000  # the broker's clock may be a little behind
        application, key = await create_application(router, app_name("tenant"))
        accounts = [
            await create_account(router, application.id, f"{uuid.uuid4().hex[:8]}@example.test", shard=s)
            for s in shards
        ]
        return Tenant(application, key, accounts, created_ms)

    yield make
    await asyncio.sleep(0)
