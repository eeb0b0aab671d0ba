"""The erasure report (libs.erasure): what it says about the topics an erasure cannot reach."""

from __future__ import annotations

from datetime import datetime, timedelta

from libs.erasure import Erasure
from libs.kafka import DLQ, INFLIGHT, RETENTION_MS, TOPICS


def test_the_report_names_every_append_only_topic_with_the_time_its_records_are_gone() -> None:
    requested = datetime(2026, 11, 30, 15, 0, 0)
    job = Erasure(7 << 48 | 3, 12, "done", {"shard.messages": 4}, requested, requested + timedelta(seconds=2))
    report = job.report()
    assert report["account_id"] == str(7 << 48 | 3) and report["erased"] == {"shard.messages": 4}
    topics = {t["topic"]: t for t in report["topics"]}
    deleting = {s.name for s in TOPICS if s.config.get("cleanup.policy") != "compact"}
    assert set(topics) == deleting  # every topic that keeps records by time, and only those
    assert topics[INFLIGHT]["records_expire_by"] == "2026-12-07T15:00:00.000000Z"
    assert topics[DLQ]["retention_s"] == 28 * 86400
    for spec in TOPICS:
        if spec.name in topics:
            assert int(spec.config["retention.ms"]) == RETENTION_MS[spec.name]
