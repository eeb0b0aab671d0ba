"""64-bit ids that carry their shard: upper 16 bits the logical shard, lower 48 a local counter.

Routing any account, message or change is a bit shift, with no lookup on the hot path. Public
JSON carries ids as decimal strings, because a 64-bit id does not fit a JavaScript number.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "LOCAL_BITS",
    "MAX_LOCAL",
    "MAX_SHARD",
    "InvalidId",
    "ShardBitsMismatch",
    "auto_increment_start",
    "check_shard",
    "local_of",
    "make_id",
    "parse_public_id",
    "shard_of",
]

SHARD_BITS: Final = 16
LOCAL_BITS: Final = 48
MAX_SHARD: Final = (1 << SHARD_BITS) - 1
MAX_LOCAL: Final = (1 << LOCAL_BITS) - 1


class InvalidId(ValueError):
    """A value is not a flightlog id."""


class ShardBitsMismatch(InvalidId):
    """The database handed back an id whose shard bits are not the shard it was written to.

    This is the MySQL bug #199 guard: an auto-increment counter that fell back to 1 would
    otherwise write ids that route to shard 0.
    """

    def __init__(self, id_: int, expected_shard: int) -> None:
        super().__init__(f"id {id_} carries shard {shard_of(id_)}, expected shard {expected_shard}")
        self.id = id_
        self.expected_shard = expected_shard


def make_id(shard: int, local: int) -> int:
    if not 0 <= shard <= MAX_SHARD:
        raise InvalidId(f"shard {shard} out of range 0..{MAX_SHARD}")
    if not 0 < local <= MAX_LOCAL:
        raise InvalidId(f"local id {local} out of range 1..{MAX_LOCAL}")
    return (shard << LOCAL_BITS) | local


def shard_of(id_: int) -> int:
    return id_ >> LOCAL_BITS


def local_of(id_: int) -> int:
    return id_ & MAX_LOCAL


def auto_increment_start(shard: int) -> int:
    """The first id of a new shard table: ``(shard << 48) + 1``."""
    return make_id(shard, 1)


def check_shard(id_: int, shard: int) -> int:
    """Return ``id_`` if it belongs to ``shard``, else raise :class:`ShardBitsMismatch`."""
    if shard_of(id_) != shard or local_of(id_) == 0:
        raise ShardBitsMismatch(id_, shard)
    return id_


def parse_public_id(text: str) -> int:
    """Parse an id as it appears in URLs and JSON (a decimal string)."""
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise InvalidId(f"{text[:40]!r} is not an id: ids are decimal strings of up to 20 digits")
    value = int(text)
    if value >> 64 or local_of(value) == 0:
        raise InvalidId(f"{text} is not an id")
    return value
