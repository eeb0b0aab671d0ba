"""The local stack's Kafka cluster id: the storage tool takes an id starting with "-" for an option."""

import uuid

import pytest

from cli import stack


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x00" * 16)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(drawn))
    assert stack._kafka_cluster_id() == "AAAAAAAAAAAAAAAAAAAAAA"  # the first draw, "-AAA...", is drawn again


def test_a_cluster_id_is_22_url_safe_characters() -> None:
    for _ in range(1000):
        cluster_id = stack._kafka_cluster_id()
        assert len(cluster_id) == 22 and not cluster_id.startswith("-")
        assert set(cluster_id) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
