"""libs.db.leader_lock_name: one leader per deployment, within MariaDB's 64-character limit."""

from __future__ import annotations

from libs.db import leader_lock_name


def test_deployments_sharing_a_server_get_different_locks() -> None:
    assert leader_lock_name("change-relay", "flightlog_global") == "flightlog.change-relay:flightlog_global"
    assert leader_lock_name("change-relay", "a") != leader_lock_name("change-relay", "b")
    assert leader_lock_name("change-relay", "a") != leader_lock_name("webhook-dispatcher", "a")


def test_long_schema_names_are_hashed_within_the_limit() -> None:
    long_a, long_b = "x" * 64, "x" * 63 + "y"
    a = leader_lock_name("webhook-dispatcher", long_a)
    assert len(a) <= 64
    assert a != leader_lock_name("webhook-dispatcher", long_b)
