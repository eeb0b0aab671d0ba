"""Whose a dead letter is: the account a record names, read from untrusted bytes, and the
headers that carry the application and the account."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cli.dlq import named_account
from libs.dlq import H_ACCOUNT, H_APPLICATION, DeadLetter, account_in_key, account_named, parse_dead_letter


@pytest.mark.parametrize(
    ("key", "account"),
    [
        (b"281474976710657:msg-1", 281474976710657),
        (b"12:a:b", 12),  # the message key may hold colons; the account is before the first
        (b"12", None),
        (b":msg", None),
        (b"-12:msg", None),
        (b"0:msg", None),
        (b"99999999999999999999:msg", None),  # over 64 bits
        (b"\xff\xfe:msg", None),
        (None, None),
    ],
)
def test_account_in_key(key: bytes | None, account: int | None) -> None:
    assert account_in_key(key) == account


@pytest.mark.parametrize(
    ("doc", "account"),
    [
        ({"account_id": "42"}, 42),
        ({"account_id": 42}, 42),
        ({"account_id": True}, None),
        ({"account_id": "4 2"}, None),
        ({"account_id": "٤٢"}, None),  # Arabic-Indic digits: isdigit, not ASCII
        ({"account_id": -1}, None),
        ({"account_id": 2**63}, None),
        ({"account": 42}, None),
        ([{"account_id": 42}], None),
        ("42", None),
    ],
)
def test_account_named(doc: Any, account: int | None) -> None:
    assert account_named(doc) == account


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_reading_the_account_of_any_bytes_never_fails(key: bytes, value: bytes) -> None:
    found = named_account(DeadLetter("transform", "x", key, value))
    assert found is None or 0 < found < 2**63


def test_named_account_prefers_the_value_then_the_key_then_the_header() -> None:
    value = b'{"account_id": "7", "message_key": "m"}'
    assert named_account(DeadLetter("transform", "x", b"8:m", value, account_id=9)) == 7
    assert named_account(DeadLetter("transform", "x", b"8:m", b"\x00 not json", account_id=9)) == 8
    assert named_account(DeadLetter("ingest", "x", None, b'{"no": "account"}', account_id=9)) == 9
    assert named_account(DeadLetter("ingest", "x", None, None)) is None


def test_owner_headers_are_read_back_and_a_mangled_one_is_none() -> None:
    entry = parse_dead_letter(None, b"{}", [(H_APPLICATION, b"12"), (H_ACCOUNT, b"345")], 3)
    assert (entry.application_id, entry.account_id, entry.dlq_offset) == (12, 345, 3)
    mangled = parse_dead_letter(None, b"{}", [(H_APPLICATION, b"12x"), (H_ACCOUNT, b"")])
    assert (mangled.application_id, mangled.account_id) == (None, None)
