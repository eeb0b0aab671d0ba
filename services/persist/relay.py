"""The change relay: every committed row of every shard's ``changes`` table onto flightlog.changes.

An outbox relay. For each shard it reads ``WHERE id > position ORDER BY id LIMIT n``, publishes
the rows keyed by account id (so one account's changes stay in one partition, in order), waits
for Kafka's acks and only then moves the shard's position; acknowledged positions are written to
``relay_positions`` (global schema) every ``relay_position_flush_ms``, off the publishing path.
A crash before a position is written publishes those rows again: at least once, never a gap.
Ids missing because their transaction rolled back cannot stall it: writers commit
change rows in id order (the shard's ``changes_lock``), so when a read returns id N every lower
committed id was already visible.

The writer of the same process hands over the change rows it committed (:meth:`ChangeRelay.notify`):
rows that follow the shard's position with no id between are published as they are, without a
read (:func:`following`); anything else (another writer's rows, an id a rolled-back transaction
took, a backlog) leaves a gap, and the shard is read. Under load that spares a read and its commit
per shard and persist batch, which competed with the writer for MariaDB: 0.18 ms of MariaDB's CPU
and 0.11 ms of persist's each.

Only one relay publishes at a time, whatever the number of persist replicas: the active one holds
the MySQL named lock ``flightlog.change-relay`` on a dedicated connection, and writes its
positions through that same connection, so a relay that lost the lock (its connection died)
cannot move a position any more. The others wait as standbys. Shards are tailed by independent
tasks, so a slow or unreachable shard never holds back the others.

Message value (JSON, UTF-8), see README "The change firehose"::

    {"schema_version": 1, "change_id": "1970324836974593", "shard": 7, "account_id": "1970324836974593",
     "application_id": "12", "object_type": "message", "object_id": "1970324836974601",
     "change_type": "created", "version": 3, "created_at": "2026-11-23T13:01:02.123456Z",
     "status": "sent"}

``status`` is there only when the change moved a message to another status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple

import asyncmy
import orjson
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter, Gauge

from libs.component import Component
from libs.config import DatabaseSettings
from libs.events import SCHEMA_VERSION
from libs.inflight import publish_records
from libs.kafka import CHANGES
from libs.leader import lead_until_stopped, sleep_unless_stopped
from libs.shards import ShardRouter

__all__ = [
    "ChangeRelay",
    "CommittedChange",
    "RelayPublishFailed",
    "RelaySettings",
    "change_message",
    "following",
    "read_statement",
]

logger = logging.getLogger(__name__)


_published = Counter("flightlog_relay_changes_published_total", "Changes published to flightlog.changes")
_rounds = Counter(
    "flightlog_relay_rounds_total",
    "Turns of a shard's tail: a read of the shard (source=read), or rows its writer handed over"
    " published without one (source=handed)",
    ["source"],
)
_position = Gauge("flightlog_relay_position", "Last published change id per shard", ["shard"])
_active = Gauge("flightlog_relay_active", "1 while this process holds the relay lock")


class RelayPublishFailed(Exception):
    """Kafka did not acknowledge a publish of changes; the tails that handed them retry."""


class RelaySettings(DatabaseSettings):
    """The change relay inside persist.

    ``relay_enabled`` false runs persist without the relay (one relay publishes at a time, whatever
    the number of persist replicas that run one); ``relay_batch_size`` is the most change rows read from a
    shard at once; ``relay_error_backoff_s`` is the pause after a failed read or publish.
    """

    relay_enabled: bool = True
    relay_batch_size: int = 1000
    # How often an idle shard is read again at first; it doubles while reads find nothing.
    relay_idle_poll_ms: int = 50
    # The longest idle wait. A commit of this process's writer wakes its shard's reader at once,
    # so this bounds only the delay of changes committed by another persist replica.
    relay_idle_poll_max_ms: int = 500
    # how often acknowledged positions are written; a crash re-publishes at most this much
    relay_position_flush_ms: int = 200
    relay_standby_poll_s: float = 2.0  # how often a standby tries to take the lock
    relay_error_backoff_s: float = 1.0


class CommittedChange(NamedTuple):
    """A committed ``changes`` row with its account's application: what a relay read returns, and
    what persist's writer hands over after its commit (:meth:`ChangeRelay.notify`)."""

    id: int
    account_id: int
    application_id: int | None
    object_type: str
    object_id: int
    change_type: str
    version: int
    created_at: Decimal  # UNIX_TIMESTAMP(created_at): UTC whatever the server's time zone
    status: str | None


