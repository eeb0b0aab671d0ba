"""Token buckets and concurrency slots keyed by an id (an account, an application, a client
address), with no I/O: the clock is injected.

Each key gets a bucket holding up to ``burst`` tokens that refills at ``rate_per_s``. A request
for several keys at once (:meth:`KeyedTokenBuckets.acquire`) takes tokens from every bucket or
from none, so a batch that one account cannot afford leaves every other budget untouched.

The number of tracked keys is capped: past ``max_keys`` the least recently used bucket is
forgotten. A forgotten key starts again with a full bucket, which only ever lets a quiet key
through sooner; a key busy enough to matter is never the least recently used.

:class:`KeyedSlots` counts what a key holds open at once (streams, long-polls): a key is tracked
only while it holds a slot, so memory is bounded by the requests in progress.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Denied", "KeyedSlots", "KeyedTokenBuckets", "SlotsTaken"]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Denied(Generic[K]):
    """Why a request was refused: the first key short of tokens and when it will have enough.

    ``retry_after_s`` is ``math.inf`` when the request asks that key for more than its burst:
    waiting never helps, the request must be split.
    """

    key: K
    requested: int
    available: float
    retry_after_s: float


class KeyedTokenBuckets(Generic[K]):
    """Per-key token buckets.

    :param rate_per_s: tokens added to each bucket per second.
    :param burst: the most tokens a bucket holds (and what a new key starts with).
    :param max_keys: how many keys are tracked before the least recently used is forgotten.
    :param clock: monotonic seconds; ``time.monotonic`` unless a test injects its own.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst <= 0 or max_keys <= 0:
            raise ValueError("rate_per_s, burst and max_keys must be positive")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[K, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def available(self, key: K) -> float:
        return self._refilled(key, self._clock())

    def _refilled(self, key: K, now: float) -> float:
        state = self._buckets.get(key)
        if state is None:
            return float(self.burst)
        tokens, at = state
        return min(float(self.burst), tokens + max(0.0, now - at) * self.rate_per_s)

    def retry_after_s(self, key: K, cost: int = 1) -> float:
        """How long until ``key`` has ``cost`` tokens: 0 when it has them now."""
        return max(0.0, (cost - self.available(key)) / self.rate_per_s)

    def acquire(self, costs: Mapping[K, int]) -> Denied[K] | None:
        """Take ``costs[key]`` tokens from every key, or nothing at all; None when granted."""
        now = self._clock()
        levels = {key: self._refilled(key, now) for key in costs}
        for key, cost in costs.items():
            if cost > self.burst:
                return Denied(key, cost, levels[key], math.inf)
            if cost > levels[key]:
                return Denied(key, cost, levels[key], (cost - levels[key]) / self.rate_per_s)
        for key, cost in costs.items():
            self._store(key, levels[key] - cost, now)
        return None

    def refund(self, costs: Mapping[K, int]) -> None:
        """Give back tokens taken by :meth:`acquire` for work that did not happen after all."""
        now = self._clock()
        for key, cost in costs.items():
            self._store(key, min(float(self.burst), self._refilled(key, now) + cost), now)

    def _store(self, key: K, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)


class SlotsTaken(Exception):
    """Every slot of ``key`` is held."""

    def __init__(self, key: object, limit: int) -> None:
        super().__init__(f"{key!r} holds all its {limit} slots")
        self.key = key
        self.limit = limit


class KeyedSlots(Generic[K]):
    """At most ``limit`` slots held at once per key.

    :param limit: slots per key.
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.limit = limit
        self._held: dict[K, int] = {}

    def held(self, key: K) -> int:
        return self._held.get(key, 0)

    def __len__(self) -> int:
        """Keys holding a slot now."""
        return len(self._held)

    @contextlib.contextmanager
    def slot(self, key: K) -> Iterator[None]:
        """Hold one of ``key``'s slots inside the block (released however it ends, cancellation
        included); raises :class:`SlotsTaken` when all are held."""
        held = self._held.get(key, 0)
        if held >= self.limit:
            raise SlotsTaken(key, self.limit)
        self._held[key] = held + 1
        try:
            yield
        finally:
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]
