"""MIME to message: a pure parser that turns an RFC 5322 message into the fields flightlog stores.

:func:`parse_message` never raises on bad input: broken MIME, unknown charsets, undecodable
headers and bad transfer encodings yield whatever can be read plus a ``parse_warnings`` entry.

Oversized messages (the documented rule): only the first ``max_bytes`` of a message are parsed.
A longer message is cut there, gets the warning ``truncated``, keeps its true ``size_bytes`` and
every header and body part that lies wholly or partly before the cut (a part cut short keeps
what it has; attachments after the cut are not listed). IMAP sync fetches at most
:data:`MAX_RAW_BYTES` of a message for the same reason (``BODY.PEEK[]<0.N>``), so an event never
exceeds the event limit, and the true size comes from ``RFC822.SIZE``.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.header
import email.utils
import hashlib
import html
import re
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, Final

from libs.events import MAX_BODY_BYTES, MessageContent

__all__ = [
    "MAX_RAW_BYTES",
    "SNIPPET_CHARS",
    "Attachment",
    "ParsedMessage",
    "collapse_whitespace",
    "content_fields",
    "decode_header_value",
    "expand_raw_mime",
    "html_to_text",
    "merge_parsed",
    "message_id_of",
    "parse_message",
    "parse_raw_mime",
    "thread_key",
    "unparsed",
]

# base64 grows 4/3: 384 KiB of raw message is 512 KiB of raw_mime, libs.events' per-field limit.
MAX_RAW_BYTES: Final = 384 * 1024
SNIPPET_CHARS: Final = 200
MAX_ATTACHMENTS: Final = 100
MAX_ADDRESSES: Final = 100
_MSGID: Final = re.compile(rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_ANGLE: Final = re.compile(r"<[^<>\s]+>")
# A tag's name right after its "<" (or "</"): one greedy character class, nothing to backtrack.
_TAG_NAME: Final = re.compile(r"/?([A-Za-z][A-Za-z0-9-]*)")
# Elements whose content is code, not text.
_RAW_TEXT_ELEMENTS: Final = frozenset({"script", "style"})


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str | None
    content_type: str
    size_bytes: int
    content_id: str | None = None
    inline: bool = False


@dataclass(slots=True)
class ParsedMessage:
    subject: str | None = None
    sender: str | None = None
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    date: str | None = None
    message_id: str | None = None
    in_reply_to: str | None = None
    references: list[str] = field(default_factory=list)
    thread_key: str | None = None
    body_text: str | None = None
    body_html: str | None = None
    snippet: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    size_bytes: int = 0
    parse_warnings: list[str] = field(default_factory=list)


def _warn(parsed: ParsedMessage, warning: str) -> None:
    if warning not in parsed.parse_warnings and len(parsed.parse_warnings) < 20:
        parsed.parse_warnings.append(warning)


def decode_header_value(value: Any, warnings: list[str] | None = None) -> str:
    """RFC 2047 words in any charset Python knows; an unknown charset or bad bytes decode as
    latin-1 (never fails) and leave a warning."""
    if value is None:
        return ""
    text = str(value)
    if text.isascii() and "=?" not in text:
        return " ".join(text.split())  # no encoded word: what the full decode would give, faster
    try:
        chunks = email.header.decode_header(text)
    except Exception:
        if warnings is not None:
            warnings.append("bad_encoded_word")
        return " ".join(text.split())
    try:
        decoded = str(email.header.make_header(chunks))
    except (LookupError, UnicodeDecodeError):
        if warnings is not None:
            warnings.append("bad_header_charset")
        decoded = "".join(
            c if isinstance(c, str) else c.decode("utf-8" if cs is None else "latin-1", errors="replace")
            for c, cs in chunks
        )
    return " ".join(decoded.split())


def _addresses(msg: Message, name: str, warnings: list[str]) -> list[str]:
    raw = msg.get_all(name) or []
    try:
        pairs = email.utils.getaddresses([decode_header_value(v, warnings) for v in raw])
    except Exception:
        warnings.append(f"bad_address_{name.lower()}")
        return []
    out = []
    for _display, addr in pairs:
        addr = addr.strip()
        if not addr or "@" not in addr or len(addr) > 320:
            continue
        out.append(addr)
        if len(out) >= MAX_ADDRESSES:
            break
    return out


def _msgids(value: str | None) -> list[str]:
    return _ANGLE.findall(value or "")


def thread_key(message_id: str | None, references: list[str], in_reply_to: str | None) -> str | None:
    """The root of the conversation: the first References id, else In-Reply-To, else the message
    itself. Hashed so it is short and uniform (the gateway groups by equality only)."""
    root = references[0] if references else in_reply_to or message_id
    if root is None:
        return None
    return hashlib.sha256(root.strip().lower().encode()).hexdigest()[:32]


def message_id_of(raw: bytes) -> str | None:
    """The Message-ID of a raw message (or of its header block), without a full parse."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    match = _MSGID.search(head)
    if match is None:
        return None
    ids = _msgids(match[1].decode("latin-1"))
    return ids[0] if ids else None


