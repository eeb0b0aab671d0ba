"""libs.mime's message fields: participants with names, the Date in UTC, threading ids, headers on
request, attachment digests, RFC 2231 parameters, and the charset rules of libs.mime.charsets."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.mime import MAX_LISTED_HEADERS, MAX_REFERENCES, Participant, parse_date, parse_message
from libs.mime.addresses import parse_addresses
from libs.mime.charsets import DetectionBudget, codec_for, decode_bytes
from libs.mime.structure import parse_params

MESSAGE = (
    b'From: =?utf-8?q?J=C3=BCrgen?= <j@example.de>\r\nTo: a@example.org, "B, Bee" <b@example.org>\r\n'
    b"Cc: Team:c@example.org;\r\nBcc: d@example.org (Dee)\r\nReply-To: <@relay:r@example.org>\r\n"
    b"Date: Tue, 05 Mar 2024 09:15:00 +0100\r\nMessage-ID: <m@example.org>\r\n"
    b"X-Raw: Gr\xc3\xbc\xc3\x9fe =?utf-8?q?left_as_sent?=\r\n"
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Disposition: attachment; filename*=utf-8''%E2%82%AC.bin\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\naGVsbG8gd29ybGQ=\r\n--b--\r\n"
)


def test_participants_date_ids_and_digests() -> None:
    p = parse_message(MESSAGE)
    people = p.participants
    assert people.from_ == (Participant("Jürgen", "j@example.de"),)
    assert people.to == (Participant(None, "a@example.org"), Participant("B, Bee", "b@example.org"))
    assert people.cc == (Participant(None, "c@example.org"),)
    assert people.bcc == (Participant("Dee", "d@example.org"),)
    assert people.reply_to == (Participant(None, "r@example.org"),)
    assert people.to[1].as_dict() == {"name": "B, Bee", "email": "b@example.org"}
    assert (p.sender, p.to, p.cc, p.bcc, p.reply_to) == (
        "j@example.de",
        ["a@example.org", "b@example.org"],
        ["c@example.org"],
        ["d@example.org"],
        ["r@example.org"],
    )
    assert p.date == datetime(2024, 3, 5, 8, 15, tzinfo=UTC)
    assert p.message_id == "<m@example.org>"
    [attachment] = p.attachments
    assert attachment.filename == "€.bin" and attachment.size_bytes == 11
    assert attachment.sha256 == hashlib.sha256(b"hello world").hexdigest()
    assert p.headers is None and p.parse_warnings == []


def test_headers_on_request_are_raw_and_bounded() -> None:
    p = parse_message(MESSAGE, with_headers=True)
    assert p.headers is not None
    assert ("X-Raw", "Grüße =?utf-8?q?left_as_sent?=") in p.headers
    assert [k for k, _ in p.headers][:2] == ["From", "To"]
    many = b"".join(b"X-N: %d\r\n" % i for i in range(MAX_LISTED_HEADERS + 50)) + b"\r\nbody"
    listed = parse_message(many, with_headers=True).headers
    assert listed is not None and len(listed) == MAX_LISTED_HEADERS


@pytest.mark.parametrize(
    ("value", "iso"),
    [
        ("Tue, 05 Mar 2024 09:15:00 +0100", "2024-03-05T08:15:00+00:00"),
        ("5 Mar 2024 09:15 PST", "2024-03-05T17:15:00+00:00"),
        ("Tue, 5 Mar 24 09:15:00 GMT", "2024-03-05T09:15:00+00:00"),
        ("Tue, 05 Mar 2024 09:15:00", "2024-03-05T09:15:00+00:00"),  # no zone: taken as UTC
        ("2024-03-05 09:15:00+02:00", "2024-03-05T07:15:00+00:00"),
    ],
)
def test_dates(value: str, iso: str) -> None:
    moment = parse_date(value)
    assert moment is not None and moment.isoformat() == iso and moment.tzinfo is UTC


@pytest.mark.parametrize(
    "value", ["never", "Tue, 31 Feb 2024 09:15:00 +0000", "Tue, 5 Mar 2024 09:15 +9999", "1e999"]
)
def test_bad_dates_are_none_and_warned(value: str) -> None:
    warnings: list[str] = []
    assert parse_date(value, warnings) is None and warnings == ["bad_date"]
    assert parse_message(f"Date: {value}\r\n\r\nx".encode()).parse_warnings == ["bad_date"]


def test_a_missing_date_is_none_without_a_warning() -> None:
    p = parse_message(b"Subject: x\r\n\r\ny")
    assert p.date is None and p.parse_warnings == []


def test_references_keep_the_root_and_the_latest() -> None:
    ids = " ".join(f"<r{i}@x>" for i in range(MAX_REFERENCES + 50))
    p = parse_message(f"References: {ids}\r\n\r\nx".encode())
    assert len(p.references) == MAX_REFERENCES
    assert p.references[0] == "<r0@x>" and p.references[-1] == f"<r{MAX_REFERENCES + 49}@x>"


@pytest.mark.parametrize(
    ("value", "params"),
    [
        ('attachment; filename="a;b.pdf"', {"filename": "a;b.pdf"}),
        (r'attachment; filename="say \"hi\".txt"', {"filename": 'say "hi".txt'}),
        ("attachment; filename=my file.pdf; size=3", {"filename": "my file.pdf", "size": "3"}),
        ("attachment; filename*=iso-8859-1'de'Gr%FC%DFe.txt", {"filename": "Grüße.txt"}),
        ("attachment; filename*0*=utf-8''%E2%82; filename*1*=%AC.txt", {"filename": "€.txt"}),
        ('attachment; filename*1="b"; filename*0="a"; filename="x"', {"filename": "ab"}),
        ("attachment; junk; ; filename=ok", {"filename": "ok"}),
        ("attachment; filename*=utf-8''100%", {"filename": "100%"}),
    ],
)
def test_parameters(value: str, params: dict[str, str]) -> None:
    assert parse_params(value) == ("attachment", params)


@pytest.mark.parametrize(
    ("label", "codec"),
    [
        ("GB2312", "gb18030"), ("gbk", "gb18030"), ("Shift_JIS", "cp932"), ("ks_c_5601-1987", "cp949"),
        ("euc-kr", "cp949"), ("ISO-8859-1", "cp1252"), ("us-ascii", "cp1252"), ("big5", "big5hkscs"),
        ('"utf-8"', "utf-8"), ("utf-8;", "utf-8"), ("utf-8*en", "utf-8"), ("koi8-r", "koi8-r"),
        ("no-such-charset", None), ("base64", None), ("zlib", None), ("unicode_escape", None), (None, ""),
    ],
)  # fmt: skip
def test_charset_labels(label: str | None, codec: str | None) -> None:
    assert codec_for(label) == codec


def test_detection_only_when_the_declared_charset_fails_and_within_the_budget() -> None:
    cyrillic = ("Привет, как дела? Это тестовое сообщение, написанное по-русски. " * 4).encode("cp1251")
    warnings: list[str] = []
    assert decode_bytes(cyrillic, "utf-8", warnings, budget=DetectionBudget()).startswith("Привет")
    assert warnings == ["charset_mismatch"]
    # Without a budget nothing is detected: the bytes are read as windows-1252, never lost.
    assert decode_bytes(cyrillic, "utf-8") == cyrillic.decode("cp1252")
    spent = DetectionBudget(100)
    decode_bytes(cyrillic, "utf-8", budget=spent)
    assert spent.bytes_left == 0


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300),
    st.sampled_from([None, "utf-8", "gb2312", "shift_jis", "iso-2022-jp", "x-bad", "utf-7"]),
)
def test_decode_bytes_never_raises(data: bytes, label: str | None) -> None:
    assert isinstance(decode_bytes(data, label, [], budget=DetectionBudget()), str)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([*'ab.@<>,;:"\\()[] \t', "=?utf-8?q?x?=", "é"]), max_size=60).map("".join))
def test_addresses_are_never_invented(text: str) -> None:
    """Every address found is in the text: its domain as written, its local part as written
    (quotes and escapes aside: 'a."b"@c' is a.b@c), neither of them empty."""

    def plain(value: str) -> str:
        return value.replace('"', "").replace("\\", "")

    for participant in parse_addresses([text]):
        local, _, domain = participant.email.rpartition("@")
        assert local and domain and domain in text
        assert plain(local) in plain(text)


@pytest.mark.parametrize(
    "text",
    ['""@example.com', 'a"b"@example.com', "a@[@example.com", "a@ [192.0.2.1", "a@[192.0.2.1 x]"],
)
def test_what_only_looks_like_an_address_is_not_one(text: str) -> None:
    """An empty local part, two words without a dot, a domain literal unclosed or with "@" or
    white space inside (what the fuzz above found) address nobody."""
    found = [p.email for p in parse_addresses([text])]
    assert found in ([], ["b@example.com"]), found


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=3))
def test_addresses_never_raise_on_any_text(values: list[str]) -> None:
    assert all("@" in p.email for p in parse_addresses(values))
