"""libs.mime on hostile input: every input here is large, and each would take a naive parser
quadratic time (a search restarted from the start per token, a regex that backtracks, a
detection per part) or unbounded depth. The assertions are on the output, and on the count of
the expensive operations; the size makes a quadratic parser time out instead of passing."""

from __future__ import annotations

import charset_normalizer
import pytest

from libs.mime import MAX_ADDRESSES, parse_message
from libs.mime.addresses import parse_addresses
from libs.mime.charsets import MAX_DETECT_BYTES_PER_MESSAGE
from libs.mime.headers import decode_words
from libs.mime.structure import MAX_DEPTH, MAX_PARAMS, MAX_PARTS, parse_params

N = 200_000

HOSTILE_ADDRESSES = {
    "words_then_colons": "a " * N + "@ " + ": " * N,  # a group check that rescans the entry per ":"
    "unclosed_comments": "(" * N,
    "nested_comments": "(" * 30_000 + ")" * 30_000 + "a@b.example",  # within the header limit
    "quotes": '"' * (N + 1),
    "angles": "<" * N,
    "route_colons": "<@" + ":" * N,
    "ats": "@" * N,
    "encoded_words": "=?utf-8?q?" * N,
    "dots": "a" + "." * N + "@b",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_ADDRESSES))
def test_hostile_address_lists(name: str) -> None:
    found = parse_addresses([HOSTILE_ADDRESSES[name]])
    assert [p.email for p in found] == (["a@b.example"] if name == "nested_comments" else [])


def test_an_endless_address_list_stops_at_the_limit() -> None:
    found = parse_addresses([", ".join(f"u{i}@example.org" for i in range(N))])
    assert [p.email for p in found] == [f"u{i}@example.org" for i in range(MAX_ADDRESSES)]


@pytest.mark.parametrize(
    "value",
    ["a;" * N + "filename=x", "a=" * N, 'a="' + "\\" * N, "".join(f";x*{i}*=%4{i % 10}" for i in range(N))],
)
def test_hostile_parameters(value: str) -> None:
    _, params = parse_params("attachment;" + value)
    assert len(params) <= MAX_PARAMS


@pytest.mark.parametrize("value", ["=?" * N, "=?utf-8?q?" * N, "=?utf-8?b?" + "A" * N + "?=", "?= =?" * N])
def test_hostile_encoded_words(value: str) -> None:
    assert isinstance(decode_words(value), str)


def _message(head: bytes, body: bytes) -> bytes:
    return head + b"\r\n\r\n" + body


def test_many_parts_stop_at_the_limit() -> None:
    body = b"--b\r\nContent-Type: application/x-part\r\n\r\nx\r\n" * (MAX_PARTS * 3) + b"--b--\r\n"
    raw = _message(b'Content-Type: multipart/mixed; boundary="b"', body)
    p = parse_message(raw, max_bytes=len(raw))
    assert "too_many_parts" in p.parse_warnings
    assert len(p.attachments) == 100  # libs.events' limit on what is listed


def test_deep_nesting_stops_at_the_limit() -> None:
    levels = 10_000
    open_parts = b"".join(
        b"--%d\r\nContent-Type: multipart/mixed; boundary=%d\r\n\r\n" % (i, i + 1) for i in range(levels)
    )
    raw = _message(
        b"Content-Type: multipart/mixed; boundary=0", open_parts + b"--%d\r\n\r\ndeep text\r\n" % levels
    )
    p = parse_message(raw, max_bytes=len(raw))
    assert "too_deep" in p.parse_warnings and p.body_text is None
    assert MAX_DEPTH < levels


def test_rfc822_nesting_stops_at_the_limit() -> None:
    raw = b"Content-Type: message/rfc822\r\n\r\n" * 10_000 + b"Subject: inner\r\n\r\nx"
    p = parse_message(raw, max_bytes=len(raw))
    assert [a.content_type for a in p.attachments] == ["message/rfc822"]


def test_boundary_recovery_reads_a_bounded_prefix() -> None:
    # Every line looks like a delimiter and none repeats: a scan that tried each against the rest
    # of the body would be quadratic.
    body = b"".join(b"--candidate%d\r\n" % i for i in range(N))
    p = parse_message(_message(b"Content-Type: multipart/mixed", body), max_bytes=len(body) + 100)
    assert "bad_multipart" in p.parse_warnings and "boundary_recovered" not in p.parse_warnings
    assert p.body_text is not None and p.body_text.startswith("--candidate0")


def test_delimiter_lookalikes_are_skipped_in_linear_time() -> None:
    body = b"--bX\r\n" * N + b"--b\r\n\r\nreal\r\n--b--\r\n"
    raw = _message(b"Content-Type: multipart/mixed; boundary=b", body)
    assert parse_message(raw, max_bytes=len(raw)).body_text == "real"


def test_header_floods() -> None:
    raw = b"X-A: 1\r\n" * N + b"Subject: last\r\nX-Long: " + b"\r\n a" * N + b"\r\n\r\nbody"
    p = parse_message(raw, max_bytes=len(raw), with_headers=True)
    assert "too_many_headers" in p.parse_warnings and p.body_text == "body"


def test_charset_detection_is_bounded_per_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thousand parts whose declared charset lies get at most the message's detection budget."""
    read: list[int] = []
    real = charset_normalizer.from_bytes

    def counting(data: bytes) -> object:
        read.append(len(data))
        return real(data)

    monkeypatch.setattr(charset_normalizer, "from_bytes", counting)
    lying = ("Привет, это сообщение в другой кодировке. " * 20).encode("cp1251")
    part = b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + lying + b"\r\n"
    raw = _message(b"Content-Type: multipart/mixed; boundary=b", part * 900 + b"--b--\r\n")
    p = parse_message(raw, max_bytes=len(raw))
    assert p.body_text is not None and p.body_text.startswith("Привет")
    assert sum(read) <= MAX_DETECT_BYTES_PER_MESSAGE and len(read) >= 1