def _decode_part(part: Message, parsed: ParsedMessage) -> str | None:
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        _warn(parsed, "bad_transfer_encoding")
        return None
    if not isinstance(payload, bytes):
        return None
    if part.defects:
        _warn(parsed, "bad_transfer_encoding")
    charset = part.get_content_charset() or "us-ascii"
    try:
        return payload.decode(charset)
    except LookupError:
        _warn(parsed, "unknown_charset")
    except UnicodeDecodeError:
        _warn(parsed, "bad_body_charset")
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload.decode("latin-1")


def html_to_text(body: str) -> str:
    """Readable text of an HTML body: tags, comments, scripts and styles out, entities decoded.

    One forward scan in which every search starts where the last one ended, so any input costs
    linear time: no backtracking regex (``<script `` repeated made the old one quadratic) and no
    tree whose depth the sender chooses (a DOM parser took 14 s on 100,000 nested ``<div>``).
    A ``<`` that starts no tag is text; an unclosed tag, comment or script ends the text.
    """
    out: list[str] = []
    pos, end = 0, len(body)
    while pos < end:
        lt = body.find("<", pos)
        if lt < 0:
            out.append(body[pos:])
            break
        out.append(body[pos:lt])
        if body.startswith("<!--", lt):
            close = body.find("-->", lt + 4)
            pos = end if close < 0 else close + 3
            out.append(" ")
            continue
        if lt == end - 1:
            break  # a tag cut short at its "<" (a snippet's cut), not text
        name = _TAG_NAME.match(body, lt + 1)
        if name is None and not body.startswith(("<!", "<?"), lt):
            out.append("<")  # "a < b": text
            pos = lt + 1
            continue
        gt = body.find(">", lt + 1)
        if gt < 0:
            break
        pos = gt + 1
        out.append(" ")
        if name is not None and not name[0].startswith("/") and name[1].lower() in _RAW_TEXT_ELEMENTS:
            pos = _end_of_raw_text(body, pos, name[1].lower())
    return html.unescape("".join(out))


def _end_of_raw_text(body: str, pos: int, tag: str) -> int:
    """Where the text after a ``</tag ...>`` starts (the end of ``body`` if it is never closed)."""
    while True:
        close = body.find("</", pos)
        if close < 0:
            return len(body)
        pos = close + 2
        if body[pos : pos + len(tag)].lower() == tag:
            gt = body.find(">", pos)
            return len(body) if gt < 0 else gt + 1


def _walk(msg: Message, parsed: ParsedMessage) -> None:
    texts: list[str] = []
    htmls: list[str] = []
    for part in msg.walk():
        if part.is_multipart():
            if part.defects:
                _warn(parsed, "bad_multipart")
            continue
        try:
            ctype = part.get_content_type()
        except Exception:
            ctype = "application/octet-stream"
            _warn(parsed, "bad_content_type")
        disposition = (part.get_content_disposition() or "").lower()
        try:
            filename = part.get_filename()
        except Exception:
            filename = None
            _warn(parsed, "bad_filename")
        if filename is not None:
            filename_warnings: list[str] = []
            filename = decode_header_value(filename, filename_warnings)[:255]
            for w in filename_warnings:
                _warn(parsed, w)
        is_attachment = (
            disposition == "attachment" or filename is not None or ctype not in ("text/plain", "text/html")
        )
        if not is_attachment:
            body = _decode_part(part, parsed)
            if body is not None:
                (texts if ctype == "text/plain" else htmls).append(body)
            continue
        try:
            payload = part.get_payload(decode=True)
            size = len(payload) if isinstance(payload, bytes) else 0
        except Exception:
            size = 0
            _warn(parsed, "bad_transfer_encoding")
        cid = part.get("Content-ID")
        if len(parsed.attachments) < MAX_ATTACHMENTS:
            parsed.attachments.append(
                Attachment(
                    filename=filename,
                    content_type=ctype[:255],
                    size_bytes=size,
                    content_id=cid.strip().strip("<>")[:255] if isinstance(cid, str) else None,
                    inline=disposition == "inline",
                )
            )
    if texts:
        parsed.body_text = "\n".join(texts)
    if htmls:
        parsed.body_html = "\n".join(htmls)


