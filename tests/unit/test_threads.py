"""Threads' pure parts: the recomputation's statement, change kinds, and the gateway's merge of
participants (persist's statement runs against MariaDB in tests/integration/test_persist_threads.py)."""

from __future__ import annotations

from typing import Any

import orjson

from libs.threads import THREAD_COLUMNS, aggregate_statement, change_kind
from services.gateway.constants import MAX_THREAD_PARTICIPANTS
from services.gateway.threads import thread_participants


def test_the_token_is_decided_before_the_version_and_the_aggregate_is_assigned() -> None:
    sql = aggregate_statement("s.threads", "s.messages", "(1, 'k')", 42)
    update = sql.split("ON DUPLICATE KEY UPDATE", 1)[1]
    token_at, version_at = update.index("change_token ="), update.index("version =")
    assert token_at < version_at < min(update.index(f"{c} = VALUES") for c in THREAD_COLUMNS)
    assert ", 1, 42 FROM s.messages WHERE (account_id, thread_key) IN ((1, 'k'))" in sql
    assert sql.endswith("RETURNING id, account_id, thread_key, version, message_count, change_token")


def test_change_kinds() -> None:
    assert change_kind(1, 2) == "created"
    assert change_kind(3, 2) == "updated"
    assert change_kind(3, 0) == "deleted"
    assert change_kind(1, 0) is None  # created empty: a message stored deleted


def row(key: str, people: dict[str, Any] | None, sender: str | None = None) -> dict[str, Any]:
    return {
        "thread_key": key,
        "sender": sender,
        "to_addrs": None,
        "cc_addrs": None,
        "participants": None if people is None else orjson.dumps(people),
    }


def test_participants_are_listed_once_each_with_the_first_name_given() -> None:
    first = {"from": [{"name": None, "email": "Ann@example.org"}], "to": [{"name": "Bo", "email": "bo@x"}]}
    second = {
        "from": [{"name": "Ann Lee", "email": "ann@example.org"}],
        "bcc": [{"name": None, "email": "c@x"}],
        "reply_to": [{"name": None, "email": "desk@x"}],
    }
    # the last: a row from before migration 0012, bare addresses only
    rows = [row("a", first), row("a", second), row("b", None, sender="old@x")]
    got = thread_participants(rows)
    assert got["a"] == [
        {"name": "Ann Lee", "email": "Ann@example.org"},
        {"name": "Bo", "email": "bo@x"},
        {"name": None, "email": "c@x"},
    ]  # reply_to is not a participant
    assert got["b"] == [{"name": None, "email": "old@x"}]


def test_participants_are_bounded() -> None:
    many = [row("a", {"to": [{"name": None, "email": f"p{i}@x"} for i in range(150)]})]
    assert len(thread_participants(many)["a"]) == MAX_THREAD_PARTICIPANTS
