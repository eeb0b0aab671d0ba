"""persist and the shard map: a record for an account whose shard bits are in no shard of the map
goes to the DLQ, and the records of known shards around it are written.

Runs a :class:`PersistWorker` in this process on topics and groups of its own, with the helpers
of tests/integration/test_persist_poison.py.
"""

from __future__ import annotations

import secrets
import uuid

import pytest

from services.persist.worker import PersistSettings
from tests.integration.test_persist_poison import (
    Env,
    _alive,
    dead_letters,
    env,
    publish,
    raw,
    record,
    running,
    stored,
)
from tests.polling import eventually

pytestmark = pytest.mark.integration

__all__ = ["env"]  # the fixture, shared with test_persist_poison


def unknown_shard(env: Env) -> int:
    shard = max(env.router.shard_map.shards) + 1000
    assert shard not in env.router.shard_map.shards
    return shard


async def test_a_record_of_an_unknown_shard_goes_to_the_dlq(env: Env) -> None:
    tag = uuid.uuid4().hex[:8]
    shard = unknown_shard(env)
    stray = record(env, f"stray-{tag}").model_copy(
        update={"account_id": shard << 48 | 1 << 44 | secrets.randbits(40)}
    )
    good = [record(env, f"good-{tag}-{i}") for i in range(6)]
    await publish(env, [raw(g) for g in good[:3]] + [raw(stray)] + [raw(g) for g in good[3:]])

    async with running(env, PersistSettings(persist_max_backoff_s=0.5)) as task:

        async def settled() -> bool:
            return len(await stored(env)) >= len(good) and bool(await dead_letters(env))

        await eventually(_alive(task, settled), 90, "the good rows and the stray's dead letter")

    assert await stored(env) == {g.message_key: 1 for g in good}
    (letter,) = await dead_letters(env)
    assert (letter.key, letter.value) == raw(stray)  # the original bytes
    assert letter.stage == "persist" and letter.source_topic == env.postflight
    assert f"shard {shard} is not in the shard map" in letter.reason