def parse_message(
    raw: bytes, *, max_bytes: int = MAX_RAW_BYTES, size_bytes: int | None = None
) -> ParsedMessage:
    """Parse ``raw`` (an RFC 5322 message); see the module docstring for the oversized rule.

    :param size_bytes: the message's true size when ``raw`` is already a cut (IMAP partial fetch).
    """
    parsed = ParsedMessage(size_bytes=size_bytes if size_bytes is not None else len(raw))
    if len(raw) > max_bytes:
        raw = raw[:max_bytes]
        _warn(parsed, "truncated")
    elif size_bytes is not None and size_bytes > len(raw):
        _warn(parsed, "truncated")
    try:
        msg = email.message_from_bytes(raw)
    except Exception:  # the stdlib parser is lenient; this is the last line of defence
        _warn(parsed, "unparseable")
        parsed.body_text = raw.decode("utf-8", errors="replace")
        parsed.snippet = _snippet(parsed.body_text)
        return parsed
    warnings: list[str] = []
    if msg.defects:
        _warn(parsed, "header_defects")
    subject = msg.get("Subject")
    parsed.subject = decode_header_value(subject, warnings)[:998] if subject is not None else None
    senders = _addresses(msg, "From", warnings)
    parsed.sender = senders[0] if senders else None
    parsed.to = _addresses(msg, "To", warnings)
    parsed.cc = _addresses(msg, "Cc", warnings)
    date = msg.get("Date")
    parsed.date = str(date) if date is not None else None
    ids = _msgids(str(msg.get("Message-ID", "")))
    parsed.message_id = ids[0] if ids else None
    reply = _msgids(str(msg.get("In-Reply-To", "")))
    parsed.in_reply_to = reply[0] if reply else None
    parsed.references = _msgids(" ".join(str(v) for v in msg.get_all("References") or []))[:100]
    parsed.thread_key = thread_key(parsed.message_id, parsed.references, parsed.in_reply_to)
    for w in warnings:
        _warn(parsed, w)
    try:
        _walk(msg, parsed)
    except Exception:
        _warn(parsed, "bad_structure")
    text = (
        parsed.body_text
        if parsed.body_text is not None
        else (html_to_text(parsed.body_html) if parsed.body_html is not None else None)
    )
    parsed.snippet = _snippet(text)
    return parsed


def collapse_whitespace(text: str, max_chars: int) -> str:
    """``" ".join(text.split())[:max_chars]``, reading only as much of a long text as it needs."""
    window = 4 * max_chars + 64
    while True:
        head = text[:window]
        # The collapsed head is a prefix of the collapsed text (its last word may be cut short).
        collapsed = " ".join(head.split())
        if len(collapsed) > max_chars or len(head) == len(text):
            return collapsed[:max_chars]
        window *= 4


def _snippet(text: str | None) -> str | None:
    if text is None:
        return None
    return collapse_whitespace(text, SNIPPET_CHARS) or None


def content_fields(parsed: ParsedMessage, *, max_body_bytes: int = 512 * 1024) -> dict[str, Any]:
    """The ``libs.events.MessageContent`` fields of a parsed message (by field name, not alias).

    Bodies longer than ``max_body_bytes`` are cut at a character boundary below the limit.
    """

    def bounded(value: str | None) -> str | None:
        if value is None:
            return None
        data = value.encode()
        if len(data) <= max_body_bytes:
            return value
        return data[:max_body_bytes].decode("utf-8", errors="ignore")

    return {
        "channel": "email",
        "sender": parsed.sender,
        "to": parsed.to or None,
        "cc": parsed.cc or None,
        "subject": parsed.subject,
        "body_text": bounded(parsed.body_text),
        "body_html": bounded(parsed.body_html),
        "thread_key": parsed.thread_key,
        "size_bytes": parsed.size_bytes,
        "attachments": [
            {"filename": a.filename, "content_type": a.content_type, "size_bytes": a.size_bytes,
             "content_id": a.content_id, "inline": a.inline}
            for a in parsed.attachments
        ] or None,
        "parse_warnings": parsed.parse_warnings or None,
    }  # fmt: skip


def parse_raw_mime(
    raw_mime: str, size_bytes: int | None, *, max_bytes: int = MAX_RAW_BYTES
) -> dict[str, Any]:
    """The :func:`content_fields` of a base64 ``raw_mime``; bad base64 gives a parse warning.

    Takes and returns plain values, so it can run in another process (transform's parse pool).
    """
    try:
        raw = base64.b64decode(raw_mime, validate=True)
        parsed = parse_message(raw, max_bytes=max_bytes, size_bytes=size_bytes)
    except (binascii.Error, ValueError):
        parsed = ParsedMessage(parse_warnings=["bad_base64"])
    return content_fields(parsed, max_body_bytes=MAX_BODY_BYTES)


def merge_parsed(content: MessageContent, fields: dict[str, Any]) -> MessageContent:
    """``content`` with parsed ``fields`` filled in and ``raw_mime`` dropped (so the transform's
    state stays small). Fields the event already carries win over parsed ones."""
    given = content.model_dump(exclude_none=True, exclude={"raw_mime"})
    merged = {k: v for k, v in fields.items() if v is not None} | given
    return MessageContent.model_validate(merged)


def unparsed(content: MessageContent, warning: str) -> MessageContent:
    """``content`` without its ``raw_mime``, which could not be parsed (``warning`` says why)."""
    return merge_parsed(content, {"size_bytes": content.size_bytes, "parse_warnings": [warning]})


def expand_raw_mime(content: MessageContent, *, max_bytes: int = MAX_RAW_BYTES) -> MessageContent:
    """``content`` with its ``raw_mime`` parsed into the message fields; never raises on bad MIME."""
    if content.raw_mime is None:
        return content
    return merge_parsed(content, parse_raw_mime(content.raw_mime, content.size_bytes, max_bytes=max_bytes))
