"""persist's pure helpers for content versions and patches: rows, batch collapsing, change kinds.

The SQL itself runs against MariaDB in tests/integration/test_persist_content_versions.py; here
:func:`_upsert` models it, so that collapsing a batch (:func:`latest_per_message`) can be checked
over many generated batches.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from asyncmy.converters import escape_item, escape_string
from hypothesis import given
from hypothesis import strategies as st

from libs.db.literals import escaped as escaped_by_writer
from libs.db.literals import values_sql
from libs.events import AttachmentInfo, MessageDoc, MessageFlags, MessagePatch, PostflightRecord
from libs.messages import BODY_RAW, ERASABLE_COLUMNS
from services.persist.writer import (
    _INSERT_COLUMNS,
    RowState,
    change_kind,
    content_version,
    latest_per_message,
    patch_assignments,
    row,
    upsert_statement,
)

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
ACCOUNT = 3 << 48 | 77
CONTENT_COLUMNS = (
    "channel", "sender", "to_addrs", "cc_addrs", "subject", "snippet", "body", "body_encoding",
    "error_code", "attachments", "thread_key", "size_bytes", "parse_warnings",
    "participants", "sent_at", "rfc_message_id", "in_reply_to", "reference_ids",
)  # fmt: skip
FLAG_COLUMNS = ("status", "unread", "starred", "folder", "labels")


def record(
    version: int, cv: int | None = None, *, key: str = "m1", deleted: bool = False, **doc: Any
) -> PostflightRecord:
    return PostflightRecord(
        account_id=ACCOUNT,
        message_key=key,
        version=version,
        content_version=cv,
        deleted=deleted,
        message=MessageDoc(**{"status": "delivered", "occurred_at": NOW, **doc}),
    )


def values(r: PostflightRecord) -> dict[str, Any]:
    return dict(zip(_INSERT_COLUMNS, row(r)[0], strict=True))


def test_content_version_defaults_to_the_version() -> None:
    assert content_version(record(7)) == 7
    assert content_version(record(7, 0)) == 0
    assert content_version(record(7, 5)) == 5
    assert values(record(7))["content_version"] == 7


def test_a_record_without_content_writes_no_content() -> None:
    got = values(record(9, 0, sender="a@example.test", to=["b@example.test"], subject="s", body_text="b"))
    assert all(got[c] is None for c in CONTENT_COLUMNS if c != "body_encoding")
    assert got["body_encoding"] == BODY_RAW
    assert (got["version"], got["content_version"], got["status"]) == (9, 0, "delivered")


def test_empty_lists_are_null_so_stored_ones_are_kept() -> None:
    got = values(record(3, subject="s"))
    assert got["to_addrs"] is None and got["cc_addrs"] is None and got["attachments"] is None
    assert got["body"] is None and got["body_encoding"] == BODY_RAW
    assert got["labels"] == "[]"  # a flag: an empty list clears the labels
    got = values(record(3, to=["b@example.test"], body_text="hi"))
    assert got["to_addrs"] == '["b@example.test"]' and got["body"] is not None


@pytest.mark.parametrize("erasure", [{"deleted": True}, {"redacted": True}])
def test_an_erasing_record_carries_no_erasable_content(erasure: dict[str, Any]) -> None:
    got = values(record(4, subject="s", snippet="x", body_text="b", sender="a@example.test", **erasure))
    assert all(got[c] is None for c in ERASABLE_COLUMNS if c != "body_encoding")
    assert got["sender"] == "a@example.test"


def test_both_versions_are_assigned_last() -> None:
    sql = upsert_statement("t", 1)
    assignments = sql.split(" ON DUPLICATE KEY UPDATE ")[1]
    assert assignments.endswith(
        "content_version = GREATEST(content_version, VALUES(content_version)),"
        " version = GREATEST(version, VALUES(version))"
    )


def _escaped(value: Any) -> str:
    """asyncmy's Connection.escape on a session without NO_BACKSLASH_ESCAPES (as libs.db opens
    every one); bytes as a hex literal, as persist writes them."""
    if isinstance(value, str):
        return f"'{escape_string(value)}'"
    if isinstance(value, bytes):
        return f"X'{value.hex()}'"
    return str(escape_item(value, "utf8mb4"))


_text = st.text(st.characters(codec="utf-8"), max_size=30)


@given(
    key=_text.filter(bool),
    subject=_text,
    body=st.one_of(st.none(), _text, st.text(min_size=200, max_size=400)),
    to=st.lists(_text.filter(bool), max_size=3),
    cv=st.sampled_from([None, 0, 3]),
    occurred_at=st.datetimes(datetime(1001, 1, 1), datetime(9998, 1, 1), timezones=st.just(UTC)),
    deleted=st.booleans(),
)
def test_the_upsert_literals_are_the_drivers_with_bytes_in_hex(
    key: str,
    subject: str,
    body: str | None,
    to: list[str],
    cv: int | None,
    occurred_at: datetime,
    deleted: bool,
) -> None:
    r = record(
        7, cv, key=key, deleted=deleted, subject=subject, body_text=body, to=to, occurred_at=occurred_at,
        attachments=[AttachmentInfo(filename=subject)], labels=[subject] if subject else [],
    )  # fmt: skip
    got = row(r)[0]
    assert values_sql([got, got]) == ", ".join(["(" + ", ".join(_escaped(v) for v in got) + ")"] * 2)


@given(st.text())
def test_strings_are_escaped_as_the_driver_escapes_them(value: str) -> None:
    for text in (value, value + "\\'\"\0\n\r\x1a", "\\" + value + "\\"):
        assert escaped_by_writer(text) == escape_string(text)


def _upsert(stored: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """What the upsert statement does to one row, in Python."""
    if stored is None:
        return dict(new)
    out = dict(stored)
    erased = stored["redacted"] or stored["deleted"] or new["redacted"] or new["deleted"]
    newer_content = new["content_version"] > stored["content_version"]
    if new["version"] > stored["version"]:
        out.update({c: new[c] for c in FLAG_COLUMNS})
    for c in CONTENT_COLUMNS:
        if c == "body_encoding":
            taken = newer_content and new["body"] is not None
            out[c] = BODY_RAW if erased else new[c] if taken else stored[c]
        elif erased and c in ERASABLE_COLUMNS:
            out[c] = None
        elif c == "participants" and newer_content and new[c] is not None and stored[c] is not None:
            out[c] = orjson.dumps(orjson.loads(stored[c]) | orjson.loads(new[c])).decode()  # per role
        elif newer_content and new[c] is not None:
            out[c] = new[c]
    out["redacted"] = stored["redacted"] or new["redacted"]
    out["deleted"] = stored["deleted"] or new["deleted"]
    out["content_version"] = max(stored["content_version"], new["content_version"])
    out["version"] = max(stored["version"], new["version"])
    return out


def _apply(stored: dict[str, Any] | None, records: list[PostflightRecord]) -> dict[str, Any] | None:
    for r in records:
        stored = _upsert(stored, values(r))
    return stored


@st.composite
def batches(draw: st.DrawFn) -> list[PostflightRecord]:
    """Records of one message as transform emits them: a version is one record (replays are
    equal), and a content version names one content (records of equal content version agree)."""
    versions = draw(st.lists(st.integers(1, 12), min_size=1, max_size=8, unique=True))
    made: dict[int, PostflightRecord] = {}
    for v in versions:
        cv = draw(st.sampled_from([0, v, *(u for u in versions if u < v)]))
        content: dict[str, Any] = {}
        if cv:
            # What a content version carries is a function of it: partial, yet the same each time.
            content = {
                "subject": f"s{cv}" if cv % 2 else None,
                "sender": f"a{cv}@example.test" if cv % 3 else None,
                "body_text": f"b{cv}" if cv % 5 else None,
                # participants merge per role: a content version may set cc alone
                "cc": [{"name": f"C {cv}", "email": f"c{cv}@example.test"}] if cv % 4 else [],
            }
        made[v] = record(
            v,
            cv,
            deleted=draw(st.booleans()) and draw(st.booleans()),
            redacted=draw(st.booleans()) and draw(st.booleans()),
            starred=draw(st.booleans()),
            **content,
        )
    return [made[v] for v in draw(st.lists(st.sampled_from(versions), min_size=1, max_size=12))]


STORED = [None, values(record(6, 6, subject="old", sender="old@example.test", body_text="old"))]


@given(batches(), st.sampled_from(STORED))
def test_collapsing_a_batch_changes_nothing(
    records: list[PostflightRecord], stored: dict[str, Any] | None
) -> None:
    # The whole batch, one by one in the order content was set, against what is written.
    in_order = sorted(records, key=lambda r: (content_version(r), r.version))
    kept = latest_per_message(records)
    assert _apply(stored, kept) == _apply(stored, in_order)
    assert kept == sorted(kept, key=lambda r: (content_version(r), r.version))
    assert len({r.version for r in kept}) == len(kept)  # no replays


def test_a_batch_keeps_the_content_a_later_record_lacks() -> None:
    content, flags, replay = record(10, subject="s"), record(20, 0, starred=True), record(10, subject="s")
    # Folded into one record: the flags and status of 20 over the content of 10.
    (folded,) = latest_per_message([flags, content, replay])
    assert (folded.version, folded.content_version) == (20, 10)
    assert folded.message.subject == "s" and folded.message.starred is True
    assert values(folded) == values(flags) | {
        k: v for k, v in values(content).items() if k in CONTENT_COLUMNS or k == "content_version"
    }
    # Lower flags-only records and replays go; an erasure no kept record makes stays.
    redaction = record(12, 0, redacted=True)
    assert latest_per_message([content, record(11, 0), redaction, flags]) == [redaction, flags, content]
    other = record(1, key="m2")
    assert latest_per_message([content, other]) == [content, other]


def _state(version: int = 10, cv: int = 10, redacted: bool = False, deleted: bool = False) -> RowState:
    return RowState(1, version, cv, redacted, deleted)


def test_change_kind() -> None:
    same = _state()
    assert change_kind(None, same) == "created"
    assert change_kind(None, _state(deleted=True)) == "deleted"
    assert change_kind(same, same) is None
    assert change_kind(same, _state(version=11)) == "updated"
    assert change_kind(same, _state(cv=11)) == "updated"  # late content under a newer version
    assert change_kind(same, _state(redacted=True)) == "updated"
    assert change_kind(same, _state(deleted=True)) == "deleted"
    assert change_kind(_state(deleted=True), _state(version=12, deleted=True)) == "deleted"


def patch(version: int, *, deleted: bool = False, **fields: Any) -> PostflightRecord:
    flags = fields.pop("flags", None)
    return PostflightRecord(
        account_id=ACCOUNT,
        message_key="m1",
        version=version,
        content_version=0,
        deleted=deleted,
        message=MessageDoc(occurred_at=NOW),
        patch=MessagePatch(flags=MessageFlags(**flags) if flags is not None else None, **fields),
    )


def test_patch_flags_only_over_a_lower_version() -> None:
    flags = {"unread": False, "labels": ["a"]}
    assert patch_assignments(_state(version=10), patch(11, flags=flags)) == {
        "unread": False,
        "labels": '["a"]',
        "version": 11,
    }
    assert patch_assignments(_state(version=11), patch(11, flags=flags)) == {}
    assert patch_assignments(_state(version=10), patch(11, flags={})) == {}
    assert patch_assignments(_state(version=10), patch(11)) == {}


@pytest.mark.parametrize("erasure", [{"deleted": True}, {"redacted": True}])
def test_patch_erasure_whatever_the_versions(erasure: dict[str, bool]) -> None:
    got = patch_assignments(_state(version=30, cv=30), patch(20, flags={"starred": True}, **erasure))
    assert got == {
        **erasure,
        **dict.fromkeys(("subject", "snippet", "body", "attachments")),
        "body_encoding": BODY_RAW,
        "content_version": 30,
        "version": 30,
    }
    # Erased already that way: nothing to do.
    assert patch_assignments(_state(version=30, **erasure), patch(20, **erasure)) == {}
    # A newer erasure raises both versions.
    got = patch_assignments(_state(version=10, cv=5), patch(20, **erasure))
    assert (got["version"], got["content_version"]) == (20, 20)


def test_a_deleted_record_with_a_patch_deletes() -> None:
    got = patch_assignments(_state(), patch(11, deleted=True))
    assert got["deleted"] is True and got["subject"] is None


def test_patch_assignments_refuses_a_full_record() -> None:
    with pytest.raises(ValueError, match="not a patch"):
        patch_assignments(_state(), record(11))