def change_message(shard: int, row: Sequence[Any]) -> tuple[bytes, bytes]:
    """(key, value) of one ``changes`` row joined with its account's application id."""
    change_id, account_id, application_id, object_type, object_id, change_type, version, created, status = row
    # UNIX_TIMESTAMP: correct whatever the server's time zone is
    created_at = datetime.fromtimestamp(float(created), UTC).replace(tzinfo=None)
    value = {
        "schema_version": SCHEMA_VERSION,  # libs.events.ChangeRecord is the contract
        "change_id": str(change_id),
        "shard": shard,
        "account_id": str(account_id),
        "application_id": None if application_id is None else str(application_id),
        "object_type": object_type,
        "object_id": str(object_id),
        "change_type": change_type,
        "version": int(version),
        "created_at": created_at.isoformat(timespec="microseconds") + "Z",
    }
    if status is not None:
        value["status"] = status
    return str(account_id).encode(), orjson.dumps(value)


def read_statement(router: ShardRouter, shard: int) -> str:
    """A tail's read of ``shard``: the :class:`CommittedChange` rows past an id (``%s``), at most a
    number of them (``%s``), in id order."""
    changes, accounts = router.table(shard, "changes"), router.table(shard, "accounts")
    return (
        "SELECT c.id, c.account_id, a.application_id, c.object_type, c.object_id, c.change_type,"
        f" c.version, UNIX_TIMESTAMP(c.created_at), c.status FROM {changes} c"
        f" LEFT JOIN {accounts} a ON a.id = c.account_id WHERE c.id > %s ORDER BY c.id LIMIT %s"
    )


def following(committed: Sequence[CommittedChange], position: int) -> list[CommittedChange] | None:
    """The rows a writer handed over past ``position``, in id order, when they follow it with no id
    between (None otherwise: the shard must be read).

    No id between is no committed row missed: writers insert change rows and commit under the
    shard's change lock, so ids commit in order, and a row of another writer (another persist
    replica, the retention job) or an id a rolled-back transaction took leaves a gap. None too
    when nothing is left past ``position``: a wake-up without news reads, as it always did.
    """
    rows = sorted((c for c in committed if c.id > position), key=lambda c: c.id)
    if not rows or any(c.id != position + 1 + i for i, c in enumerate(rows)):
        return None
    return rows


