"""MIME to message: a pure parser that turns an RFC 5322 message into the fields flightlog stores.

:func:`parse_message` never raises on bad input: broken MIME, unknown charsets, undecodable
headers and bad transfer encodings yield whatever can be read plus a ``parse_warnings`` entry.

Oversized messages (the documented rule): only the first ``max_bytes`` of a message are parsed.
A longer message is cut there, gets the warning ``truncated``, keeps its true ``size_bytes`` and
every header and body part that lies wholly or partly before the cut (a part cut short keeps
what it has; attachments after the cut are not listed). IMAP sync fetches at most
:data:`MAX_RAW_BYTES` of a message for the same reason (``BODY.PEEK[]<0.N>``), so an event never
exceeds the event limit, and the true size comes from ``RFC822.SIZE``.

The parts: :mod:`libs.mime.structure` finds the header blocks and body parts in the raw bytes,
:mod:`libs.mime.charsets` turns bytes into text as mail clients do, :mod:`libs.mime.headers`
decodes RFC 2047 words, :mod:`libs.mime.addresses` reads address lists; this module picks the
bodies and attachments and fills :class:`ParsedMessage`. ``tests/mime_corpus`` holds the
real-world quirks it is tested on.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import html
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

from libs.events import MAX_BODY_BYTES, MAX_MESSAGE_ID_CHARS, STORABLE_MAX, STORABLE_MIN, MessageContent
from libs.mime.addresses import MAX_ADDRESSES, Participant, parse_addresses
from libs.mime.charsets import DetectionBudget, decode_bytes
from libs.mime.headers import decode_words
from libs.mime.structure import Entity, decode_transfer, parse_entity, parse_params

__all__ = [
    "MAX_ADDRESSES",
    "MAX_HEADER_NAME_CHARS",
    "MAX_HEADER_VALUE_CHARS",
    "MAX_LISTED_HEADERS",
    "MAX_RAW_BYTES",
    "MAX_REFERENCES",
    "SNIPPET_CHARS",
    "Attachment",
    "ParsedMessage",
    "Participant",
    "Participants",
    "collapse_whitespace",
    "content_fields",
    "decode_bytes",
    "decode_header_value",
    "expand_raw_mime",
    "html_to_text",
    "merge_parsed",
    "message_id_of",
    "parse_addresses",
    "parse_date",
    "parse_message",
    "parse_raw_mime",
    "thread_key",
    "unparsed",
]

# base64 grows 4/3: 384 KiB of raw message is 512 KiB of raw_mime, libs.events' per-field limit.
MAX_RAW_BYTES: Final = 384 * 1024
SNIPPET_CHARS: Final = 200
MAX_ATTACHMENTS: Final = 100
MAX_REFERENCES: Final = 100
MAX_LISTED_HEADERS: Final = 200
MAX_HEADER_NAME_CHARS: Final = 256
MAX_HEADER_VALUE_CHARS: Final = 8 * 1024
MAX_DATE_CHARS: Final = 256
_MSGID: Final = re.compile(rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_ANGLE: Final = re.compile(r"<[^<>\s]+>")
# A tag's name right after its "<" (or "</"): one greedy character class, nothing to backtrack.
_TAG_NAME: Final = re.compile(r"/?([A-Za-z][A-Za-z0-9-]*)")
# Elements whose content is code, not text.
_RAW_TEXT_ELEMENTS: Final = frozenset({"script", "style"})
_BODY_TYPES: Final = frozenset({"text/plain", "text/html"})
_ATTACHED_MESSAGES: Final = frozenset({"message/rfc822", "message/global"})


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attachment (a forwarded message is one too). ``sha256`` is the hex digest of the
    content after its transfer encoding is undone, of the part as far as it was parsed."""

    filename: str | None
    content_type: str
    size_bytes: int
    content_id: str | None = None
    inline: bool = False
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class Participants:
    """The mailboxes of the address headers, each ``{name, email}``."""

    from_: tuple[Participant, ...] = ()
    to: tuple[Participant, ...] = ()
    cc: tuple[Participant, ...] = ()
    bcc: tuple[Participant, ...] = ()
    reply_to: tuple[Participant, ...] = ()


@dataclass(slots=True)
class ParsedMessage:
    """What :func:`parse_message` reads. ``sender``, ``to``, ``cc``, ``bcc`` and ``reply_to`` are
    bare addresses; ``participants`` has them with their display names. ``date`` is the Date
    header in UTC (None when missing or unreadable, the latter warned ``bad_date``). ``headers``
    is every header field of the message, in order, only when asked for."""

    subject: str | None = None
    sender: str | None = None
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    reply_to: list[str] = field(default_factory=list)
    participants: Participants = field(default_factory=Participants)
    date: datetime | None = None
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
    headers: list[tuple[str, str]] | None = None
    # The decoded content of each attachment, in the order of ``attachments``: only when asked for.
    attachment_contents: list[bytes] | None = None


