"""Cursors and page tokens: round trips, binding to account and query, and refusal of anything else."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.cursor import (
    MAX_TOKEN_LENGTH,
    CursorError,
    DeltaCursor,
    ForeignCursor,
    MalformedCursor,
    PageToken,
    decode_delta_cursor,
    decode_page_token,
    encode_delta_cursor,
    encode_page_token,
    query_fingerprint,
)

KEY = b"test-key"
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)


@given(u64, u64)
def test_delta_cursor_round_trip(account_id: int, change_id: int) -> None:
    token = encode_delta_cursor(KEY, DeltaCursor(account_id, change_id))
    assert len(token) <= MAX_TOKEN_LENGTH
    assert token.isascii() and "=" not in token and "/" not in token and "+" not in token
    assert decode_delta_cursor(KEY, token, account_id) == DeltaCursor(account_id, change_id)


@given(u64, u64, u64)
def test_delta_cursor_is_bound_to_its_account(account_id: int, other: int, change_id: int) -> None:
    token = encode_delta_cursor(KEY, DeltaCursor(account_id, change_id))
    if other != account_id:
        with pytest.raises(ForeignCursor):
            decode_delta_cursor(KEY, token, other)


@given(u64, u64, i64, u64)
def test_page_token_round_trip(account_id: int, fp: int, at_us: int, message_id: int) -> None:
    token = encode_page_token(KEY, PageToken(account_id, fp, at_us, message_id))
    assert decode_page_token(KEY, token, account_id, fp) == PageToken(account_id, fp, at_us, message_id)
    with pytest.raises(ForeignCursor):
        decode_page_token(KEY, token, account_id, fp ^ 1)
    with pytest.raises(ForeignCursor):
        decode_page_token(KEY, token, account_id ^ 1, fp)


@given(u64, u64, st.data())
def test_any_altered_byte_is_refused(account_id: int, change_id: int, data: st.DataObject) -> None:
    token = encode_delta_cursor(KEY, DeltaCursor(account_id, change_id))
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] ^= data.draw(st.integers(1, 255))
    altered = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(MalformedCursor):
        decode_delta_cursor(KEY, altered, account_id)


@given(st.text(max_size=200))
def test_arbitrary_text_is_refused_cleanly(text: str) -> None:
    with pytest.raises(CursorError):
        decode_delta_cursor(KEY, text, 1)
    with pytest.raises(CursorError):
        decode_page_token(KEY, text, 1, 0)


def test_kinds_do_not_mix_and_keys_matter() -> None:
    cursor = encode_delta_cursor(KEY, DeltaCursor(5, 9))
    page = encode_page_token(KEY, PageToken(5, 1, 2, 3))
    with pytest.raises(MalformedCursor):
        decode_page_token(KEY, cursor, 5, 1)
    with pytest.raises(MalformedCursor):
        decode_delta_cursor(KEY, page, 5)
    with pytest.raises(MalformedCursor):
        decode_delta_cursor(b"another key", cursor, 5)


def test_out_of_range_values_are_not_encoded() -> None:
    with pytest.raises(ValueError):
        encode_delta_cursor(KEY, DeltaCursor(-1, 0))
    with pytest.raises(ValueError):
        encode_page_token(KEY, PageToken(1, 2**64, 0, 1))


@given(st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=6))
def test_fingerprint_ignores_order_and_sees_values(params: dict[str, str]) -> None:
    assert query_fingerprint(params) == query_fingerprint(dict(reversed(list(params.items()))))
    if params:
        name = next(iter(params))
        assert query_fingerprint(params) != query_fingerprint({**params, name: params[name] + "x"})
