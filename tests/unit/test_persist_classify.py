"""persist's failure classification, row conversion, and the worker's park-or-dead-letter policy.

The policy tests drive :class:`PersistWorker` with a recording producer and a ``write_shard``
that fails as told: no Kafka, no MariaDB (the real ones are in tests/integration).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import asyncmy.errors
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from pydantic import ValidationError

from libs.events import MessageDoc, PostflightRecord, encode
from libs.ids import ShardBitsMismatch
from libs.kafka import DLQ
from libs.shards import Cluster, ShardMap, ShardRouter, UnknownShard
from services.persist import worker as worker_module
from services.persist.worker import H_ATTEMPT, H_FAILURES, PersistSettings, PersistWorker, _Item
from services.persist.writer import Failure, ShardWriteResult, UnstorableRecord, classify, row

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
SHARD = 3
ACCOUNT = SHARD << 48 | 77


def _db(errno: int, cls: type[asyncmy.errors.MySQLError] = asyncmy.errors.OperationalError) -> Exception:
    error: Exception = cls(errno, "server said no")
    return error


@pytest.mark.parametrize(
    "exc",
    [
        _db(1406, asyncmy.errors.DataError),  # data too long
        _db(1264, asyncmy.errors.DataError),  # out of range
        _db(1292),  # incorrect datetime value (the driver calls it an OperationalError)
        _db(1366, asyncmy.errors.DataError),  # incorrect string value
        _db(1048, asyncmy.errors.IntegrityError),  # NULL in a NOT NULL column
        _db(4025),  # a CHECK, such as json_valid, failed
        _db(1153),  # over max_allowed_packet
        asyncmy.errors.DataError(9999, "any other data error"),
        orjson.JSONEncodeError("Integer exceeds 64-bit range"),
        UnstorableRecord(cast(PostflightRecord, None), "occurred_at: out of range"),
    ],
    ids=repr,
)
def test_permanent(exc: Exception) -> None:
    assert classify(exc) is Failure.PERMANENT


@pytest.mark.parametrize(
    "exc",
    [
        _db(2003),  # cannot connect
        _db(2013),  # lost connection during query
        _db(2006),  # server has gone away
        _db(1040),  # too many connections
        _db(1290),  # read-only during a failover
        asyncmy.errors.InterfaceError(0, ""),  # a closed connection
        asyncmy.errors.ProgrammingError(1146, "no such table"),  # a shard not migrated yet
        _db(1045),  # access denied
        TimeoutError(),
        ConnectionRefusedError(),
        UnknownShard("shard 9 is not in the map"),
        ShardBitsMismatch(1, 3),
    ],
    ids=repr,
)
def test_unavailable(exc: Exception) -> None:
    assert classify(exc) is Failure.UNAVAILABLE


@pytest.mark.parametrize(
    "exc",
    [_db(1205), _db(1213), _db(1105), asyncmy.errors.InternalError(1815, "internal"), RuntimeError("?")],
    ids=repr,
)
def test_transient(exc: Exception) -> None:
    # Not known to be the data's fault, nor a sign the shard is gone: retried, and charged to a
    # record that keeps failing on its own.
    assert classify(exc) is Failure.TRANSIENT


def _record(key: str = "m1", **doc: Any) -> PostflightRecord:
    fields: dict[str, Any] = {"status": "delivered", "occurred_at": NOW, **doc}
    return PostflightRecord(
        account_id=ACCOUNT, message_key=key, version=1, message=MessageDoc(**fields), emitted_at=NOW
    )


def _unchecked(key: str = "m1", **doc: Any) -> PostflightRecord:
    """A record built without validation, as one decoded before the models had their limits."""
    fields: dict[str, Any] = {"status": "delivered", "occurred_at": NOW, **doc}
    return PostflightRecord.model_construct(
        account_id=ACCOUNT, message_key=key, version=1, message=MessageDoc.model_construct(**fields)
    )


def test_row_converts_times_to_naive_utc() -> None:
    values, _, _ = row(_record(occurred_at=datetime(2026, 5, 1, 9, 0, tzinfo=timezone(timedelta(hours=-5)))))
    assert datetime(2026, 5, 1, 14, 0) in values


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (
            _unchecked(occurred_at=datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5)))),
            "occurred_at",
        ),
        (_unchecked(occurred_at=datetime(999, 12, 31, 23, tzinfo=UTC)), "occurred_at"),
        (_unchecked(final_at=datetime(9999, 12, 31, 12, tzinfo=UTC)), "final_at"),
        (_unchecked(key="é" * 255), "message_key"),
    ],
)
def test_row_refuses_what_no_column_holds(record: PostflightRecord, field: str) -> None:
    with pytest.raises(UnstorableRecord, match=field) as caught:
        row(record)
    assert caught.value.record is record
    assert classify(caught.value) is Failure.PERMANENT


def test_settings_keep_lock_waits_below_the_write_timeout() -> None:
    with pytest.raises(ValidationError, match="LOCK_WAIT_TIMEOUT_S"):
        PersistSettings(persist_write_timeout_s=5, persist_lock_wait_timeout_s=5)


class _Producer:
    """Records what would be sent; every send is acknowledged at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, dict[str, bytes]]] = []

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: Any = None
    ) -> asyncio.Future[None]:
        self.sent.append((topic, value, dict(headers or [])))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    def to(self, topic: str) -> list[tuple[bytes | None, dict[str, bytes]]]:
        return [(value, headers) for t, value, headers in self.sent if t == topic]


