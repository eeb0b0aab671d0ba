"""Topic replication: 3 replicas and min.insync.replicas 2 by default, what a smaller cluster can
hold otherwise (the local stack's one broker), and an explicit factor the cluster cannot hold
refused rather than lowered."""

from __future__ import annotations

import pytest

from libs.config import KafkaSettings
from libs.kafka import TOPICS, ReplicationError, replication


@pytest.mark.parametrize(("brokers", "expected"), [(1, (1, 1)), (2, (2, 1)), (3, (3, 2)), (6, (3, 2))])
def test_defaults_follow_the_cluster(brokers: int, expected: tuple[int, int]) -> None:
    assert replication(brokers, KafkaSettings()) == expected


def test_explicit_settings_win_and_impossible_ones_are_refused() -> None:
    assert replication(
        5, KafkaSettings(kafka_topic_replication_factor=5, kafka_topic_min_insync_replicas=3)
    ) == (5, 3)
    with pytest.raises(ReplicationError, match="FLIGHTLOG_KAFKA_TOPIC_REPLICATION_FACTOR is 3"):
        replication(1, KafkaSettings(kafka_topic_replication_factor=3))
    with pytest.raises(ReplicationError, match="FLIGHTLOG_KAFKA_TOPIC_MIN_INSYNC_REPLICAS is 4"):
        replication(3, KafkaSettings(kafka_topic_min_insync_replicas=4))


def test_specs_leave_min_insync_replicas_to_the_settings() -> None:
    assert not any("min.insync.replicas" in spec.config for spec in TOPICS)
