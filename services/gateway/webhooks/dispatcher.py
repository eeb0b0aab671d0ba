"""The webhook dispatcher: flightlog.changes in, signed HTTP deliveries out.

Two halves, joined by the ``webhook_deliveries`` table:

* intake consumes flightlog.changes (its own consumer group), records one delivery row per
  matching endpoint (``INSERT IGNORE``: re-consuming a change after a crash adds nothing) and
  only then commits the Kafka offsets (at most once a second), so nothing consumed is ever lost;
* delivery runs one *lane* per (endpoint, account): a task that sends the lane's first pending
  delivery in change order, and the next only once that one is finished (delivered, or failed as
  below), so order per endpoint and account holds across retries and restarts. Lanes are
  independent tasks, so a slow or dead endpoint only holds back its own lanes; a per-endpoint
  semaphore caps its concurrent requests.

Every answer is classified (:func:`classify`) and the next step decided (:func:`decide`), both
pure functions:

* transient (no answer: connection refused, timeout; 5xx, 3xx; 408 and 429, honouring a
  ``Retry-After``): retried with exponential backoff and jitter (:func:`libs.backoff.backoff_s`, spread) until
  ``webhooks_retry_window_s`` after the event (28 h by default). Then the delivery fails, the
  endpoint is disabled with the reason stored and visible in the API, and a warning is logged and
  counted (``flightlog_webhook_endpoints_disabled_total``): a receiver that does not answer for
  that long is gone, and stopping is kinder than retrying every event for ever.
* refused (any other 4xx): the receiver answered and said no to *this event* (its parser rejects
  the payload, say). How the lane treats it is the endpoint's ``ordering``:

  - ``skip_refused`` (the default): retried ``webhooks_refused_max_attempts`` times in a row
    (3) with a short backoff (``webhooks_refused_retry_base_s``, 2 s then 4 s), in case the
    refusal was a receiver's deploy in progress; then the delivery is marked ``failed`` with the
    last status and the reason, the lane goes on to the account's next event, and the failed one
    can be replayed from the delivery log. A refusal does not count towards disabling the
    endpoint: the receiver is up and taking the account's other events, and disabling it would
    stop every account for one bad payload. (A receiver that refuses *everything*, a wrong
    secret answering 401 say, fails every event this way; they stay replayable by time range.)
  - ``strict``: refused events are retried like transient failures, so one refused event holds
    back every later event of its account for the whole retry window and then disables the
    endpoint for all accounts. For receivers that cannot process an event without its
    predecessors and would rather stop than see a gap.
* gone (410): Standard Webhooks reads it as "this endpoint no longer exists". After the same
  bounded refusals in a row (so one misrouted answer does not do it), the endpoint is disabled
  with the reason, in both orderings; the delivery stays pending at the head of its lane, so
  nothing is skipped when the endpoint is enabled again.

Every attempt of one event carries the same ``webhook-id``. A disabled endpoint's deliveries keep
being recorded and go out, in order, once it is enabled again (PATCH ``enabled: true``), unless
they are older than the log retention.

Only one dispatcher delivers at a time (MySQL named lock ``flightlog.webhook-dispatcher`` on a
dedicated connection); every replica's intake records deliveries, and the active one picks up
rows written elsewhere (other replicas, replays from the API) every ``webhooks_rescan_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Final

import aiohttp
import asyncmy
import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from libs.backoff import backoff_s
from libs.component import Component
from libs.leader import lead_until_stopped, sleep_unless_stopped
from libs.outbound import AddressRefused, PublicResolver
from libs.shards import ShardRouter
from libs.webhooks import sign_headers
from services.gateway.webhooks.settings import WebhookSettings
from services.gateway.webhooks.store import (
    SKIP_REFUSED,
    STATUS_EVENT_TYPES,
    Delivery,
    Endpoint,
    NewDelivery,
    WebhookStore,
    utcnow,
)
from services.gateway.webhooks.targets import TargetRefused, check_target

__all__ = [
    "Decision",
    "Outcome",
    "WebhookDispatcher",
    "build_payload",
    "classify",
    "decide",
    "event_types",
    "parse_retry_after_s",
]

logger = logging.getLogger(__name__)

USER_AGENT: Final = "flightlog-webhooks/1"
_INSERT_CHUNK: Final = 500
# Intake offsets are committed at most this often (and when the intake stops): a crash reads up
# to this much again, and re-recording a delivery is a no-op (INSERT IGNORE on endpoint and
# change). A commit per fetch was 20 to 70 offset commits a second under load.
_COMMIT_INTERVAL_S: Final = 1.0
_PRUNE_INTERVAL_S: Final = 600.0
_LANE_BATCH: Final = 50  # pending deliveries a lane reads at once

_attempts = Counter("flightlog_webhook_attempts_total", "Webhook delivery attempts", ["outcome"])
_disabled = Counter("flightlog_webhook_endpoints_disabled_total", "Endpoints disabled after failing")
_refused = Counter(
    "flightlog_webhook_deliveries_refused_total",
    "Deliveries marked failed after permanent refusals, their lane moving on (ordering skip_refused)",
)
_active = Gauge("flightlog_webhook_dispatcher_active", "1 while this process delivers (holds the lock)")
_latency = Histogram(
    "flightlog_webhook_event_to_delivery_seconds",
    "From the change's commit to its successful delivery",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600, 3600, 86400),
)


class Outcome(enum.Enum):
    """What one attempt's answer says about the delivery; see the module docstring."""

    DELIVERED = "delivered"
    TRANSIENT = "transient"  # retried until the retry window ends
    REFUSED = "refused"  # this event, permanently: bounded retries under skip_refused
    GONE = "gone"  # the endpoint itself: disabled after bounded retries