class _FailingWrites:
    """A ``write_shard`` that raises ``errors[record key]`` when the part holds that record."""

    def __init__(self, errors: dict[str, Exception]) -> None:
        self.errors = errors
        self.parts: list[list[str]] = []

    async def __call__(
        self, router: ShardRouter, shard: int, records: Sequence[PostflightRecord], **_: Any
    ) -> ShardWriteResult:
        keys = [r.message_key for r in records]
        self.parts.append(keys)
        for key in keys:
            if key in self.errors:
                raise self.errors[key]
        return ShardWriteResult(shard, len(records), len(records), 0, 0)


class _Router:
    """What the worker reads of the router itself (``write_shard`` and ``write_shards`` are
    replaced): the shard map (shards 3 and 5 on one server, 4 on another) and a reload."""

    def __init__(self) -> None:
        self.reloads_requested = 0
        self.shard_map = ShardMap(
            1, {1: Cluster(1, "c1", "127.0.0.1", 1), 2: Cluster(2, "c2", "127.0.0.1", 2)}, {3: 1, 4: 2, 5: 1}
        )

    def request_reload(self) -> None:
        self.reloads_requested += 1


def _worker(producer: _Producer, **settings: Any) -> PersistWorker:
    none = cast(Any, None)
    return PersistWorker(
        cast(ShardRouter, _Router()),
        cast(AIOKafkaProducer, producer),
        cast(AIOKafkaConsumer, none),
        cast(AIOKafkaConsumer, none),
        retry_topic="retry",
        settings=PersistSettings(**settings),
    )


def _items(keys: list[str], *, attempt: int = 0, failures: int = 0) -> list[_Item]:
    items = []
    for offset, key in enumerate(keys):
        r = _record(key)
        source = ConsumerRecord("postflight", 0, offset, 0, 0, key.encode(), encode(r), None, 0, 0, [])
        items.append(_Item(r, source, attempt, failures))
    return items


async def test_an_unavailable_shard_is_never_charged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "write_shard", _FailingWrites({"a": _db(2003)}))
    producer = _Producer()
    worker = _worker(producer, persist_max_attempts=1)
    await worker._write(_items(["a"], attempt=500, failures=0), stage="persist-retry", from_retry=True)
    assert not worker.breaker.allows(3)  # open until a probe of the shard answers
    await worker.stop_probes()
    assert producer.to(DLQ) == []
    [(_, headers)] = producer.to("retry")
    assert headers[H_ATTEMPT] == b"501" and headers[H_FAILURES] == b"0"


async def test_a_transient_failure_on_its_own_is_charged_up_to_the_dlq(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes = _FailingWrites({"bad": _db(1205)})
    monkeypatch.setattr(worker_module, "write_shard", writes)
    producer = _Producer()
    worker = _worker(producer, persist_max_attempts=3)
    # The retry loop isolates it: every other record is written, only it is charged.
    await worker._write(_items(["g1", "bad", "g2", "g3"], failures=1), stage="persist-retry", from_retry=True)
    [(_, headers)] = producer.to("retry")
    assert headers[H_FAILURES] == b"2"
    assert ["g1"] in writes.parts and ["g2", "g3"] in writes.parts
    # Its third failure is the last.
    await worker._write(_items(["bad"], failures=2), stage="persist-retry", from_retry=True)
    [(value, headers)] = producer.to(DLQ)
    assert value == encode(_record("bad"))
    assert headers["flightlog-reason"].startswith(
        b"gave up after 3 failed attempts; the last: OperationalError"
    )


async def test_the_main_loop_parks_a_transient_batch_uncharged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "write_shard", _FailingWrites({"bad": _db(1213)}))
    producer = _Producer()
    await _worker(producer, persist_max_attempts=1)._write(_items(["g1", "bad"]), stage="persist")
    assert producer.to(DLQ) == []
    assert [h[H_FAILURES] for _, h in producer.to("retry")] == [b"0", b"0"]


