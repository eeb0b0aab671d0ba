"""The change notifier's routing and waits, and the request metrics' labels, without a server."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import ConsumerRecord
from prometheus_client import REGISTRY

from libs.ids import make_id, shard_of
from libs.shards import ShardRouter
from services.gateway.metrics import UNMATCHED, request_metrics_middleware
from services.gateway.notifier import CATCH_UP_TRIES, ChangeNotifier, Subscription

A, B = make_id(1, 10), make_id(2, 20)


def _notifier(stopping: asyncio.Event | None = None) -> ChangeNotifier:
    # the router is only used by the safety check, which runs every hour here
    return ChangeNotifier(cast(ShardRouter, object()), None, recheck_s=3600, stopping=stopping)


async def test_a_change_wakes_the_streams_of_its_account_only() -> None:
    notifier = _notifier()
    with notifier.subscribe(A) as a1, notifier.subscribe(A) as a2, notifier.subscribe(B) as b:
        notifier.notify(A, 1, make_id(1, 99))
        assert a1.event.is_set() and a2.event.is_set() and not b.event.is_set()
        assert a1.notified == make_id(1, 99)
    assert not notifier._subs  # every subscription left with its stream
    notifier.notify(A, 1, make_id(1, 100))  # nobody listens: nothing to wake, no error


async def test_a_wait_returns_true_when_woken_and_clears_the_event() -> None:
    sub = Subscription(A)
    sub.wake(5)
    assert await sub.wait(5, 10) is True
    assert not sub.event.is_set()
    assert await sub.wait(5, 0.01) is False  # nothing since: the timeout


async def test_a_wake_during_a_read_is_kept_for_the_next_wait() -> None:
    sub = Subscription(A)
    sub.wake(1)
    assert await sub.wait(1, 1)
    sub.wake(2)  # a change commits while the stream reads
    assert await sub.wait(2, 0.01) is True


async def test_a_read_behind_a_notified_change_reads_again_soon_a_bounded_number_of_times() -> None:
    sub = Subscription(A)
    sub.wake(50)
    # Every read ends at 40, before change 50 is visible to it: it reads again without a new wake,
    # CATCH_UP_TRIES times in all (the first wait was woken).
    tries = 0
    while await sub.wait(40, 0.5):
        tries += 1
        assert tries <= CATCH_UP_TRIES
    assert tries == CATCH_UP_TRIES
    sub.wake(60)  # a newer change starts a new round of catch-up reads
    assert await sub.wait(40, 0.5)
    assert await sub.wait(40, 0.5)
    assert await sub.wait(60, 0.01) is False  # caught up: an ordinary wait


async def test_malformed_topic_messages_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    notifier = _notifier()
    with notifier.subscribe(A) as sub, caplog.at_level(logging.WARNING):
        for bad in (None, b"", b"[]", b"{", b'{"account_id": "x", "shard": 1, "change_id": "2"}'):
            notifier._on_record(bad)
        assert not sub.event.is_set()
        notifier._on_record(orjson.dumps({"account_id": str(A), "shard": 1, "change_id": str(make_id(1, 7))}))
        assert sub.event.is_set() and sub.notified == make_id(1, 7)
    assert caplog.text.count("malformed") == 5


def _change(
    account_id: int | None, change_id: int, *, key: bytes | None = None
) -> ConsumerRecord[bytes, bytes]:
    """A flightlog.changes record as the relay publishes it (key: the account id)."""
    value = orjson.dumps(
        {"account_id": str(account_id), "shard": 0 if account_id is None else shard_of(account_id),
         "change_id": str(change_id)}
    )  # fmt: skip
    if key is None and account_id is not None:
        key = str(account_id).encode()
    return ConsumerRecord("changes", 0, 0, 0, 0, key, value, None, 0, len(value), [])


async def test_records_of_unwatched_accounts_are_not_parsed_but_the_last_of_each_shard(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = _notifier()
    c = make_id(1, 30)  # a third account, on A's shard, that no stream watches
    malformed = ConsumerRecord("changes", 0, 0, 0, 0, str(c).encode(), b"{", None, 0, 1, [])
    with notifier.subscribe(A) as a, caplog.at_level(logging.WARNING):
        notifier._on_records(
            [malformed, _change(c, make_id(1, 5)), _change(A, make_id(1, 6)), _change(B, make_id(2, 7)),
             _change(c, make_id(1, 8))]
        )  # fmt: skip
        assert a.event.is_set() and a.notified == make_id(1, 6)
    assert "malformed" not in caplog.text  # an unwatched record before the last: never parsed
    # the safety check knows how far each shard came through the topic, watched or not
    assert notifier._seen == {1: make_id(1, 8), 2: make_id(2, 7)}


async def test_a_record_whose_key_names_no_account_is_parsed(caplog: pytest.LogCaptureFixture) -> None:
    notifier = _notifier()
    with notifier.subscribe(A) as a, caplog.at_level(logging.WARNING):
        for key in (None, b"", b"+1", b" 1", b"1_0", b"x", b"9" * 5000):
            notifier._on_records([_change(A, make_id(1, 9), key=key)])
        assert a.event.is_set() and a.notified == make_id(1, 9)
        notifier._on_records([ConsumerRecord("changes", 0, 0, 0, 0, None, b"[]", None, 0, 2, [])])
    assert caplog.text.count("malformed") == 1


async def test_stopping_wakes_every_stream() -> None:
    stopping = asyncio.Event()
    async with _notifier(stopping) as notifier:
        with notifier.subscribe(A) as a, notifier.subscribe(B) as b:
            waits = [asyncio.create_task(s.wait(0, 30)) for s in (a, b)]
            await asyncio.sleep(0)
            stopping.set()
            assert await asyncio.wait_for(asyncio.gather(*waits), 5) == [True, True]


def _sample(route: str, status: str) -> float:
    labels = {"method": "GET" if route != UNMATCHED else "-", "route": route, "status": status}
    return REGISTRY.get_sample_value("flightlog_gateway_requests_total", labels) or 0.0


async def test_requests_are_counted_by_route_pattern_never_by_raw_path() -> None:
    async def thing(request: web.Request) -> web.Response:
        if request.match_info["id"] == "missing":
            raise web.HTTPNotFound()
        return web.Response(text="ok")

    app = web.Application(middlewares=[request_metrics_middleware])
    app.router.add_get("/things/{id}", thing)
    before = {k: _sample("/things/{id}", k) for k in ("200", "404")}
    unmatched = _sample(UNMATCHED, "404")
    async with TestClient(TestServer(app)) as client:
        for path in ("/things/1", "/things/2", "/things/missing", "/nothing/here", "/x/1234"):
            async with client.get(path) as resp:
                await resp.read()
    assert _sample("/things/{id}", "200") - before["200"] == 2
    assert _sample("/things/{id}", "404") - before["404"] == 1
    assert _sample(UNMATCHED, "404") - unmatched == 2
    count = REGISTRY.get_sample_value(
        "flightlog_gateway_request_seconds_count", {"method": "GET", "route": "/things/{id}"}
    )
    assert count is not None and count >= 3
