"""The account directory's caches (libs.accounts.AccountDirectory) against the real global schema
and shards: a revoked key stops working at once where it was revoked and within the TTL
everywhere else, wrong keys and ids never grow the caches past their bounds nor evict what is in
use, and a new shard map version empties the account caches.

The TTLs run on a fake clock, so nothing here waits for them.
"""

from __future__ import annotations

import secrets

from libs.accounts import (
    API_KEY_PREFIX,
    AccountDirectory,
    create_account,
    create_api_key,
    create_application,
    hash_api_key,
    revoke_api_key,
)
from libs.ids import MAX_LOCAL, make_id, shard_of
from libs.shards import ShardRouter
from tests.scratch import app_name

TTL_S = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _wrong_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


async def test_revoked_key_refused_at_once_here_and_within_the_ttl_elsewhere(router: ShardRouter) -> None:
    clock = Clock()
    here = AccountDirectory(router, TTL_S, timer=clock)
    elsewhere = AccountDirectory(router, TTL_S, timer=clock)  # another gateway process
    app, first = await create_application(router, app_name("directory"))
    key, second = await create_api_key(router, app.id)
    for directory in (here, elsewhere):
        assert await directory.application_for_key(second) == app

    revoked = await revoke_api_key(router, app.id, key.id)
    assert revoked is not None
    here.forget_key(revoked[1])  # what DELETE /v1/api-keys/{id} does in its process
    assert await here.application_for_key(second) is None
    # The other process answers from its cache until the TTL ends, and not a moment longer.
    assert await elsewhere.application_for_key(second) == app
    clock.now += TTL_S
    assert await elsewhere.application_for_key(second) is None
    assert await elsewhere.application_for_key(first) == app


async def test_wrong_keys_stay_within_their_bound_and_evict_no_known_key(router: ShardRouter) -> None:
    clock = Clock()
    directory = AccountDirectory(router, TTL_S, max_entries=10, max_misses=20, timer=clock)
    app, key = await create_application(router, app_name("directory"))
    assert await directory.application_for_key(key) == app
    for _ in range(200):
        assert await directory.application_for_key(_wrong_key()) is None
    assert len(directory._unknown_keys) == 20
    assert len(directory._keys) == 1
    # Still served from the cache, not read again: the digest is gone from the database, and
    # the key answers all the same.
    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"UPDATE `{router.global_schema}`.api_keys SET key_hash = %s WHERE key_hash = %s",
            (hash_api_key(_wrong_key()), hash_api_key(key)),
        )
        await conn.commit()
    assert await directory.application_for_key(key) == app
    clock.now += TTL_S
    assert await directory.application_for_key(key) is None


async def test_known_keys_are_bounded_least_recently_used_first(router: ShardRouter) -> None:
    directory = AccountDirectory(router, TTL_S, max_entries=2, timer=Clock())
    apps = [await create_application(router, app_name("directory")) for _ in range(3)]
    for app, key in apps:
        assert await directory.application_for_key(key) == app
    assert len(directory._keys) == 2
    assert hash_api_key(apps[0][1]) not in directory._keys


async def test_unknown_accounts_are_bounded_and_a_new_map_version_empties_the_account_caches(
    router: ShardRouter,
) -> None:
    clock = Clock()
    directory = AccountDirectory(router, TTL_S, max_misses=5, timer=clock)
    app, _ = await create_application(router, app_name("directory"))
    account = await create_account(router, app.id, "directory@example.test")
    assert await directory.owned_account(app.id, account.id) == account
    assert await directory.owned_account(app.id + 1, account.id) is None  # another application's
    shard = shard_of(account.id)
    for n in range(1, 50):
        assert await directory.account(make_id(shard, MAX_LOCAL - n)) is None
    assert len(directory._unknown_accounts) == 5
    assert directory._accounts[account.id] == account

    async with router.global_pool.acquire() as conn, conn.cursor() as cur:
        # the signal of a shard move or failover; the map itself is unchanged
        await cur.execute(
            f"UPDATE `{router.global_schema}`.shard_map_version SET version = version + 1 WHERE id = 1"
        )
        await conn.commit()
    assert await router.reload()
    assert await directory.account(account.id) == account  # read again: the caches were emptied
    assert len(directory._unknown_accounts) == 0