class ChangeRelay(Component):
    """Publishes ``changes`` rows of every shard in the shard map to ``topic``.

    :param router: the open shard router (shards are read on their primaries).
    :param producer: a started idempotent producer (``acks=all``).
    :param settings: batch size and poll intervals.

    ``start()`` runs it in the background, ``stop()`` finishes the batch in flight (publish and
    position) and returns; also ``async with``.
    """

    def __init__(
        self,
        router: ShardRouter,
        producer: AIOKafkaProducer,
        settings: RelaySettings | None = None,
        *,
        topic: str = CHANGES,
    ) -> None:
        self._router = router
        self._producer = producer
        self._settings = settings or RelaySettings()
        self._topic = topic
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._acked: dict[int, int] = {}  # shard -> last change id Kafka acknowledged
        self._wake: dict[int, asyncio.Event] = {}  # shard -> set when it committed changes
        self._handed: dict[int, list[CommittedChange]] = {}  # shard -> rows its writer committed
        # (key, value) of the changes the tails handed over, each tail's with the future it waits on
        self._outgoing: list[tuple[list[tuple[bytes, bytes]], asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.active = False

    async def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name="change-relay")

    async def stop(self, timeout_s: float = 20.0) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            logger.error("change relay did not drain in %.0f s; cancelling", timeout_s)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def notify(self, shard: int, committed: Sequence[CommittedChange] = ()) -> None:
        """``shard`` committed change rows: read it now rather than at its next idle poll.

        ``committed``: those rows, as the writer inserted them. When they follow what the shard's
        tail published last with no id between, it publishes them without reading the shard
        (:func:`following`); otherwise it reads, as for any wake-up. At most a read's worth is
        held a shard; past that the tail reads.
        """
        if committed and self.active:
            held = self._handed.setdefault(shard, [])
            if len(held) + len(committed) <= self._settings.relay_batch_size:
                held += committed
            else:
                held.clear()  # a gap, from now on: the tail reads
        self._wake_event(shard).set()

    def _wake_event(self, shard: int) -> asyncio.Event:
        event = self._wake.get(shard)
        if event is None:
            event = self._wake[shard] = asyncio.Event()
        return event

    async def _sleep(self, seconds: float) -> None:
        await sleep_unless_stopped(self._stopping, seconds)

    async def _idle(self, shard: int, seconds: float) -> None:
        """Wait ``seconds``, less if ``shard`` is notified or the relay stops."""
        wake = self._wake_event(shard)
        waits = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(self._stopping.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _run(self) -> None:
        s = self._settings
        await lead_until_stopped(
            s,
            "change-relay",
            self._stopping,
            self._lead,
            standby_poll_s=s.relay_standby_poll_s,
            error_backoff_s=s.relay_error_backoff_s,
            on_leading=self._set_active,
        )

    def _set_active(self, active: bool) -> None:
        self.active = active
        _active.set(int(active))

    async def _lead(self, conn: asyncmy.Connection) -> None:
        positions = await self._positions(conn)
        self._acked = dict(positions)
        saved = dict(positions)
        tails: dict[int, asyncio.Task[None]] = {}
        try:
            while not self._stopping.is_set():
                for shard in self._router.shard_map.shards:
                    if shard not in tails:
                        tails[shard] = asyncio.create_task(
                            self._tail(shard, positions.get(shard, 0)), name=f"relay-shard-{shard}"
                        )
                for t in [t for t in tails.values() if t.done()]:
                    t.result()  # a tail only ends by failing: the leadership ends; _run starts over
                await self._sleep(self._settings.relay_position_flush_ms / 1000)
                await self._save_positions(conn, saved)
        finally:
            if not self._stopping.is_set():  # failing: the tails stop where they are
                for t in tails.values():
                    t.cancel()
            for r in await asyncio.gather(*tails.values(), return_exceptions=True):
                if isinstance(r, Exception):
                    logger.error("relay tail failed: %r", r)
            if self._sender is not None:  # nobody waits for it any more: let it end
                await asyncio.gather(self._sender, return_exceptions=True)
        await self._save_positions(conn, saved)  # draining: what the tails published last

    async def _positions(self, conn: asyncmy.Connection) -> dict[int, int]:
        async with conn.cursor() as cur:
            await cur.execute(
                f"SELECT shard_id, last_change_id FROM `{self._router.global_schema}`.relay_positions"
            )
            rows = await cur.fetchall()
        await conn.commit()
        return {int(a): int(b) for a, b in rows}

    async def _tail(self, shard: int, position: int) -> None:
        """Publish one shard's changes until stopping; the batch in flight always completes."""
        query = read_statement(self._router, shard)
        min_idle_s = self._settings.relay_idle_poll_ms / 1000
        max_idle_s = max(self._settings.relay_idle_poll_max_ms / 1000, min_idle_s)
        idle_s = min_idle_s
        wake = self._wake_event(shard)
        while not self._stopping.is_set():
            wake.clear()  # a commit from now on is read by the next poll, or wakes the wait
            rows: Sequence[Sequence[Any]] | None = following(self._handed.pop(shard, []), position)
            handed = rows is not None
            _rounds.labels("handed" if handed else "read").inc()
            try:
                if rows is None:
                    pool = await self._router.pool(shard, write=False)
                    async with pool.acquire() as shard_conn, shard_conn.cursor() as cur:
                        await cur.execute(query, (position, self._settings.relay_batch_size))
                        rows = await cur.fetchall()
                        await shard_conn.commit()  # a fresh read view for the next poll
                if rows:
                    await self._publish(shard, rows)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # This shard's server or Kafka is unwell: retry this shard from the same position
                # (re-publishing is allowed, skipping is not) while the other shards go on.
                logger.warning("relay: shard %d failed (%r); retrying", shard, exc)
                await self._sleep(self._settings.relay_error_backoff_s)
                continue
            if not rows:
                await self._idle(shard, idle_s)
                idle_s = min_idle_s if wake.is_set() else min(idle_s * 2, max_idle_s)
                continue
            # Rows read: more may follow soon. Rows handed over: the next commit of this writer
            # wakes the tail with its own; the poll is for other writers' rows only, and slows.
            idle_s = min(idle_s * 2, max_idle_s) if handed else min_idle_s
            position = int(rows[-1][0])
            self._acked[shard] = position  # saved by _lead every relay_position_flush_ms
            _published.inc(len(rows))
            _position.labels(str(shard)).set(position)
            if len(rows) < self._settings.relay_batch_size:
                await self._idle(shard, idle_s)

    async def _publish(self, shard: int, rows: Sequence[Sequence[Any]]) -> None:
        """Publish ``rows`` (in change id order) and wait for Kafka's acks.

        Every change goes to the partition the producer's own partitioner gives its account
        (:func:`libs.inflight.partition_for`), so an account's changes land where they always did.
        The shards' tails publish at the same moments (one writer commit wakes every shard it
        wrote), so their changes are handed to one sender (:meth:`_send_outgoing`): what the
        tails hand over while a publish is in flight goes out together in the next, one record
        batch per partition (:func:`libs.inflight.publish_records`). A ``send`` per change cost
        9.9 us of CPU (a partitioner call and a future per record), a batch 1 us a change; a
        batch per tail queued behind the other tails' batches of the same partition, one produce
        request each. A tail hands over its next rows only once these are acknowledged, so each
        shard's changes keep their order.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outgoing.append(([change_message(shard, r) for r in rows], done))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_outgoing(), name="relay-publish")
        await done

    async def _send_outgoing(self) -> None:
        while self._outgoing:
            taken, self._outgoing = self._outgoing, []
            try:
                await publish_records(self._producer, [m for ms, _ in taken for m in ms], topic=self._topic)
            except BaseException as exc:
                for _, done in taken:  # each tail retries from its position, as after any failure
                    if not done.done():
                        done.set_exception(RelayPublishFailed(f"publishing changes failed: {exc!r}"))
                if not isinstance(exc, Exception):
                    raise
            else:
                for _, done in taken:
                    if not done.done():
                        done.set_result(None)

    async def _save_positions(self, conn: asyncmy.Connection, saved: dict[int, int]) -> None:
        """Write the acknowledged positions that moved since the last save, in one transaction."""
        moved = [(shard, pos) for shard, pos in self._acked.items() if saved.get(shard) != pos]
        if not moved:
            return
        async with conn.cursor() as cur:
            await cur.execute(
                f"INSERT INTO `{self._router.global_schema}`.relay_positions (shard_id, last_change_id)"
                f" VALUES {', '.join(['(%s, %s)'] * len(moved))} ON DUPLICATE KEY UPDATE"
                " last_change_id = GREATEST(last_change_id, VALUES(last_change_id))",
                [v for pair in moved for v in pair],
            )
            await conn.commit()
        saved.update(moved)
