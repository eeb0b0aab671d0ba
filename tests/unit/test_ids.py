from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.ids import (
    MAX_LOCAL,
    MAX_SHARD,
    InvalidId,
    ShardBitsMismatch,
    auto_increment_start,
    check_shard,
    local_of,
    make_id,
    parse_public_id,
    shard_of,
)

shards = st.integers(min_value=0, max_value=MAX_SHARD)
locals_ = st.integers(min_value=1, max_value=MAX_LOCAL)


@given(shards, locals_)
def test_round_trip(shard: int, local: int) -> None:
    id_ = make_id(shard, local)
    assert shard_of(id_) == shard
    assert local_of(id_) == local
    assert 0 < id_ < 2**64
    assert parse_public_id(str(id_)) == id_


@given(shards, locals_, locals_)
def test_ids_of_one_shard_sort_by_local_counter(shard: int, a: int, b: int) -> None:
    assert (make_id(shard, a) < make_id(shard, b)) == (a < b)


@given(shards)
def test_auto_increment_start_is_first_id_of_shard(shard: int) -> None:
    start = auto_increment_start(shard)
    assert start == (shard << 48) + 1
    assert shard_of(start) == shard and local_of(start) == 1
    assert shard_of(start - 1) != shard or local_of(start - 1) == 0


@given(shards, locals_, shards)
def test_check_shard(shard: int, local: int, other: int) -> None:
    id_ = make_id(shard, local)
    assert check_shard(id_, shard) == id_
    if other != shard:
        with pytest.raises(ShardBitsMismatch, match=f"expected shard {other}"):
            check_shard(id_, other)


def test_counter_that_fell_back_to_one_is_refused() -> None:
    # MySQL bug #199: after a restart an empty table's counter restarted at 1.
    with pytest.raises(ShardBitsMismatch):
        check_shard(1, 7)


@pytest.mark.parametrize(("shard", "local"), [(-1, 1), (MAX_SHARD + 1, 1), (0, 0), (3, MAX_LOCAL + 1)])
def test_make_id_rejects_out_of_range(shard: int, local: int) -> None:
    with pytest.raises(InvalidId):
        make_id(shard, local)


@pytest.mark.parametrize(
    "text", ["", "abc", "-5", "1.5", " 12", "٣", "0", str(2**64), "9" * 21, str(5 << 48)]
)
def test_parse_public_id_rejects(text: str) -> None:
    with pytest.raises(InvalidId):
        parse_public_id(text)
