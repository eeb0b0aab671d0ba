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
from libs.tls import client_context

__all__ = [
    "CHANGES",
    "DLQ",
    "ERASURES",
    "IMAP_ACCOUNTS",
    "INFLIGHT",
    "PERSIST_RETRY",
    "POSTFLIGHT",
    "PRODUCTION_BROKERS",
    "PRODUCTION_PARTITIONS",
    "RETENTION_MS",
    "TOPICS",
    "TRANSFORM_STATE",
    "TopicMismatch",
    "TopicSpec",
    "catalogue_spec",
    "client_options",
    "create_topics",
    "make_admin",
    "make_consumer",
    "make_producer",
    "partition_count",
    "resolve",
    "topic_specs",
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


# Partitions of the partitioned topics on a production cluster (3 or more brokers), unless set.
# Each stage runs at most this many instances: transform and persist at ~40 and ~30 us of CPU an
# event (BENCHMARKS.md) would take 48 instances past 1 million events/s, far beyond what one
# machine's cores give. 48 splits evenly among 1, 2, 3, 4, 6, 8, 12, 16, 24 and 48 instances.
# The cost is on the brokers: 6 topics of 48 with 3 replicas are ~860 partition replicas, well
# within what a three-broker cluster carries; transform restores its changelog per partition, so
# a rebalance moves smaller pieces.
PRODUCTION_PARTITIONS: Final = 48
# A cluster this large gets the production partition counts by default.
PRODUCTION_BROKERS: Final = 3


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic: its name, partitions and configs. In :data:`TOPICS`, ``partitions`` is the count
    on a cluster smaller than :data:`PRODUCTION_BROKERS` and ``setting`` the
    :class:`~libs.config.KafkaSettings` field that sets it (:func:`topic_specs` resolves both)."""

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    setting: str | None = None
    production_partitions: int = PRODUCTION_PARTITIONS


# inflight and the transform's changelog share one setting: partition N of the changelog holds
# the state of the messages read from partition N of inflight.
TOPICS: Final = (
    TopicSpec(INFLIGHT, 6, {"retention.ms": str(RETENTION_MS[INFLIGHT])}, "kafka_inflight_partitions"),
    TopicSpec(POSTFLIGHT, 6, {"retention.ms": str(RETENTION_MS[POSTFLIGHT])}, "kafka_postflight_partitions"),
    TopicSpec(CHANGES, 6, {"retention.ms": str(RETENTION_MS[CHANGES])}, "kafka_changes_partitions"),
    TopicSpec(DLQ, 1, {"retention.ms": str(RETENTION_MS[DLQ])}, "kafka_dlq_partitions", 1),
    TopicSpec(
        PERSIST_RETRY, 6, {"retention.ms": str(RETENTION_MS[PERSIST_RETRY])}, "kafka_persist_retry_partitions"
    ),
    TopicSpec(TRANSFORM_STATE, 6, dict(_COMPACTED), "kafka_inflight_partitions"),
    TopicSpec(IMAP_ACCOUNTS, 12, dict(_COMPACTED), "kafka_imap_accounts_partitions"),
    TopicSpec(ERASURES, 1, dict(_COMPACTED), "kafka_erasures_partitions", 1),
)


def resolve(spec: TopicSpec, settings: KafkaSettings, brokers: int) -> TopicSpec:
    """``spec`` with its partition count for a cluster of ``brokers``: the setting where one is
    given, else the production count on :data:`PRODUCTION_BROKERS` or more, else the small count.
    A spec without a ``setting`` is taken as it is."""
    if spec.setting is None:
        return spec
    explicit = getattr(settings, spec.setting)
    if explicit is not None:
        count = int(explicit)
    else:
        count = spec.production_partitions if brokers >= PRODUCTION_BROKERS else spec.partitions
    return TopicSpec(spec.name, count, dict(spec.config))


def topic_specs(settings: KafkaSettings, brokers: int) -> tuple[TopicSpec, ...]:
    """:data:`TOPICS` resolved (:func:`resolve`) for a cluster of ``brokers``."""
    return tuple(resolve(s, settings, brokers) for s in TOPICS)


def catalogue_spec(name: str) -> TopicSpec:
    """The :data:`TOPICS` entry named ``name``."""
    return next(s for s in TOPICS if s.name == name)


class TopicMismatch(ValueError):
    """An existing topic differs from what the settings ask, in what only an operator may change
    (its partition count or replication factor); the message names each difference."""


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


async def create_topics(settings: KafkaSettings, specs: tuple[TopicSpec, ...] | None = None) -> list[str]:
    """Create the topics that do not exist yet, and give those that do their spec's settings (a
    topic created by an older version keeps no stale retention); returns the names created.
    ``specs`` default to :data:`TOPICS`; each is :func:`resolve`d for this cluster. The replication factor and
    ``min.insync.replicas`` are :func:`replication`'s. An existing topic whose partition count or
    replication factor differs raises :class:`TopicMismatch` before anything is changed."""
    admin = make_admin(settings)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
        brokers = len(cluster["brokers"])
        factor, insync = replication(brokers, settings)
        specs = tuple(resolve(s, settings, brokers) for s in (TOPICS if specs is None else specs))

        def config(spec: TopicSpec) -> dict[str, str]:
            return {**spec.config, "min.insync.replicas": str(insync)}

        existing = set(await admin.list_topics())
        wanted = [s for s in specs if s.name not in existing]
        stale = [s for s in specs if s.name in existing]
        if stale:
            described = {t["topic"]: t for t in await admin.describe_topics([s.name for s in stale])}
            differences = _differences(stale, described, factor)
            if differences:
                raise TopicMismatch(
                    "existing topics differ from the settings (see docs/topics.md on growing"
                    " partitions): " + "; ".join(differences)
                )
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


def _differences(specs: list[TopicSpec], described: dict[str, Any], factor: int) -> list[str]:
    found = []
    for spec in specs:
        partitions = described[spec.name]["partitions"]
        if len(partitions) != spec.partitions:
            found.append(f"{spec.name} has {len(partitions)} partitions, the settings ask {spec.partitions}")
        replicas = {len(p["replicas"]) for p in partitions}
        if replicas and replicas != {factor}:
            have = "/".join(str(r) for r in sorted(replicas))
            found.append(f"{spec.name} has {have} replicas, the settings ask {factor}")
    return found


async def partition_count(settings: KafkaSettings, topic: str) -> int:
    """How many partitions ``topic`` has on the cluster (0 when it does not exist)."""
    admin = make_admin(settings)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return len(described[0]["partitions"]) if described and described[0]["error_code"] == 0 else 0


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """What every client (producer, consumer, admin) is given: the brokers, the request timeout,
    and the security settings (TLS that always verifies the brokers, SASL)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "request_timeout_ms": settings.kafka_request_timeout_ms,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = client_context(
            settings.kafka_tls_ca_file,
            verify_hostname=settings.kafka_tls_verify_hostname,
            cert_file=settings.kafka_tls_cert_file,
            key_file=settings.kafka_tls_key_file,
        )
    if settings.kafka_security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password
    return options


def make_admin(settings: KafkaSettings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**client_options(settings))


def make_producer(
    settings: KafkaSettings, *, transactional_id: str | None = None, **overrides: Any
) -> AIOKafkaProducer:
    options: dict[str, Any] = {
        **client_options(settings),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": settings.kafka_linger_ms,
        "max_batch_size": settings.kafka_max_batch_bytes,
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
        **client_options(settings),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)
