"""POST /v1/events and GET /v1/events/limits.

A batch is all or nothing: every item is validated and its account's ownership checked; one bad
item rejects the batch (422, and each bad item goes to the DLQ with the reason), an account over
its rate rejects the batch (429), and a Kafka failure rejects it (503). Only when Kafka has
acknowledged every event (acks=all, idempotent producer) does the answer say 202.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson
import prometheus_client
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from libs import events as event_limits
from libs.accounts import AccountDirectory, Application
from libs.dlq import dead_letter
from libs.events import Event, encode, message_key_bytes
from libs.http import Problem, is_unavailable, problem_middleware, problem_response, read_json
from libs.kafka import INFLIGHT
from libs.ratelimit import KeyedTokenBuckets
from services.ingest.constants import CONTENT_TYPE, MAX_BODY_BYTES, MAX_EVENTS_PER_REQUEST, STAGE
from services.ingest.settings import IngestSettings
from services.ingest.validation import ItemError, item_errors, normalise_item

__all__ = ["STATE", "IngestState", "add_ingest_routes", "limits_document"]

logger = logging.getLogger(__name__)

EVENTS_ACCEPTED: Final = prometheus_client.Counter(
    "flightlog_ingest_events_accepted", "Events acknowledged by Kafka and answered 202"
)
EVENTS_REJECTED: Final = prometheus_client.Counter(
    "flightlog_ingest_events_rejected",
    "Events not accepted, by reason (invalid: the item itself; batch: a good item in a bad batch)",
    ["reason"],
)
REQUEST_SECONDS: Final = prometheus_client.Histogram(
    "flightlog_ingest_request_seconds",
    "POST /v1/events latency, by status",
    ["status"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class _Unavailable(Exception):
    """A dependency (MariaDB or Kafka) failed: answer 503, accept nothing."""


def _unavailable_or_bug(exc: Exception) -> Exception:
    """What to raise for an error of the account directory: a database that cannot be reached is
    a 503 (see :func:`libs.http.is_unavailable`); anything else is a bug and stays one (500)."""
    if is_unavailable(exc):
        return _Unavailable(f"the account directory is unavailable ({type(exc).__name__})")
    return exc


@dataclass(slots=True)
class IngestState:
    """Filled in by the service's main() once its resources are open (routes answer 503 before)."""

    settings: IngestSettings
    limiter: KeyedTokenBuckets[int]
    producer: AIOKafkaProducer | None = None
    directory: AccountDirectory | None = None
    accepting: bool = True
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    @classmethod
    def from_settings(cls, settings: IngestSettings) -> IngestState:
        limiter: KeyedTokenBuckets[int] = KeyedTokenBuckets(
            settings.ingest_rate_per_account_s,
            settings.ingest_burst_per_account,
            max_keys=settings.ingest_rate_tracked_accounts_max,
        )
        state = cls(settings, limiter)
        state.idle.set()
        return state


STATE: Final = web.AppKey("ingest_state", IngestState)


def limits_document(settings: IngestSettings) -> dict[str, Any]:
    return {
        "max_events_per_request": MAX_EVENTS_PER_REQUEST,
        "max_body_bytes": MAX_BODY_BYTES,
        "content_type": CONTENT_TYPE,
        "rate_per_account_s": settings.ingest_rate_per_account_s,
        "burst_per_account": settings.ingest_burst_per_account,
        "event": {
            "max_message_key_length": event_limits.MAX_KEY_LENGTH,
            "max_event_id_length": 64,
            "max_body_part_bytes": event_limits.MAX_BODY_BYTES,
            "max_recipients": event_limits.MAX_RECIPIENTS,
            "max_labels": event_limits.MAX_LABELS,
        },
    }


async def _limits(request: web.Request) -> web.Response:
    return web.json_response(limits_document(request.app[STATE].settings), dumps=_dumps)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


async def _authenticate(state: IngestState, request: web.Request) -> Application | None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    assert state.directory is not None, "routes are gated until the directory is open"
    try:
        return await state.directory.application_for_key(key.strip())
    except Exception as exc:
        raise _unavailable_or_bug(exc) from exc


async def _foreign_accounts(state: IngestState, app: Application, account_ids: set[int]) -> set[int]:
    """The ids among ``account_ids`` that do not exist or belong to another application."""
    assert state.directory is not None
    directory = state.directory
    try:
        found = await asyncio.gather(*(directory.owned_account(app.id, a) for a in account_ids))
    except Exception as exc:
        raise _unavailable_or_bug(exc) from exc
    return {a for a, acc in zip(account_ids, found, strict=True) if acc is None}


def _forget(futures: list[asyncio.Future[Any]]) -> None:
    """Collect the outcomes nobody waits for any more, so none is logged as never retrieved."""
    for fut in futures:
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())


