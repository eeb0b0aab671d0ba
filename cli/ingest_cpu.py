"""The CPU that ingest's POST /v1/events handler spends per event, without a network or a broker.

``python -m cli.ingest_cpu [--requests N] [--concurrency C]`` runs the real handler
(the route's own handler) on requests of 500 events shaped like the
bench's (:func:`cli.bench.drive.lifecycle`), with the real aiokafka producer up to its
accumulator: a stand-in for aiokafka's sender takes each batch the accumulator releases, builds
its bytes and resolves it at once, as a broker's acknowledgement would. The account directory is
the real one with its cache filled. What is left out is what no change of the handler touches:
the HTTP parser, the socket and the Kafka protocol's round trip.

The figure is the process's CPU time (user + sys) over the events answered 202; it moves by a
few percent between runs, so compare runs made one after the other on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import resource
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

import orjson
from aiohttp import StreamReader, web
from aiohttp.test_utils import make_mocked_request
from aiokafka import AIOKafkaProducer
from aiokafka.errors import ProducerClosed
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition

from cli.bench.drive import lifecycle
from libs.accounts import Account, AccountDirectory, Application
from libs.config import KafkaSettings
from libs.kafka import make_producer
from libs.resources import DIRECTORY, PRODUCER
from libs.shards import ShardRouter
from services.ingest.routes import add_ingest_routes
from services.ingest.service import DEFINITION
from services.ingest.settings import IngestSettings

__all__ = ["PARTITIONS", "acknowledging_producer", "main", "measure"]

PARTITIONS = 6  # flightlog.inflight's
API_KEY = "flk_bench"


class _Cluster:
    """What the producer and its accumulator ask of the cluster metadata: six partitions, one leader."""

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(PARTITIONS))

    available_partitions_for_topic = partitions_for_topic

    def leader_for_partition(self, tp: TopicPartition) -> int:
        return 0


@contextlib.asynccontextmanager
async def acknowledging_producer(
    sink: dict[int, list[tuple[bytes | None, bytes | None]]] | None = None,
    *,
    round_trip_s: float = 0.0,
    **overrides: Any,
) -> AsyncIterator[AIOKafkaProducer]:
    """The service's producer (same settings, but ``overrides``), never started: what its
    accumulator releases is built and acknowledged in process instead of being sent, one request
    at a time as aiokafka's sender does with one broker, each taking ``round_trip_s``. The
    records acknowledged go to ``sink`` (partition -> (key, value) in order) when it is given."""
    producer = make_producer(KafkaSettings(kafka_bootstrap_servers="127.0.0.1:1"), **overrides)
    cluster = _Cluster()

    async def wait_on_metadata(topic: str) -> set[int]:
        return cluster.partitions_for_topic(topic)

    producer.client._wait_on_metadata = wait_on_metadata
    producer._metadata = cluster
    accumulator = producer._message_accumulator
    accumulator._cluster = cluster
    if producer._txn_manager is not None:
        producer._txn_manager.set_pid_and_epoch(1, 0)

    async def sender() -> None:
        offsets = [0] * PARTITIONS
        while True:
            await accumulator.waiter()
            nodes, _ = accumulator.drain_by_nodes(ignore_nodes=set())
            if round_trip_s:
                await asyncio.sleep(round_trip_s)
            for batches in nodes.values():
                for tp, batch in batches.items():
                    buffer = batch.get_data_buffer()
                    if sink is not None:
                        records = MemoryRecords(bytes(buffer)).next_batch()
                        assert records is not None
                        sink.setdefault(tp.partition, []).extend((r.key, r.value) for r in records)
                    batch.done(base_offset=offsets[tp.partition])
                    offsets[tp.partition] += batch.record_count

    task = asyncio.create_task(sender())
    try:
        yield producer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        accumulator.fail_all(ProducerClosed())  # what is left will never be acknowledged
        await producer.stop()


class _Protocol:
    """What a request's payload stream asks of the connection."""

    _reading_paused = False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


def _request(app: web.Application, body: bytes) -> web.Request:
    protocol: Any = _Protocol()
    payload = StreamReader(protocol, 2**21, loop=asyncio.get_running_loop())
    payload.feed_data(body)
    payload.feed_eof()
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
    }
    return make_mocked_request("POST", "/v1/events", headers=headers, app=app, payload=payload)


def _bodies(requests: int, accounts: list[int]) -> list[bytes]:
    t = datetime.now(UTC)
    out = []
    for r in range(requests):
        events: list[dict[str, Any]] = []
        for n in range(r * 100, r * 100 + 100):
            events += lifecycle(accounts[n % len(accounts)], f"cpu-{n}", t)
        out.append(orjson.dumps({"events": events}))
    return out


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(requests: int = 200, concurrency: int = 8) -> tuple[float, float]:
    """(CPU microseconds per event, events/s of wall time) over ``requests`` requests of 500
    events, ``concurrency`` at a time."""
    app = web.Application()
    add_ingest_routes(app, IngestSettings(ingest_rate_per_account_s=1e9, ingest_burst_per_account=10**9))
    # no database: the directory only reads the shard map's version
    no_router = cast(ShardRouter, SimpleNamespace(shard_map=SimpleNamespace(version=0)))
    directory = AccountDirectory(no_router, ttl_s=math.inf)
    application = Application(1, "bench")
    directory.remember_key(API_KEY, application)
    accounts = [(s << 48) + 1 for s in (1, 2)]
    for acc in accounts:
        directory.remember_account(Account(acc, application.id, f"{acc}@example.test", "events"))
    app[DIRECTORY] = directory
    bodies = _bodies(requests, accounts)
    gc.collect()  # as libs.service.serve does once the service is up
    gc.freeze()
    gc.set_threshold(DEFINITION.gc_young_objects, *gc.get_threshold()[1:])
    handler = next(
        r.handler
        for r in app.router.routes()
        if r.method == "POST" and r.resource and r.resource.canonical == "/v1/events"
    )
    async with acknowledging_producer() as producer:
        app[PRODUCER] = producer
        queue = list(reversed(bodies))

        async def poster() -> None:
            while queue:
                response = await handler(_request(app, queue.pop()))
                assert response.status == 202, response.status

        # one request first, out of the figure: first-call caches
        response = await handler(_request(app, bodies[0]))
        assert response.status == 202, response.status
        cpu, wall = _cpu_s(), time.perf_counter()
        await asyncio.gather(*(poster() for _ in range(concurrency)))
        cpu, wall = _cpu_s() - cpu, time.perf_counter() - wall
    events = requests * 500
    return cpu / events * 1e6, events / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.runs):
        us, rate = asyncio.run(measure(args.requests, args.concurrency))
        print(f"{us:.2f} us CPU per event ({rate:,.0f} events/s in one process, no network)")


if __name__ == "__main__":
    main()
