"""The sender: works through the outbox, submits each message over SMTP, posts its lifecycle.

Why a service of its own, not a part of ingest: ingest takes input and must answer fast; a
sender holds SMTP conversations with tenants' servers that may take a minute each, retries over
hours, and must be stopped with care (a message half-submitted is the exactly-once window). It
scales with outbound traffic, not with intake. It shares no code path with ingest beyond libs.

Exactly once, as far as SMTP allows. The gateway stored the request (and its idempotency key as
the outbox row's key) before answering 202, with the Message-ID and Date fixed, so every attempt
submits the same bytes. For each attempt the sender records, in the row:

1. before the DATA command, ``submitting`` (after the recipients were accepted). A sender that
   stops before this point left nothing at the server: the row is still ``pending`` and is
   submitted again, safely;
2. after the server's 250, the event ``sent`` (with the queue id the server named) goes on
   inflight, then the row becomes ``submitted``.

A row found ``submitting`` (its sender was killed, or lost its connection during DATA) is *in
doubt*: the server may or may not have kept the message. It is never submitted again; it is
posted ``sent`` with the error code ``in_doubt``, and a DSN (requested with NOTIFY=SUCCESS,FAILURE)
settles it later. That window, from the DATA command to the record of its answer, is the one
SMTP leaves (RFC 1047: the client cannot tell whether a reply it never read was a 250); a sender
crash outside it never sends twice nor loses a message.

The sent copy: after the submission is recorded, the message is appended to the account's Sent
folder over IMAP unless the server filed it there itself (:mod:`services.sender.sent_copy`).

Retries: a 4xx, or a connection that failed before DATA, puts the row back ``pending`` with an
exponential backoff (``FLIGHTLOG_SENDER_RETRY_*``); a 5xx, or running out of attempts, posts
``failed`` with the server's code. Several senders may run: a row is leased to one of them
(:meth:`libs.outbox.OutboxStore.claim`), and a restarted sender (same instance id) takes its own
leases back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from datetime import UTC, datetime
from typing import Final

import prometheus_client
from aiokafka import AIOKafkaProducer

from libs.backoff import backoff_s
from libs.events import Event, EventType
from libs.imap_accounts import ImapAccountsSettings, SyncStore
from libs.inflight import publish_inflight
from libs.outbox import OutboxRow, OutboxState, OutboxStore, SmtpSettings
from libs.sending import SendRequest, build_mime, send_event
from libs.shards import ShardRouter
from services.sender.sent_copy import file_sent_copy
from services.sender.settings import SenderSettings
from services.sender.smtp import SubmitError, SubmitInDoubt, submit, tls_context

__all__ = ["Sender"]

logger = logging.getLogger(__name__)

OUTCOMES: Final = prometheus_client.Counter(
    "flightlog_sender_messages", "Submission attempts by outcome", ["outcome"]
)  # sent, deferred, failed, in_doubt
SMTP_SECONDS: Final = prometheus_client.Histogram(
    "flightlog_sender_smtp_seconds", "One SMTP conversation, connect to the answer to DATA"
)


class Sender:
    """:param owner: this sender's lease name, stable across its restarts (the instance id)."""

    def __init__(
        self,
        router: ShardRouter,
        store: OutboxStore,
        producer: AIOKafkaProducer,
        owner: str,
        settings: SenderSettings,
        smtp: SmtpSettings,
        imap_store: SyncStore,
        imap: ImapAccountsSettings,
    ) -> None:
        self._router = router
        self._store = store
        self._producer = producer
        self._owner = owner
        self._settings = settings
        self._smtp = smtp
        self._imap_store = imap_store
        self._imap = imap
        self._context: ssl.SSLContext = tls_context(smtp.smtp_tls_ca_file)
        self._slots = asyncio.Semaphore(settings.sender_concurrency)

    async def run(self, stopping: asyncio.Event) -> None:
        """Read every shard's outbox until ``stopping``; the messages in flight are finished.

        Each shard is worked by passes of its own, one at a time (:meth:`_pass`), the shards
        independently: a tenant's server that holds its conversations to the timeouts delays the
        rest of its shard's claim batch, never another shard's messages.
        """
        passes: dict[int, asyncio.Task[None]] = {}
        stop = asyncio.ensure_future(stopping.wait())
        try:
            while not stopping.is_set():
                for shard in self._router.shard_map.shards:  # the map of now: shards come and go
                    if shard not in passes:
                        work = self._pass(shard, stopping)
                        passes[shard] = asyncio.create_task(work, name=f"sender-shard-{shard}")
                await asyncio.wait([stop, *passes.values()], return_when=asyncio.FIRST_COMPLETED)
                for shard in [shard for shard, task in passes.items() if task.done()]:
                    passes.pop(shard).result()
        except asyncio.CancelledError:
            for task in passes.values():
                task.cancel()
            raise
        finally:
            stop.cancel()
            await asyncio.gather(*passes.values(), return_exceptions=True)

    async def _pass(self, shard: int, stopping: asyncio.Event) -> None:
        """One claim of the shard's due rows, sent at once (within the concurrency); a pause of
        ``sender_poll_interval_s`` when there were none or the claim failed."""
        try:
            rows = await self._store.claim(
                shard, self._owner, self._settings.sender_lease_s, self._settings.sender_claim_batch
            )
        except Exception:
            logger.exception("reading the outbox of shard %d failed", shard)
            rows = []
        if rows:
            await asyncio.gather(*(self._one(row) for row in rows))
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), self._settings.sender_poll_interval_s)

    async def _one(self, row: OutboxRow) -> None:
        async with self._slots:
            try:
                await self._send(row)
            except Exception:
                # The lease runs out and the row is tried again; nothing was recorded as done.
                logger.exception(
                    "sending %s of account %d failed", row.request.message_key, row.request.account_id
                )

    async def _post(self, events: list[Event]) -> None:
        await publish_inflight(self._producer, events, timeout_s=self._settings.sender_produce_timeout_s)

    async def _send(self, row: OutboxRow) -> None:
        request = row.request
        now = datetime.now(UTC)
        if row.state is OutboxState.SUBMITTING:
            logger.warning("message %s is in doubt: never submitted again", request.message_key)
            await self._post([send_event(request, EventType.SENT, now, error_code="in_doubt")])
            await self._store.mark_submitted(
                request, self._owner, None, "in doubt: the sender stopped after the DATA command"
            )
            return
        # accepted again is harmless (same event id): it covers a gateway that stopped between
        # storing the request and posting it.
        await self._post(
            [
                send_event(request, EventType.ACCEPTED, request.date, with_content=True),
                send_event(request, EventType.QUEUED, now),
                send_event(request, EventType.SENDING, now),
            ]
        )
        account = await self._store.smtp(request.account_id)
        if account is None:
            await self._fail(request, "no_smtp_account", "the account has no SMTP server or login")
            return
        mime = build_mime(request)
        began = time.perf_counter()
        try:
            done = await submit(
                account,
                request,
                mime,
                context=self._context,
                timeout_s=self._settings.sender_smtp_timeout_s,
                allow_private=self._smtp.smtp_allow_private_hosts,
                before_data=lambda: self._store.mark_submitting(request, self._owner),
            )
        except SubmitInDoubt as exc:
            OUTCOMES.labels("in_doubt").inc()
            logger.warning("message %s is in doubt: %s", request.message_key, exc)
            await self._post([send_event(request, EventType.SENT, datetime.now(UTC), error_code="in_doubt")])
            await self._store.mark_submitted(request, self._owner, None, f"in doubt: {exc}")
            return
        except SubmitError as exc:
            attempt = row.attempts + 1
            if exc.permanent or attempt >= self._settings.sender_max_attempts:
                await self._fail(request, exc.error_code, str(exc))
                return
            OUTCOMES.labels("deferred").inc()
            delay = backoff_s(
                attempt,
                self._settings.sender_retry_initial_s,
                self._settings.sender_retry_max_s,
                jitter="spread",
            )
            logger.info("message %s deferred %.1f s: %s", request.message_key, delay, exc)
            await self._store.defer(request, self._owner, str(exc), delay)
            return
        SMTP_SECONDS.observe(time.perf_counter() - began)
        OUTCOMES.labels("sent").inc()
        note = "; ".join(f"{r} refused: {why}" for r, why in done.refused.items()) or None
        await self._post([send_event(request, EventType.SENT, datetime.now(UTC))])
        await self._store.mark_submitted(request, self._owner, done.queue_id, note)
        if self._settings.sender_file_sent_copy:
            filed = await file_sent_copy(
                self._imap_store, self._imap, request.account_id, mime.as_bytes(), request.message_id,
                timeout_s=self._settings.sender_smtp_timeout_s,
            )  # fmt: skip
            logger.info("message %s sent (%s); sent copy: %s", request.message_key, done.queue_id, filed)

    async def _fail(self, request: SendRequest, code: str, reason: str) -> None:
        OUTCOMES.labels("failed").inc()
        await self._post([send_event(request, EventType.FAILED, datetime.now(UTC), error_code=code)])
        await self._store.mark_failed(request, self._owner, reason)