async def test_a_permanent_failure_is_bisected_to_its_record(monkeypatch: pytest.MonkeyPatch) -> None:
    writes = _FailingWrites({"k5": _db(1406, asyncmy.errors.DataError)})
    monkeypatch.setattr(worker_module, "write_shard", writes)
    producer = _Producer()
    keys = [f"k{i}" for i in range(8)]
    await _worker(producer)._write(_items(keys), stage="persist")
    assert producer.to("retry") == []
    [(value, headers)] = producer.to(DLQ)
    assert value == encode(_record("k5"))
    assert headers["flightlog-stage"] == b"persist"
    assert headers["flightlog-reason"].startswith(b"unwritable record: DataError")
    assert headers["flightlog-account"] == str(ACCOUNT).encode()  # whose it is, for a replay
    written = {k for part in writes.parts if "k5" not in part for k in part}
    assert written == set(keys) - {"k5"}


class _FailingServerWrites:
    """A ``write_shards`` that raises ``error`` (when given) or writes every shard."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[list[int]] = []

    async def __call__(
        self, router: ShardRouter, records: dict[int, Sequence[PostflightRecord]], **_: Any
    ) -> list[ShardWriteResult]:
        self.calls.append(sorted(records))
        if self.error is not None:
            raise self.error
        return [ShardWriteResult(shard, len(rs), len(rs), 0, 0) for shard, rs in sorted(records.items())]


def _items_on(shard: int, keys: list[str]) -> list[_Item]:
    items = []
    for offset, key in enumerate(keys):
        r = _record(key).model_copy(update={"account_id": shard << 48 | 77})
        source = ConsumerRecord("postflight", 0, offset, 0, 0, key.encode(), encode(r), None, 0, 0, [])
        items.append(_Item(r, source, 0, 0))
    return items


async def _write_server(
    monkeypatch: pytest.MonkeyPatch,
    together: _FailingServerWrites,
    alone: _FailingWrites,
    items: list[_Item],
) -> tuple[PersistWorker, _Producer]:
    """The main loop's write of ``items`` with ``write_shards`` and ``write_shard`` replaced."""
    monkeypatch.setattr(worker_module, "write_shards", together)
    monkeypatch.setattr(worker_module, "write_shard", alone)
    producer = _Producer()
    worker = _worker(producer)
    await worker._write(items, stage="persist")
    await worker.stop_probes()
    return worker, producer


async def test_the_shards_of_one_server_are_written_in_one_transaction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    together, alone = _FailingServerWrites(), _FailingWrites({})
    items = _items_on(3, ["a", "b"]) + _items_on(4, ["c"]) + _items_on(5, ["d"])
    _, producer = await _write_server(monkeypatch, together, alone, items)
    assert together.calls == [[3, 5]] and alone.parts == [["c"]]  # shard 4 is alone on its server
    assert producer.to("retry") == [] and producer.to(DLQ) == []


async def test_a_failed_server_transaction_is_written_shard_by_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    # A record's data error fails the server's transaction: each shard is written on its own,
    # which finds the record, as ever, and writes the rest.
    together, alone = (
        _FailingServerWrites(_db(1406, asyncmy.errors.DataError)),
        _FailingWrites({"bad": _db(1406, asyncmy.errors.DataError)}),
    )
    items = _items_on(3, ["a", "bad"]) + _items_on(5, ["d"])
    _, producer = await _write_server(monkeypatch, together, alone, items)
    assert together.calls == [[3, 5]]
    assert ["d"] in alone.parts and ["a"] in alone.parts
    [(value, _)] = producer.to(DLQ)
    assert value == encode(_record("bad").model_copy(update={"account_id": 3 << 48 | 77}))


async def test_an_unavailable_server_parks_its_shards_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The server's failure, not a shard's: writing its shards one by one would wait for it again.
    together, alone = _FailingServerWrites(_db(2013)), _FailingWrites({})
    worker, producer = await _write_server(
        monkeypatch, together, alone, _items_on(3, ["a"]) + _items_on(5, ["d"])
    )
    assert alone.parts == []
    assert not worker.breaker.allows(3) and not worker.breaker.allows(5)
    assert [h[H_FAILURES] for _, h in producer.to("retry")] == [b"0", b"0"]  # parked, uncharged


async def test_a_shards_own_unavailability_is_found_shard_by_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    # A counter without the shard's bits is that shard's: the others of its server are written.
    together = _FailingServerWrites(ShardBitsMismatch(1, 3))
    alone = _FailingWrites({"a": ShardBitsMismatch(1, 3)})
    worker, producer = await _write_server(
        monkeypatch, together, alone, _items_on(3, ["a"]) + _items_on(5, ["d"])
    )
    assert ["d"] in alone.parts and worker.breaker.allows(5) and not worker.breaker.allows(3)
    assert len(producer.to("retry")) == 1
