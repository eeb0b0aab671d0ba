"""The MIME corpus (``cases.yaml`` beside the ``.eml`` files) and the two readers compared on it:
flightlog's :func:`libs.mime.parse_message` and Python's plain ``email`` package used as its
documentation shows (``policy.default``, ``get_body``, ``get_content``, ``iter_parts``, the
header registry's addresses and dates), the baseline to beat."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import yaml

from libs.mime import parse_message

__all__ = ["CORPUS", "Case", "Reader", "check", "load_cases", "read_ours", "read_plain_email"]

CORPUS = Path(__file__).parent
_CRLF = email.policy.default.clone(linesep="\r\n")
# What a reader gives for one message: the expected fields' names to values.
Reader = Callable[[bytes], dict[str, Any]]


@dataclass(frozen=True)
class Case:
    file: str
    category: str
    quirk: str
    expect: dict[str, Any]

    @property
    def raw(self) -> bytes:
        return (CORPUS / self.file).read_bytes()


def load_cases() -> list[Case]:
    data = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))
    return [Case(**c) for c in data["cases"]]


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


def read_ours(raw: bytes) -> dict[str, Any]:
    p = parse_message(raw)
    people = p.participants
    return {
        "subject": p.subject,
        "from": [x.as_dict() for x in people.from_],
        "to": [x.as_dict() for x in people.to],
        "cc": [x.as_dict() for x in people.cc],
        "bcc": [x.as_dict() for x in people.bcc],
        "reply_to": [x.as_dict() for x in people.reply_to],
        "date": _iso(p.date),
        "message_id": p.message_id,
        "in_reply_to": p.in_reply_to,
        "references": p.references,
        "text": p.body_text,
        "html": p.body_html,
        "attachments": [
            {"filename": a.filename, "content_type": a.content_type, "size_bytes": a.size_bytes}
            for a in p.attachments
        ],
    }


def _plain_addresses(msg: EmailMessage, name: str) -> list[dict[str, str | None]]:
    header = msg[name]
    if header is None:
        return []
    return [{"name": a.display_name or None, "email": a.addr_spec} for a in header.addresses]


def _leaves(part: EmailMessage) -> Iterator[EmailMessage]:
    """Every part that is not a container; an attached message is one part, as in a client."""
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        for child in part.iter_parts():
            yield from _leaves(child)  # type: ignore[arg-type]  # iter_parts yields EmailMessage here
    else:
        yield part


def _body(msg: EmailMessage, subtype: str) -> EmailMessage | None:
    try:
        part = msg.get_body(preferencelist=(subtype,))
    except Exception:  # a reader that raises finding the body has none
        return None
    return part if isinstance(part, EmailMessage) else None


def _attempt(fields: dict[str, Any], name: str, read: Callable[[], Any]) -> None:
    try:
        fields[name] = read()
    except Exception as exc:  # a reader that raises on a field gets that field wrong
        fields[name] = f"<raised {type(exc).__name__}>"


def read_plain_email(raw: bytes) -> dict[str, Any]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    fields: dict[str, Any] = {}
    _attempt(fields, "subject", lambda: " ".join(str(msg["subject"]).split()) if msg["subject"] else None)
    for key, header in (
        ("from", "From"),
        ("to", "To"),
        ("cc", "Cc"),
        ("bcc", "Bcc"),
        ("reply_to", "Reply-To"),
    ):
        _attempt(fields, key, lambda header=header: _plain_addresses(msg, header))  # type: ignore[misc]
    _attempt(fields, "date", lambda: _iso(msg["date"].datetime) if msg["date"] is not None else None)
    for key, header in (("message_id", "Message-ID"), ("in_reply_to", "In-Reply-To")):
        _attempt(fields, key, lambda header=header: str(msg[header]).strip() if msg[header] else None)  # type: ignore[misc]
    _attempt(fields, "references", lambda: str(msg["references"] or "").split())
    plain, html = _body(msg, "plain"), _body(msg, "html")
    _attempt(fields, "text", lambda: plain.get_content() if plain is not None else None)
    _attempt(fields, "html", lambda: html.get_content() if html is not None else None)

    def attachments() -> list[dict[str, Any]]:
        out = []
        for part in _leaves(msg):
            if part is plain or part is html:
                continue
            if part.is_multipart():  # an attached message: its own bytes, as sent (CRLF)
                inner = part.get_payload(0)
                size = len(inner.as_bytes(policy=_CRLF)) if isinstance(inner, Message) else 0
            else:
                content = part.get_payload(decode=True)  # bytes, or None for no payload
                size = len(content) if isinstance(content, bytes) else 0
            out.append(
                {"filename": part.get_filename(), "content_type": part.get_content_type(), "size_bytes": size}
            )
        return out

    _attempt(fields, "attachments", attachments)
    return fields


def check(case: Case, got: dict[str, Any]) -> list[str]:
    """What ``got`` has wrong against ``case``'s expected fields (empty when it is all right)."""
    wrong: list[str] = []
    for key, want in case.expect.items():
        if key == "text_contains":
            missing = [w for w in want if not isinstance(got["text"], str) or w not in got["text"]]
            if missing:
                wrong.append(f"text lacks {missing!r} (text: {str(got['text'])[:120]!r})")
        elif key == "text_excludes":
            present = [w for w in want if isinstance(got["text"], str) and w in got["text"]]
            if present:
                wrong.append(f"text has {present!r}")
        elif key == "html_contains":
            missing = [w for w in want if not isinstance(got["html"], str) or w not in got["html"]]
            if missing:
                wrong.append(f"html lacks {missing!r}")
        elif key == "attachments":
            have = got["attachments"]
            if not isinstance(have, list) or len(have) != len(want):
                wrong.append(f"attachments {have!r}, want {want!r}")
                continue
            for h, w in zip(have, want, strict=True):
                if any(h.get(k) != v for k, v in w.items()):
                    wrong.append(f"attachment {h!r}, want {w!r}")
        elif got.get(key) != want:
            wrong.append(f"{key} {got.get(key)!r}, want {want!r}")
    return wrong
