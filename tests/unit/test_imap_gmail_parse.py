"""Gmail's FETCH items (X-GM-MSGID, X-GM-THRID, X-GM-LABELS) and the per-host login bound."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from libs.imap.client import MAX_GM_LABELS, decode_mailbox_utf7, parse_fetch, parse_gm_labels
from services.ingest.imap.sync import LoginGate


def test_the_documents_example_labels() -> None:
    # "IMAP Extensions": * 1 FETCH (X-GM-LABELS (\Inbox \Sent Important "Muy Importante"))
    data = b'* 1 FETCH (X-GM-LABELS (\\Inbox \\Sent Important "Muy Importante") UID 4)'
    labels, end = parse_gm_labels(data, data.index(b"(", 12) + 1)
    assert labels == ["\\Inbox", "\\Sent", "Important", "Muy Importante"]
    assert data[end:] == b" UID 4)"


def test_empty_labels_escapes_and_modified_utf7() -> None:
    assert parse_gm_labels(b"X-GM-LABELS ()", 13) == ([], 14)
    data = b'X-GM-LABELS ("a \\"quoted\\" \\\\ one" &AMk-t&AOk- "x)y" R&-D)'
    labels, _ = parse_gm_labels(data, 13)
    assert labels == ['a "quoted" \\ one', "Été", "x)y", "R&D"]


def test_fetch_items_with_gmail_ids_and_a_hostile_label() -> None:
    lines = [
        b"1 FETCH (X-GM-THRID 1266894439832287888 X-GM-MSGID 1278455344230334865 X-GM-LABELS "
        b'("UID 99" "FLAGS (\\\\Deleted)") UID 7 FLAGS (\\Seen))',
        b"2 FETCH (UID 8 FLAGS () X-GM-MSGID 99999999999999999999999)",  # above 2**64 - 1
        b"3 FETCH (UID 9 FLAGS ())",
    ]
    first, second, third = parse_fetch(lines)
    # a label that looks like another item is a label: the UID and flags are the real ones
    assert (first.uid, first.flags) == (7, ["\\Seen"])
    assert first.gm_labels == ["UID 99", "FLAGS (\\Deleted)"]
    assert (first.gm_msgid, first.gm_thrid) == (1278455344230334865, 1266894439832287888)
    assert second.gm_msgid is None and second.gm_labels is None
    assert third.gm_labels is None  # not asked for: None, not an empty list


def test_labels_are_bounded() -> None:
    data = b"X-GM-LABELS (" + b" ".join(b"l%d" % i for i in range(MAX_GM_LABELS + 50)) + b")"
    labels, end = parse_gm_labels(data, 13)
    assert len(labels) == MAX_GM_LABELS and end == len(data)


@given(st.binary(max_size=300))
def test_any_bytes_parse_without_error(data: bytes) -> None:
    labels, end = parse_gm_labels(data, 0)
    assert 0 <= end <= len(data) and len(labels) <= MAX_GM_LABELS
    decode_mailbox_utf7(data)


async def test_the_login_gate_bounds_each_host_and_forgets_idle_ones() -> None:
    gate = LoginGate(per_host=2)
    inside: dict[str, int] = {"a": 0, "b": 0}
    most: dict[str, int] = {"a": 0, "b": 0}

    async def login(host: str) -> None:
        async with gate.slot(host.upper()):  # host names compare case-insensitively
            inside[host] += 1
            most[host] = max(most[host], inside[host])
            await asyncio.sleep(0.01)
            inside[host] -= 1

    await asyncio.gather(*(login(h) for h in "ab" * 10))
    assert most == {"a": 2, "b": 2}
    assert not gate._hosts  # no entry left for a host nobody is logging in to