def classify(status: int | None) -> Outcome:
    """The outcome of an attempt answered with HTTP ``status`` (None: no answer at all)."""
    if status is None:
        return Outcome.TRANSIENT
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status == 410:
        return Outcome.GONE
    if 400 <= status < 500 and status not in (408, 429):
        return Outcome.REFUSED
    # 5xx, 408 (the receiver timed out reading), 429 (slow down), and the 1xx/3xx a webhook
    # receiver should never send (redirects are not followed): none says the event is bad.
    return Outcome.TRANSIENT


def parse_retry_after_s(value: str | None, now: datetime) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delay-seconds or an HTTP date, RFC 9110
    10.2.3), never negative; None when absent or unreadable. ``now`` is aware UTC."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT by definition
        when = when.replace(tzinfo=UTC)
    return max((when - now).total_seconds(), 0.0)


@dataclass(frozen=True, slots=True)
class Decision:
    """What becomes of a delivery after an attempt.

    :param state: ``delivered``, ``pending`` (tried again in ``retry_in_s``) or ``failed``.
    :param refusals: the delivery's permanent refusals in a row, this attempt included.
    :param disable: the endpoint is to be disabled (the retry window ran out, or it is gone).
    """

    state: str
    retry_in_s: float | None = None
    refusals: int = 0
    disable: bool = False

    @property
    def skipped(self) -> bool:
        """Failed on its own, the endpoint staying enabled: its lane goes on without it."""
        return self.state == "failed" and not self.disable


