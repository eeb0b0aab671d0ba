"""The ``messages`` table as its one writer (persist) and its readers (the gateway) both see it:
the column groups and the codec of the ``body`` column.

Both sides must agree byte for byte on how a body is stored, so the codec lives here rather than
in either service: persist encodes, the gateway decodes, and neither imports the other.
"""

from __future__ import annotations

import zlib
from typing import Final

import orjson

__all__ = [
    "BODY_RAW",
    "BODY_ZLIB",
    "COMPRESS_MIN_BYTES",
    "CONTENT_COLUMNS",
    "DETAIL_COLUMNS",
    "ERASABLE_COLUMNS",
    "FLAG_COLUMNS",
    "FLAG_FIELDS",
    "LIST_COLUMNS",
    "decode_body",
    "encode_body",
]

# Below this a zlib stream (header, checksum) rarely wins over the JSON itself.
COMPRESS_MIN_BYTES: Final = 256
BODY_RAW: Final = 0  # body_encoding: the JSON as is
BODY_ZLIB: Final = 1  # body_encoding: the JSON, zlib-compressed

# Guarded by ``version``: where the message is and what its owner did with it.
FLAG_COLUMNS: Final = (
    "status", "direction", "unread", "starred", "folder", "labels", "source", "occurred_at", "final_at",
)  # fmt: skip
# The document fields a postflight record writes by its version: the flag columns (named as the
# fields) and the erasure flag. A record without content writes only these of its document.
FLAG_FIELDS: Final = (*FLAG_COLUMNS, "redacted")
# Guarded by ``content_version``, and never blanked by a NULL (see services.persist.writer).
# ``participants`` is merged per role (migration 0012), the others are taken whole.
CONTENT_COLUMNS: Final = (
    "channel", "sender", "to_addrs", "cc_addrs", "subject", "snippet", "body", "body_encoding",
    "error_code", "attachments", "thread_key", "size_bytes", "parse_warnings",
    "participants", "sent_at", "rfc_message_id", "in_reply_to", "reference_ids",
)  # fmt: skip
# What a redaction or a deletion erases (libs.lifecycle's erasable fields, as columns).
ERASABLE_COLUMNS: Final = ("subject", "snippet", "body", "body_encoding", "attachments")

# What a page of a range query reads: everything but the body, which can be large.
LIST_COLUMNS: Final = (
    "id", "account_id", "message_key", "version", "status", "direction", "channel", "sender",
    "to_addrs", "cc_addrs", "subject", "snippet", "error_code", "unread", "starred", "folder",
    "labels", "source", "occurred_at", "final_at", "redacted", "deleted", "created_at", "updated_at",
    "thread_key", "size_bytes", "attachments", "parse_warnings", "participants", "sent_at",
    "rfc_message_id", "in_reply_to", "reference_ids",
)  # fmt: skip
# What a get by id reads: the list columns and the body.
DETAIL_COLUMNS: Final = (*LIST_COLUMNS, "body", "body_encoding")


def encode_body(text: str | None, html: str | None) -> tuple[bytes | None, int]:
    """Bodies as JSON, zlib-compressed (level 1) when that is smaller; returns (bytes, encoding)."""
    if text is None and html is None:
        return None, BODY_RAW
    raw = orjson.dumps({"text": text, "html": html})
    if len(raw) >= COMPRESS_MIN_BYTES:
        packed = zlib.compress(raw, 1)
        if len(packed) < len(raw):
            return packed, BODY_ZLIB
    return raw, BODY_RAW


def decode_body(data: bytes | None, encoding: int) -> tuple[str | None, str | None]:
    """(text, html) of a stored body; ``encoding`` is the row's ``body_encoding``."""
    if data is None:
        return None, None
    parsed = orjson.loads(zlib.decompress(data) if encoding == BODY_ZLIB else data)
    return parsed.get("text"), parsed.get("html")