async def _settle(futures: list[asyncio.Future[Any]], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        await asyncio.gather(*futures)


async def _dead_letter_items(state: IngestState, items: list[Any], errors: list[ItemError]) -> None:
    assert state.producer is not None
    reasons: dict[int, list[str]] = {}
    for err in errors:
        assert err.index is not None
        reasons.setdefault(err.index, []).append(f"{err.field}: {err.message}")
    futures = []
    try:
        for index, why in sorted(reasons.items()):
            futures.append(
                await dead_letter(
                    state.producer,
                    stage=STAGE,
                    reason=f"item {index}: " + "; ".join(why),
                    key=None,
                    value=orjson.dumps(items[index]),
                )
            )
        await _settle(futures, state.settings.ingest_produce_timeout_s)
    except (KafkaError, TimeoutError) as exc:
        _forget(futures)
        raise _Unavailable(f"could not write rejected items to the DLQ: {exc!r}") from exc


async def _produce(state: IngestState, events: list[Event]) -> None:
    assert state.producer is not None
    futures = []
    try:
        for ev in events:
            futures.append(
                await state.producer.send(
                    INFLIGHT, encode(ev), key=message_key_bytes(ev.account_id, ev.message_key)
                )
            )
        await _settle(futures, state.settings.ingest_produce_timeout_s)
    except (KafkaError, TimeoutError) as exc:
        _forget(futures)
        raise _Unavailable(f"Kafka did not acknowledge the batch: {exc!r}") from exc


def _bad_request(status: int, title: str, detail: str, **extra: Any) -> web.Response:
    return problem_response(status, title, detail, **extra)


async def _accept(state: IngestState, request: web.Request) -> web.Response:
    app = await _authenticate(state, request)
    if app is None:
        resp = problem_response(
            401, "Unauthorized", "send 'Authorization: Bearer <api key>' with a valid key"
        )
        resp.headers["WWW-Authenticate"] = 'Bearer realm="flightlog"'
        return resp
    if request.content_type != CONTENT_TYPE:
        return _bad_request(
            415, "Unsupported Media Type", f"the body must be {CONTENT_TYPE}, not {request.content_type!r}"
        )
    try:
        doc = await read_json(request, max_bytes=MAX_BODY_BYTES)
    except Problem as exc:  # 400 malformed or too deeply nested, 413 too large
        return exc.response()
    if not isinstance(doc, dict) or not isinstance(doc.get("events"), list) or set(doc) != {"events"}:
        return _bad_request(422, "Invalid batch", 'the body must be {"events": [...]} and nothing else')
    items: list[Any] = doc["events"]
    if not items:
        return _bad_request(422, "Invalid batch", "events is empty")
    if len(items) > MAX_EVENTS_PER_REQUEST:
        return _bad_request(
            413,
            "Too many events",
            f"{len(items)} events; a request carries at most {MAX_EVENTS_PER_REQUEST}",
            max_events_per_request=MAX_EVENTS_PER_REQUEST,
        )

    received_at = state.clock()
    events: dict[int, Event] = {}
    errors: list[ItemError] = []
    for index, item in enumerate(items):
        try:
            events[index] = normalise_item(item, received_at)
        except (ValidationError, ValueError) as exc:
            errors.extend(item_errors(index, exc))
    foreign = await _foreign_accounts(state, app, {ev.account_id for ev in events.values()})
    for index, ev in list(events.items()):
        if ev.account_id in foreign:
            errors.append(ItemError(index, "account_id", "account not found"))
            del events[index]
    if errors:
        errors.sort(key=lambda e: (e.index or 0, e.field))
        await _dead_letter_items(state, items, errors)
        bad = len(items) - len(events)
        EVENTS_REJECTED.labels("invalid").inc(bad)
        EVENTS_REJECTED.labels("batch").inc(len(events))
        return _bad_request(
            422,
            "Invalid events",
            f"{bad} of {len(items)} events are invalid; nothing was accepted. "
            "The invalid items were written to the dead-letter queue.",
            errors=[e.as_json() for e in errors],
        )

    batch = [events[i] for i in range(len(items))]
    costs = Counter(ev.account_id for ev in batch)
    denied = state.limiter.acquire(costs)
    if denied is not None:
        EVENTS_REJECTED.labels("rate_limited").inc(len(batch))
        retry_after_s = max(1, math.ceil(denied.retry_after_s))
        return problem_response(
            429,
            "Too Many Requests",
            f"account {denied.key} would exceed its rate of {state.limiter.rate_per_s:g} events/s "
            f"(burst {state.limiter.burst}): {denied.requested} events asked, "
            f"{int(denied.available)} available; nothing was accepted",
            retry_after_s=retry_after_s,
            account_id=str(denied.key),
        )
    try:
        await _produce(state, batch)
    except _Unavailable:
        state.limiter.refund(costs)
        raise
    EVENTS_ACCEPTED.inc(len(batch))
    return web.json_response(
        {"accepted": len(batch), "event_ids": [ev.event_id for ev in batch]}, status=202, dumps=_dumps
    )


async def _post_events(request: web.Request) -> web.Response:
    state = request.app[STATE]
    started = time.perf_counter()
    if not state.accepting:
        return problem_response(503, "Shutting down", "ingest is draining; retry", retry_after_s=1)
    state.in_flight += 1
    state.idle.clear()
    try:
        resp = await _accept(state, request)
    except _Unavailable as exc:
        logger.warning("batch rejected: %s", exc)
        resp = problem_response(503, "Service Unavailable", f"{exc}; nothing was accepted", retry_after_s=1)
    finally:
        state.in_flight -= 1
        if state.in_flight == 0:
            state.idle.set()
    REQUEST_SECONDS.labels(str(resp.status)).observe(time.perf_counter() - started)
    return resp


def add_ingest_routes(app: web.Application, settings: IngestSettings) -> None:
    app[STATE] = IngestState.from_settings(settings)
    # Anything the routes do not answer themselves (a bug: 500, a database gone: 503) becomes a
    # problem document like every other error.
    app.middlewares.append(problem_middleware)
    app.router.add_post("/v1/events", _post_events)
    app.router.add_get("/v1/events/limits", _limits)


async def drain(state: IngestState, timeout_s: float) -> None:
    """Stop taking batches and wait for the ones in flight to be answered."""
    state.accepting = False
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await state.idle.wait()
    if state.in_flight:
        logger.warning("%d batches still in flight after %.0f s", state.in_flight, timeout_s)