def _warn(parsed: ParsedMessage, warning: str) -> None:
    if warning not in parsed.parse_warnings and len(parsed.parse_warnings) < 20:
        parsed.parse_warnings.append(warning)


def decode_header_value(value: Any, warnings: list[str] | None = None) -> str:
    """RFC 2047 words in any charset (see :mod:`libs.mime.headers`), white space collapsed;
    never fails: bad words stay as they are and leave a warning."""
    if value is None:
        return ""
    return decode_words(str(value), warnings)


def _msgids(value: str | None) -> list[str]:
    return _ANGLE.findall(value or "")


def _msgid(value: str | None) -> str | None:
    """The first ``<id>`` of ``value``; a bare ``id@host`` (a broken mailer's) gets its brackets."""
    ids = _msgids(value)
    if ids:
        return ids[0]
    words = (value or "").split()
    return f"<{words[0]}>" if len(words) == 1 and "@" in words[0] and "<" not in words[0] else None


def _references(values: list[str]) -> list[str]:
    """The References ids: the root and the most recent ones when there are too many."""
    ids = _msgids(" ".join(values))
    return ids if len(ids) <= MAX_REFERENCES else [ids[0], *ids[-(MAX_REFERENCES - 1) :]]


def parse_date(value: str | None, warnings: list[str] | None = None) -> datetime | None:
    """The Date header ``value`` in UTC: RFC 5322 and its obsolete forms (zone names, two-digit
    years), ISO 8601 as some mailers write it; no zone is taken as UTC. None when it is not a date
    (``bad_date`` warned)."""
    if value is None or not value.strip():
        return None
    text = " ".join(value[:MAX_DATE_CHARS].split())
    try:
        parts = email.utils.parsedate_tz(text)
        if parts is not None:
            year, month, day, hour, minute, second, *_, offset = parts
            zone = timezone(timedelta(seconds=offset or 0))
            moment = datetime(year, month, day, hour, minute, second, tzinfo=zone)
            return moment.astimezone(UTC)
        moment = datetime.fromisoformat(text)
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError, TypeError, IndexError):
        pass
    if warnings is not None:
        warnings.append("bad_date")
    return None


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


class _Bodies:
    __slots__ = ("budget", "fallback", "htmls", "texts")

    def __init__(self) -> None:
        self.budget = DetectionBudget()
        self.texts: list[str] = []
        self.htmls: list[str] = []
        self.fallback: list[Entity] = []  # text/* of unknown kinds, used when nothing else is text


def _attach(
    entity: Entity, parsed: ParsedMessage, warnings: list[str], filename: str | None, inline: bool
) -> None:
    if len(parsed.attachments) >= MAX_ATTACHMENTS:
        return
    content = decode_transfer(entity, warnings)
    cid = entity.get("Content-ID")
    parsed.attachments.append(
        Attachment(
            filename=filename,
            content_type=entity.content_type[:255],
            size_bytes=len(content),
            content_id=(cid.strip().strip("<>")[:255] or None) if cid is not None else None,
            inline=inline,
            sha256=hashlib.sha256(content).hexdigest(),
        )
    )
    if parsed.attachment_contents is not None:
        parsed.attachment_contents.append(content)


def _text_of(entity: Entity, warnings: list[str], budget: DetectionBudget) -> str:
    content = decode_transfer(entity, warnings)
    return decode_bytes(content, entity.params.get("charset"), warnings, budget=budget)


def _walk(entity: Entity, parsed: ParsedMessage, bodies: _Bodies, warnings: list[str]) -> None:
    ctype = entity.content_type
    if ctype.startswith("multipart/"):  # without children past a limit: warned, not listed
        for child in entity.children:
            _walk(child, parsed, bodies, warnings)
        return
    disposition_value = entity.get("Content-Disposition")
    disposition, dparams = parse_params(disposition_value) if disposition_value is not None else ("", {})
    disposition = disposition.lower()
    raw_name = dparams.get("filename") or entity.params.get("name")
    filename = (decode_words(raw_name, warnings)[:255] or None) if raw_name else None
    plain_part = disposition != "attachment" and filename is None
    if plain_part and ctype in _BODY_TYPES:
        text = _text_of(entity, warnings, bodies.budget)
        (bodies.texts if ctype == "text/plain" else bodies.htmls).append(text)
    elif plain_part and ctype.startswith("text/") and ctype not in _ATTACHED_MESSAGES:
        bodies.fallback.append(entity)
    else:
        _attach(entity, parsed, warnings, filename, disposition == "inline")


def _participants(headers: Entity, name: str, warnings: list[str]) -> tuple[Participant, ...]:
    return tuple(parse_addresses(headers.get_all(name), warnings))


