"""Poison builders for the hostile-input suite (tests/e2e/test_hostile_input.py): pure functions,
each poison no bigger than it must be to hurt, each ordinary message as small as it can be.

What the HTML poisons cost the transform's old ``html_to_text`` (``re.sub`` of
``<(script|style)\\b.*?</\\1\\s*>|<[^>]+>``, IGNORECASE | DOTALL), measured once on the 2-core test
machine: every ``<script `` (or ``<style``) starts a lazy scan to the end of the text for a closing
tag that never comes, then a ``<[^>]+>`` scan for a ``>`` that never comes, so the cost is
quadratic. The 64 KiB a posted ``body_html`` is read for its snippet: 2.6 s (``<script ``) and
3.3 s (``<style``); 128 KiB: 10.0 s and 14.4 s; a whole HTML part of 384 KiB (a raw MIME message's,
read entire for its snippet) extrapolates to 1.5-2 minutes. The old transform's whole
``libs.lifecycle.apply`` (commit 100db20) on the suite's events: 4.7 s and 4.2 s for the posted
``body_html`` poisons, still running after 20 s for each raw MIME one. ``<div>`` and ``<b>`` nested
100,000 deep cost the regex nothing (0.01 s): they are there for a parser that builds a tree (a DOM
parser took 14 s on them). The MIME structure poisons cost the stdlib parser 0.3-0.8 s (the 2,000
nested multiparts end in a RecursionError, read as ``unparseable``): hostile to a parser without
limits, and each a parse the transform's parse pool must bound.
"""

from __future__ import annotations

import base64
from typing import Final

from aiokafka.partitioner import murmur2

from cli.mailbox_gen import DOMAIN
from libs.events import MAX_BODY_BYTES
from libs.mime import MAX_RAW_BYTES

__all__ = [
    "SCRIPT_STORM",
    "STYLE_STORM",
    "encoded_word_storm",
    "fits_raw_mime",
    "html_message",
    "long_header",
    "many_parts",
    "nested_json",
    "nested_multipart",
    "ordinary_message",
    "oversize_message",
    "partition_of",
]

# The sizes. "<script " * 60_000 is 480,000 bytes: under the 512 KiB body_html limit, but a
# raw message holding it is over MAX_RAW_BYTES (IMAP sync cuts it; posted raw_mime is refused for
# size), so the raw_mime case uses the most that fits (see fits_raw_mime).
SCRIPT_STORM: Final = "<script "
STYLE_STORM: Final = "<style"


def partition_of(key: bytes, partitions: int) -> int:
    """The partition aiokafka's default partitioner gives ``key`` (Kafka's own murmur2 rule)."""
    hashed: int = murmur2(key)
    return (hashed & 0x7FFFFFFF) % partitions


def _head(message_id: str, subject: str = "hostile input") -> bytes:
    # Message-ID first: IMAP sync keys a message by it, read from the first MAX_RAW_BYTES, so a
    # header block longer than that still gives the key the test computes from the whole message.
    return (
        f"Message-ID: <{message_id}>\r\nFrom: hostile@example.org\r\nTo: user@{DOMAIN}\r\n"
        f"Subject: {subject}\r\nDate: Mon, 02 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
    ).encode()


def fits_raw_mime(raw: bytes) -> bool:
    """Whether ``raw`` can be posted as ``content.raw_mime`` (base64 within the field limit)."""
    return len(base64.b64encode(raw)) <= MAX_BODY_BYTES


def html_message(message_id: str, html: str) -> bytes:
    """A message whose only body is one HTML part (its snippet is read from the HTML)."""
    return _head(message_id) + b"Content-Type: text/html; charset=utf-8\r\n\r\n" + html.encode() + b"\r\n"


def nested_multipart(message_id: str, depth: int) -> bytes:
    """``depth`` multipart/mixed levels, each the only part of the one above, text at the bottom."""
    out = [_head(message_id)]
    out += [
        f'Content-Type: multipart/mixed; boundary="n{i}"\r\n\r\n--n{i}\r\n'.encode() for i in range(depth)
    ]
    out.append(b"Content-Type: text/plain\r\n\r\nthe bottom\r\n")
    out += [f"--n{i}--\r\n".encode() for i in reversed(range(depth))]
    return b"".join(out)


def many_parts(message_id: str, parts: int) -> bytes:
    """One multipart/mixed with ``parts`` tiny parts (about 10 bytes each)."""
    return b"".join(
        (
            _head(message_id),
            b'Content-Type: multipart/mixed; boundary="p"\r\n\r\n',
            b"--p\r\n\r\nx\r\n" * parts,
            b"--p--\r\n",
        )
    )


def long_header(message_id: str, size_bytes: int) -> bytes:
    """A Subject of ``size_bytes`` folded over 73-byte lines: one header the parser must unfold
    and decode."""
    line = "w" * 70 + "\r\n "
    subject = line * (size_bytes // len(line)) + "end"
    return _head(message_id, subject) + b"Content-Type: text/plain\r\n\r\nbody\r\n"


def encoded_word_storm(message_id: str, words: int) -> bytes:
    """A Subject of ``words`` empty RFC 2047 openers, ``=?utf-8?q?`` repeated on one line."""
    return _head(message_id, "=?utf-8?q?" * words) + b"Content-Type: text/plain\r\n\r\nbody\r\n"


def oversize_message(message_id: str) -> bytes:
    """A plain message 64 KiB over what IMAP sync fetches of one message (MAX_RAW_BYTES)."""
    line = b"x" * 76 + b"\r\n"
    body = line * ((MAX_RAW_BYTES + 64 * 1024) // len(line))
    return _head(message_id) + b"Content-Type: text/plain\r\n\r\n" + body


def ordinary_message(message_id: str, subject: str) -> bytes:
    return _head(message_id, subject) + b"Content-Type: text/plain; charset=utf-8\r\n\r\nordinary mail\r\n"


def nested_json(depth: int) -> bytes:
    """An object whose one member is ``depth`` nested arrays: far past stdlib json's recursion
    limit (about 1,000) and orjson's (1,024)."""
    return b'{"events":' + b"[" * depth + b"]" * depth + b"}"
