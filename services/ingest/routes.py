"""POST /v1/events and GET /v1/events/limits.

A batch is all or nothing: every item is validated and its account's ownership checked; one bad
item rejects the batch (422, and each bad item goes to the DLQ with the reason), an account over
its rate rejects the batch (429), and a Kafka failure rejects it (503). Only when Kafka has
acknowledged every event (acks=all, idempotent producer) does the answer say 202.

The hot path works on the batch: one validation call for every item
(:func:`~services.ingest.validation.check_batch`), each item's JSON forwarded as the record value
rather than the model dumped again, and one Kafka batch per partition
(:func:`libs.inflight.publish_records`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson
import prometheus_client
from aiohttp import web
from aiokafka.errors import KafkaError

from libs import events as event_limits
from libs.accounts import Application
from libs.authn import application_for_request
from libs.dlq import account_named, dead_letter
from libs.events import message_key_bytes
from libs.http import Problem, is_unavailable, read_json
from libs.inflight import Record, forget, publish_records
from libs.ratelimit import KeyedTokenBuckets
from libs.resources import DIRECTORY, PRODUCER
from services.ingest.constants import CONTENT_TYPE, MAX_BODY_BYTES, MAX_EVENTS_PER_REQUEST, STAGE
from services.ingest.settings import IngestSettings
from services.ingest.validation import ItemError, check_batch

__all__ = ["INTAKE", "LIMITER", "SETTINGS", "Intake", "add_ingest_routes", "limits_document"]

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


class _Unavailable(Problem):
    """A dependency (MariaDB or Kafka) failed: answer 503, accept nothing."""

    def __init__(self, reason: str) -> None:
        super().__init__(503, "Service Unavailable", f"{reason}; nothing was accepted", retry_after_s=1)


def _unavailable_or_bug(exc: Exception) -> Exception:
    """What to raise for an error of the account directory: a database that cannot be reached is
    a 503 (see :func:`libs.http.is_unavailable`); anything else is a bug and stays one (500)."""
    if is_unavailable(exc):
        return _Unavailable(f"the account directory is unavailable ({type(exc).__name__})")
    return exc


@dataclass(slots=True)
class Intake:
    """The batches being answered, so that on SIGTERM ingest stops taking new ones and waits for
    these (:meth:`drain`) before its producer closes."""

    accepting: bool = True
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        if not self.accepting:
            raise Problem(503, "Shutting down", "ingest is draining; retry", retry_after_s=1)
        self.in_flight += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def drain(self, timeout_s: float) -> None:
        """Stop taking batches and wait for the ones in flight to be answered."""
        self.accepting = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.idle.wait()
        if self.in_flight:
            logger.warning("%d batches still in flight after %.0f s", self.in_flight, timeout_s)


SETTINGS: Final = web.AppKey("ingest_settings", IngestSettings)
LIMITER: Final = web.AppKey("ingest_limiter", KeyedTokenBuckets[int])
INTAKE: Final = web.AppKey("ingest_intake", Intake)


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
    return web.json_response(limits_document(request.app[SETTINGS]), dumps=_dumps)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


async def _authenticate(request: web.Request) -> Application:
    try:
        return await application_for_request(request)  # 401, or 429 for too many failures
    except Problem:
        raise
    except Exception as exc:
        raise _unavailable_or_bug(exc) from exc


async def _foreign_accounts(request: web.Request, app: Application, account_ids: set[int]) -> set[int]:
    """The ids among ``account_ids`` that do not exist or belong to another application."""
    directory = request.app[DIRECTORY]
    try:
        found = await asyncio.gather(*(directory.owned_account(app.id, a) for a in account_ids))
    except Exception as exc:
        raise _unavailable_or_bug(exc) from exc
    return {a for a, acc in zip(account_ids, found, strict=True) if acc is None}


async def _dead_letter_items(
    request: web.Request, app: Application, items: list[Any], errors: list[ItemError]
) -> None:
    """Each bad item to the DLQ with its reasons and the poster's application: a replay puts it
    back only for an account of that application (cli.dlq)."""
    reasons: dict[int, list[str]] = {}
    for err in errors:
        assert err.index is not None  # item_errors always sets it
        reasons.setdefault(err.index, []).append(f"{err.field}: {err.message}")
    futures = []
    try:
        async with asyncio.timeout(request.app[SETTINGS].ingest_produce_timeout_s):
            for index, why in sorted(reasons.items()):
                futures.append(
                    await dead_letter(
                        request.app[PRODUCER],
                        stage=STAGE,
                        reason=f"item {index}: " + "; ".join(why),
                        key=None,
                        value=orjson.dumps(items[index]),
                        application_id=app.id,
                        account_id=account_named(items[index]),
                    )
                )
            await asyncio.gather(*futures)
    except (KafkaError, TimeoutError) as exc:
        forget(futures)
        raise _Unavailable(f"could not write rejected items to the DLQ: {exc!r}") from exc


async def _produce(request: web.Request, records: list[Record]) -> None:
    try:
        await publish_records(
            request.app[PRODUCER], records, timeout_s=request.app[SETTINGS].ingest_produce_timeout_s
        )
    except (KafkaError, TimeoutError) as exc:
        raise _Unavailable(f"Kafka did not acknowledge the batch: {exc!r}") from exc


async def _accept(request: web.Request) -> web.Response:
    app = await _authenticate(request)
    if request.content_type != CONTENT_TYPE:
        raise Problem(
            415, "Unsupported Media Type", f"the body must be {CONTENT_TYPE}, not {request.content_type!r}"
        )
    doc = await read_json(request, max_bytes=MAX_BODY_BYTES)  # 400 malformed or too deep, 413 too large
    if not isinstance(doc, dict) or not isinstance(doc.get("events"), list) or set(doc) != {"events"}:
        raise Problem(422, "Invalid batch", 'the body must be {"events": [...]} and nothing else')
    items: list[Any] = doc["events"]
    if not items:
        raise Problem(422, "Invalid batch", "events is empty")
    if len(items) > MAX_EVENTS_PER_REQUEST:
        raise Problem(
            413,
            "Too many events",
            f"{len(items)} events; a request carries at most {MAX_EVENTS_PER_REQUEST}",
            max_events_per_request=MAX_EVENTS_PER_REQUEST,
        )

    checked = check_batch(items, datetime.now(UTC))
    events, errors = checked.events, checked.errors
    foreign = await _foreign_accounts(request, app, {ev.account_id for ev in events.values()})
    if foreign:
        for index, ev in list(events.items()):
            if ev.account_id in foreign:
                errors.append(ItemError(index, "account_id", "account not found"))
                del events[index]
    if errors:
        errors.sort(key=lambda e: (e.index or 0, e.field))
        await _dead_letter_items(request, app, items, errors)
        bad = len(items) - len(events)
        EVENTS_REJECTED.labels("invalid").inc(bad)
        EVENTS_REJECTED.labels("batch").inc(len(events))
        raise Problem(
            422,
            "Invalid events",
            f"{bad} of {len(items)} events are invalid; nothing was accepted. "
            "The invalid items were written to the dead-letter queue.",
            errors=[e.as_json() for e in errors],
        )

    batch = list(events.values())  # every item, in order
    costs = Counter(ev.account_id for ev in batch)
    limiter = request.app[LIMITER]
    denied = limiter.acquire(costs)
    if denied is not None:
        EVENTS_REJECTED.labels("rate_limited").inc(len(batch))
        raise Problem(
            429,
            "Too Many Requests",
            f"account {denied.key} would exceed its rate of {limiter.rate_per_s:g} events/s "
            f"(burst {limiter.burst}): {denied.requested} events asked, "
            f"{int(denied.available)} available; nothing was accepted",
            retry_after_s=max(1, math.ceil(denied.retry_after_s)),
            account_id=str(denied.key),
        )
    records = [
        (message_key_bytes(ev.account_id, ev.message_key), value)
        for ev, value in zip(batch, checked.values, strict=True)
    ]
    try:
        await _produce(request, records)
    except _Unavailable:
        limiter.refund(costs)
        raise
    EVENTS_ACCEPTED.inc(len(batch))
    return web.json_response(
        {"accepted": len(batch), "event_ids": [ev.event_id for ev in batch]}, status=202, dumps=_dumps
    )


async def _post_events(request: web.Request) -> web.Response:
    started = time.perf_counter()
    status = 500  # what a bug becomes in the problem middleware
    try:
        with request.app[INTAKE].batch():
            response = await _accept(request)
        status = response.status
        return response
    except Problem as exc:
        if isinstance(exc, _Unavailable):
            logger.warning("batch rejected: %s", exc.detail)
        status = exc.status
        raise
    finally:
        REQUEST_SECONDS.labels(str(status)).observe(time.perf_counter() - started)


def add_ingest_routes(app: web.Application, settings: IngestSettings) -> None:
    """The routes and their own state; the directory and the producer are the service's
    (:mod:`libs.resources`)."""
    app[SETTINGS] = settings
    app[LIMITER] = KeyedTokenBuckets(
        settings.ingest_rate_per_account_s,
        settings.ingest_burst_per_account,
        max_keys=settings.ingest_rate_tracked_accounts_max,
    )
    app[INTAKE] = Intake()
    app.router.add_post("/v1/events", _post_events)
    app.router.add_get("/v1/events/limits", _limits)
