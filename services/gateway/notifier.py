"""The change notifier: one per gateway process, it wakes the delta streams whose account changed.

An open SSE stream or long-poll reads the database only when woken, so idle streams cost no
queries: it subscribes its account (:meth:`ChangeNotifier.subscribe`) before its first read and
reads again when the notifier sets its event. Clearing the event before each read means a change
that commits during the read wakes it once more: nothing falls between a read and the next wait.

Two feeds wake streams:

* **flightlog.changes**, where the change relay publishes every committed change row (see
  :mod:`services.persist.relay`). A consumer without a group reads every partition from its end
  and wakes the streams of each message's account within milliseconds of the relay's publish.
  The record's key is its account id: a record of an account no stream watches is not parsed,
  except the last of each shard in each partition of a poll, whose change id (the highest of that
  shard there, as the relay publishes in id order) is all the safety check needs of it.
* **A safety check per shard**, every ``gateway_delta_recheck_s``, for the shards that have
  streams: it reads each shard's newest change id (one query per server), and when a change that
  was already committed at the previous check has still not come through the topic (the relay is
  down or lags, Kafka is unreachable, the consumer restarted and skipped some), it wakes every
  stream of that shard. A lost notification therefore costs at most two check intervals of
  latency, never a change: a woken stream reads everything after its own cursor, whatever woke it.

A long-poll or stream that asks again with a cursor at the newest change of its shard (what an
idle follower's cursor is: a read that finds nothing moves it to the shard's newest id) skips its
first read when :meth:`ChangeNotifier.quiet_after` says nothing can have committed after it
unannounced: the subscription taken before that test is woken by any later change. So idle
followers asking again cost no query either.

A notification can arrive before a read sees its row (reads may go to a replica that applies it
a few milliseconds later): the subscription keeps the highest change id notified, and a stream
whose read did not reach it reads again shortly (:data:`CATCH_UP_RETRY_S`), a bounded number of
times. Shard moves keep change ids (a shard is copied whole) and the router follows the new map,
so neither feed needs to know about them; a stream whose read fails ends with an ``error`` event
and resumes with its cursor, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

import asyncmy
import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from prometheus_client import Counter, Gauge

from libs.aio import wait_for
from libs.component import Component
from libs.ids import shard_of
from libs.shards import ShardRouter

__all__ = ["CATCH_UP_RETRY_S", "CATCH_UP_TRIES", "ChangeNotifier", "Subscription"]

logger = logging.getLogger(__name__)

# A stream whose read did not yet reach a notified change id reads again after this long, at most
# this many times (then the next notification or the safety check takes over).
CATCH_UP_RETRY_S: Final = 0.05
CATCH_UP_TRIES: Final = 40
CONSUMER_RETRY_S: Final = 2.0  # after the notifier's consumer failed
MAX_RECORDS_PER_POLL: Final = 5000

_wakes = Counter("flightlog_gateway_delta_wakes_total", "Delta streams woken, by what woke them", ["cause"])
_subscribed = Gauge(
    "flightlog_gateway_delta_streams", "Open delta streams and long-polls waiting for changes"
)
_checks = Counter("flightlog_gateway_delta_checks_total", "Safety checks (one query per server)")
_feed_up = Gauge("flightlog_gateway_delta_feed_up", "1 while the notifier consumes flightlog.changes")


def _account_of(key: bytes | None) -> int | None:
    """The account id a flightlog.changes key names (the relay keys by it), None if it names none."""
    if key is None or not key.isdigit():  # isdigit: ASCII digits only, no sign, space or underscore
        return None
    try:
        return int(key)
    except ValueError:  # longer than int()'s digit limit
        return None


@dataclass(eq=False, slots=True)
class Subscription:
    """One waiting stream: its event is set when its account may have changed."""

    account_id: int
    event: asyncio.Event = field(default_factory=asyncio.Event)
    notified: int = 0  # the highest change id of this account the topic announced
    catch_up_tries: int = 0

    def wake(self, change_id: int = 0) -> None:
        if change_id > self.notified:
            self.notified = change_id
            self.catch_up_tries = 0
        self.event.set()

    async def wait(self, position: int, timeout_s: float) -> bool:
        """Wait until woken or ``timeout_s``; True when the stream should read again.

        ``position`` is where the stream's last read ended: below a notified change id, that
        read ran before the change was visible to it, so it reads again soon, woken or not.
        """
        catching_up = self.notified > position and self.catch_up_tries < CATCH_UP_TRIES
        if catching_up:
            self.catch_up_tries += 1
            timeout_s = min(timeout_s, CATCH_UP_RETRY_S)
        try:
            await wait_for(self.event.wait(), max(timeout_s, 0.0))
        except TimeoutError:
            return catching_up
        self.event.clear()  # before the read: a change during it wakes the stream again
        return True


class ChangeNotifier(Component):
    """Wakes the subscriptions of the accounts whose changes moved; see the module docstring.

    :param router: the shard router the safety check reads through (the pools the streams read).
    :param consumer_factory: makes a not yet started consumer of flightlog.changes without a
        group, starting at the topic's end; None runs the safety check alone.
    :param recheck_s: the safety check's interval.
    :param stopping: when set (SIGTERM), every subscription is woken so its stream can end.
    """

    def __init__(
        self,
        router: ShardRouter,
        consumer_factory: Callable[[], AIOKafkaConsumer] | None,
        *,
        recheck_s: float,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self._router = router
        self._consumer_factory = consumer_factory
        self._recheck_s = recheck_s
        self._stopping = stopping
        self._subs: dict[int, set[Subscription]] = {}
        self._seen: dict[int, int] = {}  # shard -> highest change id the topic delivered
        self._woken: dict[int, int] = {}  # shard -> highest id the safety check woke streams for
        self._previous_top: dict[int, int] = {}  # shard -> newest change id at the previous check
        self._checked_at: dict[int, float] = {}  # shard -> when that check ran (monotonic)
        self._feed_since = float("inf")  # when the topic feed last came up (monotonic)
        self._tasks: list[asyncio.Task[None]] = []
        self.feed_up = False

    async def start(self) -> None:
        if self._tasks:
            return
        self._tasks.append(asyncio.create_task(self._check_forever(), name="delta-check"))
        if self._consumer_factory is not None:
            self._tasks.append(asyncio.create_task(self._consume_forever(), name="delta-feed"))
        if self._stopping is not None:
            self._tasks.append(asyncio.create_task(self._wake_on_stop(self._stopping), name="delta-stop"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.wake_all("stop")

    @contextlib.contextmanager
    def subscribe(self, account_id: int) -> Iterator[Subscription]:
        sub = Subscription(account_id)
        self._subs.setdefault(account_id, set()).add(sub)
        _subscribed.inc()
        try:
            yield sub
        finally:
            _subscribed.dec()
            subs = self._subs.get(account_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[account_id]

    def notify(self, account_id: int, shard: int, change_id: int) -> None:
        """A change committed (the topic said so): wake the account's streams."""
        if change_id > self._seen.get(shard, 0):
            self._seen[shard] = change_id
        subs = self._subs.get(account_id)
        if subs:
            _wakes.labels("change").inc(len(subs))
            for sub in subs:
                sub.wake(change_id)

    def wake_all(self, cause: str) -> None:
        for subs in self._subs.values():
            _wakes.labels(cause).inc(len(subs))
            for sub in subs:
                sub.wake()

    def _wake_shard(self, shard: int) -> None:
        for account_id, subs in self._subs.items():
            if shard_of(account_id) == shard:
                _wakes.labels("check").inc(len(subs))
                for sub in subs:
                    sub.wake()

    async def _wake_on_stop(self, stopping: asyncio.Event) -> None:
        await stopping.wait()
        self.wake_all("stop")

    def _on_records(self, records: Iterable[ConsumerRecord[bytes, bytes]]) -> None:
        """One partition's records of a poll, in order; see the module docstring."""
        last_unwatched: dict[int, bytes | None] = {}  # shard -> value of its last unwatched record
        for record in records:
            account_id = _account_of(record.key)
            if account_id is None or account_id in self._subs:
                self._on_record(record.value)
            else:
                last_unwatched[shard_of(account_id)] = record.value
        for value in last_unwatched.values():
            self._on_record(value)

    def _on_record(self, value: bytes | None) -> None:
        try:
            change = orjson.loads(value or b"")
            self.notify(int(change["account_id"]), int(change["shard"]), int(change["change_id"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.warning("skipping a malformed flightlog.changes message: %r", (value or b"")[:200])

    async def _consume_forever(self) -> None:
        assert self._consumer_factory is not None
        while True:
            consumer = self._consumer_factory()
            try:
                await consumer.start()
                first = True
                while True:
                    batches = await consumer.getmany(timeout_ms=1000, max_records=MAX_RECORDS_PER_POLL)
                    if first:
                        # Positions are known from here on; a change between a stream's first read
                        # and this point may have been before them: every stream reads once more.
                        first = False
                        self.feed_up = True
                        self._feed_since = time.monotonic()
                        _feed_up.set(1)
                        self.wake_all("feed")
                    for records in batches.values():
                        self._on_records(records)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning(
                    "change notifier: consumer failed (%r); safety checks only until it restarts", exc
                )
            finally:
                self.feed_up = False
                self._feed_since = float("inf")
                _feed_up.set(0)
                with contextlib.suppress(Exception):
                    await consumer.stop()
            await asyncio.sleep(CONSUMER_RETRY_S)

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self._recheck_s)
            await self.check_shards({shard_of(a) for a in self._subs})

    async def check_shards(self, shards: Iterable[int]) -> None:
        """Wake the streams of each shard where a change committed by the previous check has not
        come through the topic since. One query per server, whatever its number of shards."""
        by_pool: dict[int, tuple[asyncmy.Pool, list[int]]] = {}
        for shard in sorted(shards):
            try:
                pool = await self._router.pool(shard, write=False)
            except Exception as exc:
                logger.warning("change notifier: shard %d check failed: %r", shard, exc)
                continue
            by_pool.setdefault(id(pool), (pool, []))[1].append(shard)
        for pool, group in by_pool.values():
            _checks.inc()
            query = " UNION ALL ".join(
                f"SELECT {int(shard)}, COALESCE(MAX(id), 0) FROM {self._router.table(shard, 'changes')}"
                for shard in group
            )
            try:
                async with pool.acquire() as conn, conn.cursor() as cur:
                    await cur.execute(query)
                    tops = {int(shard): int(top) for shard, top in await cur.fetchall()}
                    await conn.commit()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The streams' own reads fail the same way and end their streams.
                logger.warning("change notifier: check of shards %s failed: %r", group, exc)
                continue
            checked_at = time.monotonic()
            for shard, top in tops.items():
                self._judge(shard, top)
                self._checked_at[shard] = checked_at

    def quiet_after(self, shard: int, position: int) -> bool:
        """True when nothing committed on ``shard`` after change id ``position`` can have gone by
        unannounced: the topic feed is up, a safety check read the shard's newest id since the
        feed came up, and ``position`` reaches both that id and the highest the topic delivered.
        A change after that check is on the topic the feed reads, so a subscription taken
        before asking is woken by it."""
        checked_at = self._checked_at.get(shard)
        if not self.feed_up or checked_at is None or checked_at < self._feed_since:
            return False
        return position >= max(self._previous_top[shard], self._seen.get(shard, 0))

    def _judge(self, shard: int, top: int) -> None:
        previous = self._previous_top.get(shard)
        self._previous_top[shard] = top
        known = max(self._seen.get(shard, 0), self._woken.get(shard, 0))
        if previous is not None and previous > known:
            # read before waking, so every woken stream's read reaches at least ``top``
            self._woken[shard] = top
            self._wake_shard(shard)