def decide(
    outcome: Outcome,
    *,
    ordering: str,
    attempts: int,
    refusals: int,
    age_s: float,
    settings: WebhookSettings,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> Decision:
    """The next step for a delivery whose attempt number ``attempts`` (1 = the first) ended in
    ``outcome``; ``refusals`` are its refusals in a row before this attempt and ``age_s`` the
    time since its event. See the module docstring for the policy."""
    s = settings
    rand = rng.random if rng is not None else random.random

    def delay(attempt: int, base_s: float) -> float:
        # Spread, not full, jitter: endpoints that failed together do not retry together, and a
        # receiver can still tell roughly when the next try comes.
        return backoff_s(attempt, base_s, s.webhooks_retry_max_delay_s, jitter="spread", rand=rand)

    if outcome is Outcome.DELIVERED:
        return Decision("delivered", refusals=0)
    if outcome is Outcome.GONE or (outcome is Outcome.REFUSED and ordering == SKIP_REFUSED):
        refused = refusals + 1
        if refused < s.webhooks_refused_max_attempts:
            delay_s = delay(refused, s.webhooks_refused_retry_base_s)
            return Decision("pending", delay_s, refused)
        if outcome is Outcome.GONE:
            # stays at the head of its lane for when the endpoint is enabled again
            delay_s = delay(1, s.webhooks_retry_base_s)
            return Decision("pending", delay_s, refused, disable=True)
        return Decision("failed", refusals=refused)
    refused = refusals + 1 if outcome is Outcome.REFUSED else 0  # strict: a refusal is retried
    if age_s > s.webhooks_retry_window_s:
        return Decision("failed", refusals=refused, disable=True)
    delay_s = delay(attempts, s.webhooks_retry_base_s)
    if retry_after_s is not None:  # not sooner than asked, and not beyond our own longest delay
        delay_s = max(delay_s, min(retry_after_s, s.webhooks_retry_max_delay_s))
    return Decision("pending", delay_s, refused)


def event_types(change: dict[str, Any]) -> tuple[str, str | None]:
    """The event type of one flightlog.changes message, and its status type if it has one (a
    change that moved a message to sent, delivered, undelivered or failed), which the endpoints
    that subscribe to it receive instead."""
    status = change.get("status") if change["object_type"] == "message" else None
    return f"{change['object_type']}.{change['change_type']}", STATUS_EVENT_TYPES.get(status or "")


def build_payload(change: dict[str, Any], event_type: str) -> bytes:
    """The JSON body of one flightlog.changes message as ``event_type``, in the Standard Webhooks
    shape; ``status`` only when the change moved a message to another status."""
    body: dict[str, Any] = {
        "type": event_type,
        "timestamp": change["created_at"],
        "data": {
            "object": change["object_type"],
            "id": change["object_id"],
            "account_id": change["account_id"],
            "application_id": change["application_id"],
            "change_id": change["change_id"],
            "change_type": change["change_type"],
            "version": change["version"],
        },
    }
    if change.get("status") is not None:
        body["data"]["status"] = change["status"]
    return orjson.dumps(body)


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.removesuffix("Z"))


_Success = tuple[Delivery, datetime, int, int, bytes | None]


