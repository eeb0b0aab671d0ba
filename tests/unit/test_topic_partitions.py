"""Partition counts: settings per topic, 48 by default on a production cluster, the catalogue's
small counts on a smaller one (the local stack), and transform's changelog always inflight's."""

from __future__ import annotations

import pytest

from libs.config import KafkaSettings
from libs.kafka import (
    DLQ,
    ERASURES,
    IMAP_ACCOUNTS,
    INFLIGHT,
    POSTFLIGHT,
    PRODUCTION_PARTITIONS,
    TOPICS,
    TRANSFORM_STATE,
    topic_specs,
)


def _counts(settings: KafkaSettings, brokers: int) -> dict[str, int]:
    return {spec.name: spec.partitions for spec in topic_specs(settings, brokers)}


def test_a_small_cluster_keeps_the_small_counts() -> None:
    assert _counts(KafkaSettings(), 1) == {spec.name: spec.partitions for spec in TOPICS}
    assert _counts(KafkaSettings(), 2)[INFLIGHT] == 6


@pytest.mark.parametrize("brokers", [3, 9])
def test_a_production_cluster_gets_the_production_counts(brokers: int) -> None:
    counts = _counts(KafkaSettings(), brokers)
    assert PRODUCTION_PARTITIONS == 48
    assert counts[DLQ] == counts[ERASURES] == 1  # read in order, or whole, by one reader
    assert {n: c for n, c in counts.items() if n not in (DLQ, ERASURES)} == {
        spec.name: PRODUCTION_PARTITIONS for spec in TOPICS if spec.name not in (DLQ, ERASURES)
    }


def test_each_topic_has_its_setting_and_the_changelog_follows_inflight() -> None:
    settings = KafkaSettings(
        kafka_inflight_partitions=24, kafka_postflight_partitions=12, kafka_imap_accounts_partitions=3
    )
    for brokers in (1, 3):
        counts = _counts(settings, brokers)
        assert counts[INFLIGHT] == counts[TRANSFORM_STATE] == 24
        assert counts[POSTFLIGHT] == 12
        assert counts[IMAP_ACCOUNTS] == 3
    assert all(spec.setting for spec in TOPICS)
    fields = KafkaSettings.model_fields
    assert all(spec.setting in fields for spec in TOPICS)


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLIGHTLOG_KAFKA_INFLIGHT_PARTITIONS", "96")
    assert _counts(KafkaSettings(), 1)[TRANSFORM_STATE] == 96