def parse_message(
    raw: bytes, *, max_bytes: int = MAX_RAW_BYTES, size_bytes: int | None = None, with_headers: bool = False,
    with_contents: bool = False,
) -> ParsedMessage:  # fmt: skip
    """Parse ``raw`` (an RFC 5322 message); see the module docstring for the oversized rule.

    :param size_bytes: the message's true size when ``raw`` is already a cut (IMAP partial fetch).
    :param with_headers: fill ``headers`` (at most :data:`MAX_LISTED_HEADERS` fields, names and
        values cut at :data:`MAX_HEADER_NAME_CHARS` and :data:`MAX_HEADER_VALUE_CHARS`), raw 8-bit
        read as UTF-8 and encoded words left as sent.
    :param with_contents: keep each attachment's decoded content (``attachment_contents``), for
        serving one; the listing is the same either way.
    """
    parsed = ParsedMessage(size_bytes=size_bytes if size_bytes is not None else len(raw))
    if with_contents:
        parsed.attachment_contents = []
    if len(raw) > max_bytes:
        raw = raw[:max_bytes]
        _warn(parsed, "truncated")
    elif size_bytes is not None and size_bytes > len(raw):
        _warn(parsed, "truncated")
    warnings: list[str] = []
    try:
        root = parse_entity(raw, warnings=warnings)
        _read(root, parsed, warnings, with_headers)
    except Exception:  # the parser is written never to raise; this is the last line of defence
        _warn(parsed, "unparseable")
        parsed.body_text = raw.decode("utf-8", errors="replace")
    for w in warnings:
        _warn(parsed, w)
    text = (
        parsed.body_text
        if parsed.body_text is not None
        else (html_to_text(parsed.body_html) if parsed.body_html is not None else None)
    )
    parsed.snippet = _snippet(text)
    return parsed


def _read(root: Entity, parsed: ParsedMessage, warnings: list[str], with_headers: bool) -> None:
    subject = root.get("Subject")
    parsed.subject = decode_words(subject, warnings)[:998] if subject is not None else None
    participants = Participants(
        from_=_participants(root, "From", warnings),
        to=_participants(root, "To", warnings),
        cc=_participants(root, "Cc", warnings),
        bcc=_participants(root, "Bcc", warnings),
        reply_to=_participants(root, "Reply-To", warnings),
    )
    parsed.participants = participants
    parsed.sender = participants.from_[0].email if participants.from_ else None
    parsed.to = [p.email for p in participants.to]
    parsed.cc = [p.email for p in participants.cc]
    parsed.bcc = [p.email for p in participants.bcc]
    parsed.reply_to = [p.email for p in participants.reply_to]
    parsed.date = parse_date(root.get("Date"), warnings)
    parsed.message_id = _msgid(root.get("Message-ID"))
    parsed.in_reply_to = _msgid(root.get("In-Reply-To"))
    parsed.references = _references(root.get_all("References"))
    parsed.thread_key = thread_key(parsed.message_id, parsed.references, parsed.in_reply_to)
    if with_headers:
        parsed.headers = [
            (k[:MAX_HEADER_NAME_CHARS], v[:MAX_HEADER_VALUE_CHARS])
            for k, v in root.headers[:MAX_LISTED_HEADERS]
        ]
    bodies = _Bodies()
    _walk(root, parsed, bodies, warnings)
    if not bodies.texts and not bodies.htmls and bodies.fallback:
        for entity in bodies.fallback:
            bodies.texts.append(_text_of(entity, warnings, bodies.budget))
    else:
        for entity in bodies.fallback:
            _attach(entity, parsed, warnings, None, False)
    if bodies.texts:
        parsed.body_text = "\n".join(bodies.texts)
    if bodies.htmls:
        parsed.body_html = "\n".join(bodies.htmls)


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

    p = parsed.participants
    return {
        "channel": "email",
        "sender": p.from_[0].as_dict() if p.from_ else None,
        "to": [a.as_dict() for a in p.to] or None,
        "cc": [a.as_dict() for a in p.cc] or None,
        "bcc": [a.as_dict() for a in p.bcc] or None,
        "reply_to": [a.as_dict() for a in p.reply_to] or None,
        "subject": parsed.subject,
        "body_text": bounded(parsed.body_text),
        "body_html": bounded(parsed.body_html),
        "thread_key": parsed.thread_key,
        "size_bytes": parsed.size_bytes,
        "attachments": [
            {"filename": a.filename, "content_type": a.content_type, "size_bytes": a.size_bytes,
             "content_id": a.content_id, "inline": a.inline, "sha256": a.sha256}
            for a in parsed.attachments
        ] or None,
        "parse_warnings": parsed.parse_warnings or None,
        "date": _storable_date(parsed.date),
        "message_id": _storable_id(parsed.message_id),
        "in_reply_to": _storable_id(parsed.in_reply_to),
        "references": [r for r in parsed.references if len(r) <= MAX_MESSAGE_ID_CHARS] or None,
    }  # fmt: skip


def _storable_date(value: datetime | None) -> datetime | None:
    # A Date a DATETIME column cannot hold (year 0001) is no date, so the rest of the message lands.
    return value if value is not None and STORABLE_MIN <= value < STORABLE_MAX else None


def _storable_id(value: str | None) -> str | None:
    return value if value is not None and len(value) <= MAX_MESSAGE_ID_CHARS else None


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
