"""Fixtures and builders for the gateway's end-to-end tests.

The gateway runs as its own process on a port of its own (8290 with the default port offset), so
these tests depend on MariaDB only, not on the pipeline's timing: rows are written with persist's
own writer. PATCH and DELETE, which go through the pipeline, are tested against the pipeline's
gateway; here they wait only briefly before answering 202.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import pytest

from cli.services import LocalService, local_imap_env
from cli.stack import Stack
from libs.events import MessageDoc, PostflightRecord
from libs.shards import ShardMap, ShardRouter
from services.persist.writer import write_shard
from tests.e2e.conftest import E2E_ENV, E2E_INSTANCE, E2E_PORT_OFFSET, GATEWAY_ENV
from tests.scratch import topic_name

GATEWAY_PORT: Final = 8080 + E2E_PORT_OFFSET + 10
T0: Final = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


_STARTED: list[LocalService] = []


@pytest.fixture(scope="session")
def gateway(stack: Stack, shard_map: ShardMap) -> Iterator[str]:
    """The gateway process, started once per session.

    Each test module imports this fixture, which gives pytest one definition per module; the first
    to run starts the process and stops it last, the others share it.
    """
    if _STARTED:
        yield _STARTED[0].address
        return
    svc = LocalService(
        "gateway",
        GATEWAY_PORT,
        stack.settings.state_dir,
        env={
            # E2E_ENV's failed-authentication burst: this process outlives many tests whose
            # failures (revoked and mangled keys) would otherwise leave a new key answered 429.
            **E2E_ENV,
            **GATEWAY_ENV,
            **local_imap_env(),  # IMAP accounts on loopback, never resolved (the fuzz makes up hosts)
            # A changes topic that does not exist: the change notifier hears of no change (as
            # with Kafka or the relay down), so every delta test here runs on its per-shard
            # safety check alone. test_gateway_delta_notifier runs the topic's path.
            "FLIGHTLOG_GATEWAY_CHANGES_TOPIC": topic_name("changes-absent"),
            "FLIGHTLOG_GATEWAY_DELTA_RECHECK_S": "0.2",
            "FLIGHTLOG_GATEWAY_WRITE_WAIT_S": "0.2",
        },
        instance=f"{E2E_INSTANCE}-gw",
    )
    svc.start(wait_s=60)
    _STARTED.append(svc)
    try:
        yield svc.address
    finally:
        _STARTED.clear()
        svc.proc.stop(timeout_s=20)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def record(
    account_id: int, key: str, version: int = 1, *, deleted: bool = False, **doc: Any
) -> PostflightRecord:
    fields: dict[str, Any] = {
        "status": "delivered",
        "direction": "outbound",
        "channel": "email",
        "sender": "sender@example.test",
        "to": ["rcpt@example.test"],
        "subject": f"subject {key}",
        "snippet": f"snippet {key}",
        "body_text": f"body of {key} " * 30,
        "occurred_at": T0,
        **doc,
    }
    return PostflightRecord(account_id=account_id, message_key=key, version=version, deleted=deleted,
                            message=MessageDoc(**fields))  # fmt: skip


async def seed(router: ShardRouter, records: list[PostflightRecord]) -> None:
    by_shard: dict[int, list[PostflightRecord]] = {}
    for r in records:
        by_shard.setdefault(r.account_id >> 48, []).append(r)
    for shard, batch in by_shard.items():
        await write_shard(router, shard, batch)


def varied(account_id: int, n: int, prefix: str = "m") -> list[PostflightRecord]:
    """n messages a minute apart with filterable fields spread over them."""
    out = []
    for i in range(n):
        out.append(
            record(
                account_id,
                f"{prefix}{i:05d}",
                status="delivered" if i % 3 else "failed",
                direction="outbound" if i % 2 else "inbound",
                channel="sms" if i % 5 == 0 else "email",
                sender=f"s{i % 4}@example.test",
                to=[f"r{i % 3}@example.test", "all@example.test"],
                folder="archive" if i % 7 == 0 else "inbox",
                unread=i % 2 == 0,
                occurred_at=T0 + timedelta(minutes=i),
            )
        )
    return out


async def message_ids(router: ShardRouter, account_id: int) -> dict[str, int]:
    shard = account_id >> 48
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT message_key, id FROM {router.table(shard, 'messages')} WHERE account_id = %s",
            (account_id,),
        )
        rows = await cur.fetchall()
        await conn.commit()
    return {bytes(k).decode(): int(i) for k, i in rows}


async def thread_ids(router: ShardRouter, account_id: int) -> list[int]:
    shard = account_id >> 48
    pool = await router.pool(shard)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"SELECT id FROM {router.table(shard, 'threads')} WHERE account_id = %s", (account_id,)
        )
        rows = await cur.fetchall()
        await conn.commit()
    return [int(r[0]) for r in rows]
