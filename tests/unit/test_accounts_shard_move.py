"""libs.accounts.AccountDirectory.account while a shard moves: a read that finds the shard's tables
gone (the move's fence renamed them) waits for the map to say where the shard is, through the
move's fence (readonly, same cluster) to its switch (another cluster), or its rollback (reopened
where it was); it fails with ShardMoved only when the map says nothing new in time."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncmy.errors
import pytest

from libs import accounts
from libs.accounts import Account, AccountDirectory
from libs.shards import Cluster, ShardMap, ShardMoved

SHARD = 3
ACCOUNT = SHARD << 48 | 7
CLUSTERS = {1: Cluster(1, "c1", "127.0.0.1", 3307), 2: Cluster(2, "c2", "127.0.0.1", 3308)}


def _map(version: int, cluster: int, *, readonly: bool = False) -> ShardMap:
    return ShardMap(version, CLUSTERS, {SHARD: cluster}, frozenset({SHARD}) if readonly else frozenset())


class _Router:
    """What the directory uses of a ShardRouter: its map, and the reloads it asks for."""

    def __init__(self, shard_map: ShardMap) -> None:
        self.shard_map = shard_map
        self.reloads = 0

    async def reload(self) -> bool:
        self.reloads += 1
        return False

    def request_reload(self) -> None:
        pass


def _directory(router: _Router, reads: list[ShardMap]) -> AccountDirectory:
    directory = AccountDirectory(router)  # type: ignore[arg-type]

    async def account_row(shard: int, account_id: int) -> tuple[Any, ...] | None:
        reads.append(router.shard_map)
        if router.shard_map.shard_cluster[shard] == 1 and router.shard_map.version < 4:
            raise asyncmy.errors.ProgrammingError(1146, "Table 'flightlog_shard_0003.accounts' doesn't exist")
        return (account_id, 9, "a@example.test", "api")

    directory._account_row = account_row  # type: ignore[method-assign]
    return directory


async def _publish_later(router: _Router, *maps: ShardMap) -> None:
    for shard_map in maps:
        await asyncio.sleep(0.05)
        router.shard_map = shard_map


async def _read_while_published(*maps: ShardMap) -> tuple[Account | None, list[int]]:
    """The account read while ``maps`` are published one after the other, and the map versions
    it was read with."""
    router = _Router(_map(1, 1))
    reads: list[ShardMap] = []
    directory = _directory(router, reads)
    publishing = asyncio.create_task(_publish_later(router, *maps))
    account = await directory.account(ACCOUNT)
    await publishing
    return account, [m.version for m in reads]


async def test_a_read_in_the_write_pause_waits_for_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounts, "MOVE_POLL_S", 0.01)
    # The fence is published (readonly, the same cluster), then the switch (the other cluster).
    account, versions = await _read_while_published(_map(2, 1, readonly=True), _map(3, 2))
    assert account is not None and account.application_id == 9
    assert versions == [1, 3]  # not read again on the fence's map


async def test_a_move_rolled_back_reads_where_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounts, "MOVE_POLL_S", 0.01)
    account, versions = await _read_while_published(_map(2, 1, readonly=True), _map(4, 1))
    assert account is not None
    assert versions == [1, 4]


async def test_a_map_that_says_nothing_new_in_time_is_shard_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounts, "MOVE_POLL_S", 0.01)
    monkeypatch.setattr(accounts, "MOVE_WAIT_S", 0.1)
    router = _Router(_map(1, 1))
    directory = _directory(router, [])
    publishing = asyncio.create_task(_publish_later(router, _map(2, 1, readonly=True)))
    with pytest.raises(ShardMoved):
        await directory.account(ACCOUNT)
    await publishing
    assert router.reloads == 1