class _Recorder:
    """Batches the records of successful attempts, so a lane sends its next delivery while the
    last one is being written. A lane waits for its records before it reads the lane again, so
    it never re-reads a delivery it sent; a crash before a record is written re-sends it (at
    least once, same webhook-id, still in order)."""

    def __init__(self, store: WebhookStore) -> None:
        self._store = store
        self._queue: list[tuple[_Success, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhooks-recorder")

    async def stop(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    def record(self, success: _Success) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((success, future))
        self._wakeup.set()
        return future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._queue = self._queue, []
            if batch:
                try:
                    await self._store.record_successes([s for s, _ in batch])
                except Exception as exc:
                    logger.exception("recording %d webhook deliveries failed", len(batch))
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(exc)
                else:
                    for _, f in batch:
                        if not f.done():
                            f.set_result(None)
            if self._closing and not self._queue:
                return


class WebhookDispatcher(Component):
    """Consumes flightlog.changes and delivers signed webhooks; see the module docstring.

    :param router: the open shard router (the global schema holds endpoints and deliveries).
    :param settings: retry, timeout and target policy.
    :param consumer_factory: makes a not yet started consumer subscribed to flightlog.changes
        in the dispatcher's group, with manual commits.
    """

    def __init__(
        self,
        router: ShardRouter,
        settings: WebhookSettings,
        consumer_factory: Callable[[], AIOKafkaConsumer],
    ) -> None:
        self._router = router
        self._settings = settings
        self._consumer_factory = consumer_factory
        self.store = WebhookStore(router, settings.webhooks_secret_key)
        self._consumer: AIOKafkaConsumer | None = None
        self._http: aiohttp.ClientSession | None = None
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._lanes: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._dirty: set[tuple[int, int]] = set()
        self._endpoints: dict[int, Endpoint] = {}
        self._by_app: dict[int, list[Endpoint]] = {}
        self._version = -1
        self._reload_lock = asyncio.Lock()
        self._semaphores: dict[int, asyncio.Semaphore] = {}
        self._recorder = _Recorder(self.store)
        self.leading = False

    async def start(self) -> None:
        if self._tasks:
            return
        self._stopping.clear()
        await self._refresh_endpoints()
        self._http = aiohttp.ClientSession(
            headers={"User-Agent": USER_AGENT},
            # Names resolve through PublicResolver: the addresses checked are the ones connected to.
            connector=aiohttp.TCPConnector(
                limit=0,
                limit_per_host=0,
                resolver=PublicResolver(allow_private=self._settings.webhooks_allow_private_targets),
            ),
        )
        self._consumer = self._consumer_factory()
        await self._consumer.start()
        self._recorder.start()
        self._tasks = [
            asyncio.create_task(self._intake(), name="webhooks-intake"),
            asyncio.create_task(self._elect(), name="webhooks-leader"),
        ]

    @property
    def running(self) -> bool:
        """Started, with its intake and delivery loops alive (a host's readiness check)."""
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the intake batch in hand, abandon requests in flight (they stay pending and are
        sent again, with the same webhook-id), close."""
        if not self._tasks:
            return
        self._stopping.set()
        tasks, self._tasks = self._tasks, []
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for t in pending:
            t.cancel()
        await self._cancel_lanes()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._recorder.stop()  # writes what the lanes delivered
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _sleep(self, seconds: float) -> None:
        await sleep_unless_stopped(self._stopping, seconds)

    # -- endpoints cache -------------------------------------------------------------------

    async def _refresh_endpoints(self) -> None:
        async with self._reload_lock:
            version = await self.store.version()
            if version == self._version:
                return
            endpoints = await self.store.endpoints()
            self._endpoints = {e.id: e for e in endpoints}
            by_app: dict[int, list[Endpoint]] = {}
            for e in endpoints:  # a disabled endpoint's deliveries queue up until it is enabled
                by_app.setdefault(e.application_id, []).append(e)
            self._by_app = by_app
            self._version = version

    # -- intake ----------------------------------------------------------------------------

    async def _intake(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        recorded: dict[TopicPartition, int] = {}  # offsets whose deliveries are durable, to commit
        committed_at = time.monotonic()
        try:
            while not self._stopping.is_set():
                try:
                    batch = await consumer.getmany(timeout_ms=200, max_records=2000)
                    if batch:
                        await self._take(batch)
                        recorded.update({tp: records[-1].offset + 1 for tp, records in batch.items()})
                    if recorded and time.monotonic() - committed_at >= _COMMIT_INTERVAL_S:
                        await consumer.commit(recorded)
                        recorded, committed_at = {}, time.monotonic()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # Seek back to the committed offsets: what was read since is read again.
                    logger.exception("webhook intake failed; re-reading from the committed offsets")
                    recorded = {}
                    with contextlib.suppress(Exception):
                        for tp in consumer.assignment():
                            committed = await consumer.committed(tp)
                            if committed is not None:
                                consumer.seek(tp, committed)
                    await self._sleep(1.0)
        finally:
            if recorded:
                with contextlib.suppress(Exception):
                    await consumer.commit(recorded)

    async def _take(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        """Record the deliveries a fetched batch makes and wake their lanes."""
        # Reloaded before routing: a change committed after a subscription finds it.
        await self._refresh_endpoints()
        news: list[NewDelivery] = []
        for records in batch.values():
            for record in records:
                news += self._route(record.value or b"")
        for i in range(0, len(news), _INSERT_CHUNK):
            await self.store.insert_deliveries(news[i : i + _INSERT_CHUNK])
        for d in news:  # durable now: delivery need not wait for the offset commit
            self._wake((d.endpoint_id, d.account_id))

    def _route(self, value: bytes) -> list[NewDelivery]:
        try:
            change = orjson.loads(value)
            application_id = change["application_id"]
            if application_id is None:
                return []
            endpoints = self._by_app.get(int(application_id))
            if not endpoints:
                return []
            account_id = int(change["account_id"])
            event_at = _parse_time(change["created_at"])
            generic, specific = event_types(change)
            change_id = int(change["change_id"])
        except (ValueError, KeyError, TypeError):
            logger.error("skipping a malformed flightlog.changes message: %r", value[:200])
            return []
        payloads: dict[str, bytes] = {}
        news = []
        for e in endpoints:
            if event_at < e.created_at:  # an endpoint gets the changes committed after it was created
                continue
            event_type = specific if specific is not None and e.wants(specific, account_id) else generic
            if e.wants(event_type, account_id):
                if event_type not in payloads:
                    payloads[event_type] = build_payload(change, event_type)
                payload = payloads[event_type]
                news.append(NewDelivery(e.id, account_id, change_id, event_type, payload, event_at))
        return news

    # -- delivery --------------------------------------------------------------------------

    async def _elect(self) -> None:
        s = self._settings
        await lead_until_stopped(
            s,
            "webhook-dispatcher",
            self._stopping,
            self._deliver,
            standby_poll_s=s.webhooks_rescan_interval_s,
            error_backoff_s=1.0,
            on_leading=self._set_leading,
        )

    def _set_leading(self, leading: bool) -> None:
        self.leading = leading
        _active.set(int(leading))

    async def _deliver(self, conn: asyncmy.Connection) -> None:
        """While leading: wake the lanes with pending work, prune the log, check the lock."""
        s = self._settings
        next_prune = time.monotonic()
        try:
            while not self._stopping.is_set():
                await self._refresh_endpoints()
                for key in await self.store.pending_lanes():
                    self._wake(key)
                if time.monotonic() >= next_prune:
                    cutoff = utcnow() - timedelta(seconds=s.webhooks_log_retention_s)
                    while await self.store.prune(cutoff) and not self._stopping.is_set():
                        pass
                    next_prune = time.monotonic() + _PRUNE_INTERVAL_S
                await self._sleep(s.webhooks_rescan_interval_s)
                async with conn.cursor() as cur:  # still holding the lock?
                    await cur.execute("SELECT 1")
        finally:
            # Not leading first, so no lane is woken while the others are being cancelled.
            self._set_leading(False)
            await self._cancel_lanes()

    async def _cancel_lanes(self) -> None:
        lanes = list(self._lanes.values())
        for t in lanes:
            t.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)
        self._lanes.clear()

    def _wake(self, key: tuple[int, int]) -> None:
        if not self.leading or self._stopping.is_set():
            return
        if key in self._lanes:
            self._dirty.add(key)
        else:
            self._lanes[key] = asyncio.create_task(self._lane(key), name=f"webhook-lane-{key[0]}-{key[1]}")

    async def _lane(self, key: tuple[int, int]) -> None:
        endpoint_id, account_id = key
        recorded: list[asyncio.Future[None]] = []
        try:
            while not self._stopping.is_set():
                await asyncio.gather(*recorded)  # read the lane only once what was sent is recorded
                recorded.clear()
                self._dirty.discard(key)
                batch = await self.store.lane(endpoint_id, account_id, _LANE_BATCH)
                if not batch:
                    if key in self._dirty:
                        continue
                    return
                for head in batch:
                    endpoint = self._endpoints.get(endpoint_id)
                    if endpoint is None or not endpoint.enabled:
                        return
                    wait_s = (head.next_attempt_at - utcnow()).total_seconds()
                    if wait_s > 0:
                        await self._sleep(wait_s)
                        break  # read the lane again: it may have changed meanwhile
                    success = await self._attempt(endpoint, head)
                    if success is None:
                        break
                    recorded.append(success)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("webhook lane %s failed; the rescan restarts it", key)
        finally:
            for f in recorded:  # a failed record is logged by the recorder; nothing to re-raise
                f.add_done_callback(lambda f: f.cancelled() or f.exception())
            if self._lanes.get(key) is asyncio.current_task():
                del self._lanes[key]

    async def _attempt(self, endpoint: Endpoint, delivery: Delivery) -> asyncio.Future[None] | None:
        """One attempt. A failure is recorded before this returns None; a success returns the
        future of its (batched) record."""
        s = self._settings
        assert self._http is not None
        sem = self._semaphores.setdefault(
            endpoint.id, asyncio.Semaphore(s.webhooks_max_in_flight_per_endpoint)
        )
        async with sem:
            started_at = utcnow()
            t0 = time.monotonic()
            status: int | None = None
            error: str | None = None
            excerpt: bytes | None = None
            retry_after: str | None = None
            try:
                await check_target(
                    endpoint.url, allow_private=s.webhooks_allow_private_targets, resolve=False
                )
                headers = sign_headers(
                    endpoint.signing_secrets(started_at),
                    delivery.webhook_id,
                    int(time.time()),
                    delivery.payload,
                )
                headers["Content-Type"] = "application/json"
                async with self._http.post(
                    endpoint.url,
                    data=delivery.payload,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=s.webhooks_request_timeout_s),
                ) as resp:
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
                    excerpt = await resp.content.read(s.webhooks_response_excerpt_bytes)
            except TargetRefused as exc:
                error = f"target refused: {exc}"
            except TimeoutError:
                error = f"timed out after {s.webhooks_request_timeout_s:.0f} s"
            except aiohttp.ClientConnectorError as exc:
                # the resolver's refusal (AddressRefused) is the cause of a connector error
                refused = exc.os_error if isinstance(exc.os_error, AddressRefused) else None
                error = f"target refused: {refused}" if refused else f"{type(exc).__name__}: {exc}"
            except aiohttp.ClientError as exc:
                error = f"{type(exc).__name__}: {exc}"
            latency_ms = int((time.monotonic() - t0) * 1000)
        outcome = classify(status)
        if outcome is Outcome.DELIVERED:
            assert status is not None
            _attempts.labels("ok").inc()
            _latency.observe(max((utcnow() - delivery.event_at).total_seconds(), 0.0))
            return self._recorder.record((delivery, started_at, latency_ms, status, excerpt))
        if status is not None and error is None:
            error = f"HTTP {status}"
        decision = decide(
            outcome,
            ordering=endpoint.ordering,
            attempts=delivery.attempts + 1,
            refusals=delivery.refusals,
            age_s=(utcnow() - delivery.event_at).total_seconds(),
            settings=s,
            retry_after_s=parse_retry_after_s(retry_after, datetime.now(UTC)),
        )
        logged_error = error
        if decision.skipped:
            logged_error = (
                f"{error}: refused {decision.refusals} times in a row; skipped so the account's later"
                " events go on (ordering skip_refused), replay it once the receiver accepts it"
            )
        next_at = None if decision.retry_in_s is None else utcnow() + timedelta(seconds=decision.retry_in_s)
        await self.store.record_attempt(
            delivery,
            started_at=started_at,
            latency_ms=latency_ms,
            status_code=status,
            error=logged_error,
            excerpt=excerpt,
            state=decision.state,
            next_attempt_at=next_at,
            refusals=decision.refusals,
        )
        _attempts.labels(decision.state).inc()
        if decision.skipped:
            _refused.inc()
            logger.warning(
                "webhook delivery refused, the lane moves on",
                extra={"endpoint_id": endpoint.id, "delivery_id": delivery.id, "status": status},
            )
        if decision.disable:
            if outcome is Outcome.GONE:
                reason = (
                    f"the receiver answered 410 Gone {decision.refusals} times in a row (event"
                    f" {delivery.webhook_id}); its deliveries wait until the endpoint is enabled again"
                )
            else:
                reason = (
                    f"deliveries failed for {s.webhooks_retry_window_s / 3600:.0f} h; event"
                    f" {delivery.webhook_id} gave up after {delivery.attempts + 1} attempts,"
                    f" last error: {error}"
                )
            await self.store.disable_endpoint(endpoint.id, reason)
            _disabled.inc()
            logger.warning("webhook endpoint disabled", extra={"endpoint_id": endpoint.id, "reason": reason})
            await self._refresh_endpoints()
        return None
