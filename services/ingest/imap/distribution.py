"""Spreads IMAP accounts over the running ingest instances, with no scheduler of our own.

Every IMAP account has a record in the compacted topic ``flightlog.imap-accounts`` (key: the
account id; value: its credentials version; a tombstone removes it). Every ingest instance reads
that topic in one consumer group, so Kafka gives each partition to exactly one instance, and each
instance syncs the accounts of its partitions. When instances come or go Kafka rebalances: the
old owner stops the syncs of a revoked partition *inside* the revoke callback, before the group
moves on, so an account is never synced by two instances at once. Offsets are never committed:
on every assignment the partitions are read from the beginning (compaction keeps them short).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from libs.aio import raise_if_cancelling
from libs.component import Component
from libs.config import KafkaSettings
from libs.imap_accounts import SyncStore
from libs.imap_login import AccountLogin
from libs.kafka import IMAP_ACCOUNTS, TopicSpec, catalogue_spec, create_topics, make_consumer
from services.ingest.imap.settings import ImapSettings
from services.ingest.imap.sync import AccountSync, LoginGate

__all__ = ["AccountDistributor", "accounts_topic_spec"]

logger = logging.getLogger(__name__)


def accounts_topic_spec(settings: ImapSettings) -> TopicSpec:
    """The catalogue's imap-accounts topic under the configured name (its partitions are
    ``FLIGHTLOG_KAFKA_IMAP_ACCOUNTS_PARTITIONS``, resolved when it is created)."""
    return dataclasses.replace(catalogue_spec(IMAP_ACCOUNTS), name=settings.imap_accounts_topic)


class _Worker:
    def __init__(self, sync: AccountSync, version: int, partition: int) -> None:
        self.sync = sync
        self.version = version
        self.partition = partition
        self.task = asyncio.create_task(sync.run(), name=f"imap-sync-{sync.account_id}")


class AccountDistributor(Component, ConsumerRebalanceListener):  # type: ignore[misc]
    """Runs the syncs of the accounts in this instance's partitions; ``start()``, idempotent
    ``stop()``, ``async with``.

    :param instance: a name for logs (the ingest instance id).
    :param login: logs accounts in (OAuth2 tokens refreshed); None: passwords only.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: ImapSettings,
        store: SyncStore,
        producer: AIOKafkaProducer,
        instance: str = "",
        login: AccountLogin | None = None,
    ) -> None:
        self.login = login
        self.kafka, self.settings, self.store, self.producer, self.instance = (
            kafka,
            settings,
            store,
            producer,
            instance,
        )
        self.workers: dict[int, _Worker] = {}
        self.logins = LoginGate(settings.imap_max_concurrent_logins_per_host)
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await create_topics(self.kafka, (accounts_topic_spec(self.settings),))
        self._consumer = make_consumer(
            self.kafka, group_id=self.settings.imap_consumer_group, session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000, max_poll_interval_ms=300_000,
        )  # fmt: skip
        self._consumer.subscribe([self.settings.imap_accounts_topic], listener=self)
        await self._consumer.start()
        self._task = asyncio.create_task(self._consume(), name=f"imap-distributor-{self.instance}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stop_workers(list(self.workers))
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()  # leaves the group: the others take our partitions at once

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        parts = {tp.partition for tp in revoked}
        await self._stop_workers([a for a, w in self.workers.items() if w.partition in parts])

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if assigned:
            await self._consumer.seek_to_beginning(*assigned)
        logger.info("imap %s: partitions %s", self.instance, sorted(tp.partition for tp in assigned))

    async def _stop_workers(self, account_ids: list[int]) -> None:
        workers = [self.workers.pop(a) for a in account_ids if a in self.workers]
        for w in workers:
            w.task.cancel()
        for w in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await w.task

    async def _consume(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=1000)
            raise_if_cancelling()  # a loop that only waits: a lost cancel would keep stop() waiting
            for tp, records in batches.items():
                for record in records:
                    await self._apply(tp.partition, record.key, record.value)
            for account_id, w in list(self.workers.items()):
                if w.task.done() and not w.task.cancelled() and w.task.exception() is not None:
                    logger.error("imap sync of %d crashed: %r", account_id, w.task.exception())
                    self.workers.pop(account_id)

    async def _apply(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        account_id = int(key)
        if value is None:
            await self._stop_workers([account_id])
            return
        version = int(orjson.loads(value)["credentials_version"])
        current = self.workers.get(account_id)
        if current is not None and current.version >= version:
            return
        await self._stop_workers([account_id])
        sync = AccountSync(
            account_id, self.store, self.producer, self.settings, login=self.login, logins=self.logins
        )
        self.workers[account_id] = _Worker(sync, version, partition)
