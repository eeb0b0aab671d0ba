"""Kafka helpers: the topic catalogue, topic creation, and producer/consumer factories.

Every producer is idempotent with ``acks=all``; consumers commit offsets explicitly (after the
work they cover is durable) and read committed data only, so aborted transactions stay unseen.
aiokafka's clients already have the ``start()`` / idempotent ``stop()`` / ``async with`` shape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError

from libs.config import KafkaSettings

__all__ = [
    "CHANGES",
    "DLQ",
    "ERASURES",
    "IMAP_ACCOUNTS",
    "INFLIGHT",
    "PERSIST_RETRY",
    "POSTFLIGHT",
    "RETENTION_MS",
    "TOPICS",
    "TRANSFORM_STATE",
    "TopicSpec",
    "create_topics",
    "make_consumer",
    "make_producer",
]

logger = logging.getLogger(__name__)

INFLIGHT: Final = "flightlog.inflight"
POSTFLIGHT: Final = "flightlog.postflight"
CHANGES: Final = "flightlog.changes"
DLQ: Final = "flightlog.dlq"
TRANSFORM_STATE: Final = "flightlog.transform-state"
# Postflight records persist could not write because their shard was down or slow; persist
# retries them from here so the other shards never wait for one.
PERSIST_RETRY: Final = "flightlog.persist-retry"
# One compacted record per IMAP account (key: account id); ingest instances split it between them.
IMAP_ACCOUNTS: Final = "flightlog.imap-accounts"
# One compacted record per erased account (key: account id; libs.erasure): transform reads it
# whole and tails it, tombstones the account's states and drops its records still in flight.
ERASURES: Final = "flightlog.erasures"

_WEEK_MS: Final = 7 * 24 * 3600 * 1000
# How long each append-only topic keeps a record (``retention.ms``). These are the upper bound of
# how long an erased account's records may outlive its erasure there (docs/privacy.md): a topic
# cannot drop one account's records, so an erasure report names each topic with this time.
RETENTION_MS: Final = {
    INFLIGHT: _WEEK_MS,
    POSTFLIGHT: _WEEK_MS,
    CHANGES: _WEEK_MS,
    DLQ: 4 * _WEEK_MS,
    PERSIST_RETRY: 4 * _WEEK_MS,
}
# Tombstones stay an hour after compaction (the default is a day): transform's restore reads each
# one, and every expired message state leaves one. A restore takes seconds, far below the hour.
_COMPACTED: Final = {
    "cleanup.policy": "compact",
    "min.compaction.lag.ms": "60000",
    "segment.ms": "3600000",
    "delete.retention.ms": "3600000",
}


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


# inflight and the transform's changelog must have the same partition count: partition N of the
# changelog holds the state of the messages read from partition N of inflight.
TOPICS: Final = (
    TopicSpec(INFLIGHT, 6, {"retention.ms": str(RETENTION_MS[INFLIGHT])}),
    TopicSpec(POSTFLIGHT, 6, {"retention.ms": str(RETENTION_MS[POSTFLIGHT])}),
    TopicSpec(CHANGES, 6, {"retention.ms": str(RETENTION_MS[CHANGES])}),
    TopicSpec(DLQ, 1, {"retention.ms": str(RETENTION_MS[DLQ])}),
    TopicSpec(PERSIST_RETRY, 6, {"retention.ms": str(RETENTION_MS[PERSIST_RETRY])}),
    TopicSpec(TRANSFORM_STATE, 6, dict(_COMPACTED)),
    TopicSpec(IMAP_ACCOUNTS, 12, dict(_COMPACTED)),
    TopicSpec(ERASURES, 1, dict(_COMPACTED)),
)


class ReplicationError(ValueError):
    """The replication asked for cannot be had on this cluster."""


def replication(brokers: int, settings: KafkaSettings) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) of new topics on a cluster of ``brokers``.

    By default 3 and 2, so acks=all survives a broker down; a cluster with fewer brokers gets as
    many replicas as it has and ``min.insync.replicas`` one less (1 on the local stack's single
    broker). Set explicitly, a factor above the broker count is refused rather than lowered."""
    factor = settings.kafka_topic_replication_factor
    if factor is None:
        factor = min(3, brokers)
    elif factor > brokers:
        raise ReplicationError(
            f"FLIGHTLOG_KAFKA_TOPIC_REPLICATION_FACTOR is {factor} but the cluster has {brokers} broker(s)"
        )
    insync = settings.kafka_topic_min_insync_replicas
    if insync is None:
        insync = max(1, min(2, factor - 1))
    elif insync > factor:
        raise ReplicationError(
            f"FLIGHTLOG_KAFKA_TOPIC_MIN_INSYNC_REPLICAS is {insync}, above the replication factor {factor}"
        )
    return factor, insync


async def create_topics(settings: KafkaSettings, specs: tuple[TopicSpec, ...] = TOPICS) -> list[str]:
    """Create the topics that do not exist yet, and give those that do their spec's settings (a
    topic created by an older version keeps no stale retention); returns the names created. The
    replication factor and ``min.insync.replicas`` are :func:`replication`'s."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        request_timeout_ms=settings.kafka_request_timeout_ms,
    )
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
        factor, insync = replication(len(cluster["brokers"]), settings)

        def config(spec: TopicSpec) -> dict[str, str]:
            return {**spec.config, "min.insync.replicas": str(insync)}

        existing = set(await admin.list_topics())
        wanted = [s for s in specs if s.name not in existing]
        stale = [s for s in specs if s.name in existing]
        if stale:
            # AlterConfigs replaces a topic's overrides with these: the spec is the whole set.
            await admin.alter_configs(
                [ConfigResource(ConfigResourceType.TOPIC, s.name, configs=config(s)) for s in stale]
            )
        if not wanted:
            return []
        try:
            await admin.create_topics(
                [NewTopic(s.name, s.partitions, factor, topic_configs=config(s)) for s in wanted]
            )
        except TopicAlreadyExistsError:
            pass  # another process won the race: what we wanted exists
        logger.info("created topics %s", [s.name for s in wanted])
        return [s.name for s in wanted]
    finally:
        await admin.close()


def make_producer(
    settings: KafkaSettings, *, transactional_id: str | None = None, **overrides: Any
) -> AIOKafkaProducer:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": settings.kafka_linger_ms,
        "max_batch_size": settings.kafka_max_batch_bytes,
        "request_timeout_ms": settings.kafka_request_timeout_ms,
        "compression_type": None,
    }
    if transactional_id is not None:
        options["transactional_id"] = transactional_id
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(
    settings: KafkaSettings, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "request_timeout_ms": settings.kafka_request_timeout_ms,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)
