"""libs.http's JSON body checks: the byte-level depth check agrees with a walk of the document."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.http import MAX_JSON_DEPTH, Problem, json_too_deep, parse_json

# Strings full of the characters the check must see through: brackets, quotes and backslashes.
_TRICKY_TEXT = st.text(alphabet='[]{}"\\ab\u00e9\n/', max_size=8)
_SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | _TRICKY_TEXT
)
_DOCS = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TRICKY_TEXT, inner, max_size=4),
    max_leaves=40,
)


def depth(value: Any) -> int:
    """The reference: how many arrays and objects deep ``value`` is."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


@given(_DOCS, st.integers(min_value=0, max_value=12))
def test_depth_check_matches_a_walk_of_the_document(doc: Any, limit: int) -> None:
    raw = orjson.dumps(doc)
    assert json_too_deep(raw, limit) == (depth(doc) > limit)


@given(_DOCS, st.integers(min_value=0, max_value=12))
def test_depth_check_ignores_whitespace_and_escapes(doc: Any, limit: int) -> None:
    # The stdlib writes non-ASCII as \\u escapes and indents: other bytes, the same document.
    raw = json.dumps(doc, indent=2).encode()
    assert json_too_deep(raw, limit) == (depth(doc) > limit)


def test_objects_and_arrays_count_alike() -> None:
    assert not json_too_deep(b'{"a": {"b": [{}]}}', 4)
    assert json_too_deep(b'{"a": {"b": [{}]}}', 3)
    assert not json_too_deep(b'"[[[[[[" ', 1)  # brackets in a string are text
    assert not json_too_deep(b'["\\"[[[[", "\\\\", "]]"]', 1)


def test_parse_json_takes_the_limit_and_refuses_one_more() -> None:
    assert parse_json(nested(MAX_JSON_DEPTH)) is not None
    with pytest.raises(Problem) as exc:
        parse_json(nested(MAX_JSON_DEPTH + 1))
    assert (exc.value.status, exc.value.title) == (400, "JSON nested too deeply")


@pytest.mark.parametrize("levels", [1025, 100_000])
def test_parse_json_refuses_what_orjson_itself_refuses_as_too_deep(levels: int) -> None:
    with pytest.raises(Problem) as exc:
        parse_json(nested(levels))
    assert (exc.value.status, exc.value.title) == (400, "JSON nested too deeply")


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": }', b"{'a': 1}", b"[1,]", b"\xff", b"NaN"])
def test_parse_json_refuses_malformed_json(raw: bytes) -> None:
    with pytest.raises(Problem) as exc:
        parse_json(raw)
    assert (exc.value.status, exc.value.title) == (400, "Malformed JSON")
    assert exc.value.response().content_type == "application/problem+json"
