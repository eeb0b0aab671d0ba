"""UID sets and fetch plans for the IMAP sync: pure logic, no I/O.

Every number here comes from the server and is treated as hostile. A UID set it sends
(``VANISHED 1:4294967295``) is kept as ranges and only ever intersected with UIDs we hold, so its
cost is linear in what we hold, never in what it claims. Fetches of message bodies are planned in
bytes from RFC822.SIZE, so one response holds a known amount whatever the messages' sizes.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

__all__ = [
    "MAX_UID",
    "MAX_UID_RANGES",
    "UidSet",
    "UidSetTooLarge",
    "format_uid_set",
    "format_uid_set_ranges",
    "plan_fetch_batches",
]

MAX_UID: Final = 2**32 - 1  # RFC 9051: a UID is a 32-bit nz-number (imap_uids.uid is INT UNSIGNED)
# Ranges of one UID set we are willing to hold (about 100 bytes each); a server's set with more
# is not parsed, and the sync compares UID lists instead.
MAX_UID_RANGES: Final = 100_000
_MAX_DIGITS: Final = len(str(MAX_UID))


class UidSetTooLarge(ValueError):
    """A UID set with more than the ranges we hold; callers fall back to listing UIDs."""


def _uid(token: bytes) -> int:
    # the length first: int() of a huge digit string is itself quadratic
    if not token.isdigit() or len(token) > _MAX_DIGITS:
        raise ValueError(f"not a UID: {token[:20]!r}")
    value = int(token)
    if not 1 <= value <= MAX_UID:
        raise ValueError(f"not a UID: {value}")
    return value


class UidSet:
    """A set of UIDs held as sorted, disjoint, non-adjacent inclusive ranges; never expanded.

    :param ranges: ``(low, high)`` pairs in any order, overlapping or not.
    """

    __slots__ = ("_highs", "_lows", "ranges")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted((min(a, b), max(a, b)) for a, b in ranges):
            if merged and lo <= merged[-1][1] + 1:
                if hi > merged[-1][1]:
                    merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        self.ranges: tuple[tuple[int, int], ...] = tuple(merged)
        self._lows = [lo for lo, _ in merged]
        self._highs = [hi for _, hi in merged]

    @classmethod
    def parse(cls, text: bytes, *, max_ranges: int = MAX_UID_RANGES) -> UidSet:
        """A ``sequence-set`` of UIDs (RFC 9051: ``1:3,7,9:12``); ``*`` is refused (a server's
        set names UIDs). Raises :class:`ValueError` if malformed, :class:`UidSetTooLarge` past
        ``max_ranges``, reading at most ``max_ranges`` ranges either way."""
        return cls(_parse_ranges(text, max_ranges))

    @classmethod
    def merge(cls, sets: Iterable[UidSet]) -> UidSet:
        return cls(r for s in sets for r in s.ranges)

    def __contains__(self, uid: object) -> bool:
        if not isinstance(uid, int):
            return False
        i = bisect.bisect_right(self._lows, uid) - 1
        return i >= 0 and uid <= self._highs[i]

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UidSet) and self.ranges == other.ranges

    def __hash__(self) -> int:
        return hash(self.ranges)

    def __repr__(self) -> str:
        return f"UidSet({format_uid_set_ranges(self.ranges)!r})"

    def select(self, uids: Iterable[int]) -> list[int]:
        """The ``uids`` in this set, in their order: O(len(uids) x log(ranges))."""
        return [u for u in uids if u in self]


def _parse_ranges(text: bytes, max_ranges: int) -> Iterator[tuple[int, int]]:
    count = 0
    for part in _split_lazily(text):
        count += 1
        if count > max_ranges:
            raise UidSetTooLarge(f"a UID set of more than {max_ranges} ranges")
        lo, colon, hi = part.partition(b":")
        a = _uid(lo)
        yield (a, _uid(hi) if colon else a)


def _split_lazily(text: bytes) -> Iterator[bytes]:
    """``text.split(b",")`` one part at a time: a huge set is refused before it is all split."""
    text = text.strip()
    start = 0
    while True:
        end = text.find(b",", start)
        if end < 0:
            yield text[start:]
            return
        yield text[start:end]
        start = end + 1


def format_uid_set_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}:{hi}" for lo, hi in ranges)


def format_uid_set(uids: Iterable[int]) -> str:
    """UIDs as a compact ``sequence-set`` (runs become ``a:b``), for a short command line."""
    return format_uid_set_ranges(UidSet((u, u) for u in uids).ranges)


def plan_fetch_batches(
    sizes: Sequence[tuple[int, int | None]],
    *,
    max_bytes: int,
    max_messages: int,
    per_message_cap_bytes: int,
) -> list[list[int]]:
    """Split ``(uid, RFC822.SIZE)`` pairs, in their order, into batches of at most
    ``max_messages`` UIDs whose planned bytes stay within ``max_bytes``.

    A message is planned at its size, capped at ``per_message_cap_bytes`` (the most fetched of
    one message); an unknown size counts as the cap. A message planned above ``max_bytes`` (a
    budget below the cap) goes alone in its batch, so every batch holds at least one message.
    """
    if max_messages < 1 or max_bytes < 1:
        raise ValueError("max_messages and max_bytes must be positive")
    batches: list[list[int]] = []
    batch: list[int] = []
    planned = 0
    for uid, size in sizes:
        cost = per_message_cap_bytes if size is None else max(0, min(size, per_message_cap_bytes))
        if batch and (len(batch) >= max_messages or planned + cost > max_bytes):
            batches.append(batch)
            batch, planned = [], 0
        batch.append(uid)
        planned += cost
    if batch:
        batches.append(batch)
    return batches
