"""The MIME tree of a message: header blocks and body parts located in the raw bytes, without
copying them, in time linear in the message's size.

Every entity is a header block and a body span of one buffer. Multipart bodies are split on their
boundary's delimiter lines (a delimiter counts only at a line start, followed by ``--``, white
space or the line's end, so a longer inner boundary that starts with the outer one is no match).
A multipart whose boundary is missing or never occurs gets one recovered from its body: the first
line within :data:`MAX_BOUNDARY_SCAN_BYTES` that looks like a delimiter (``--`` and 1-70 boundary
characters) and occurs again as one; at most :data:`MAX_BOUNDARY_CANDIDATES` lines are tried,
each with one scan of the body. ``message/rfc822`` parts are parsed as messages of their own.

Limits: :data:`MAX_DEPTH` nested entities, :data:`MAX_PARTS` entities in all,
:data:`MAX_HEADERS` header fields per entity; what lies past a limit is not parsed and leaves a
warning.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from typing import Final

from libs.mime.charsets import decode_bytes, decode_header_bytes

__all__ = [
    "MAX_DEPTH",
    "MAX_HEADERS",
    "MAX_PARTS",
    "Entity",
    "decode_transfer",
    "parse_content_type",
    "parse_entity",
    "parse_params",
]

MAX_DEPTH: Final = 30
MAX_PARTS: Final = 1000
MAX_HEADERS: Final = 1000
MAX_BOUNDARY_SCAN_BYTES: Final = 64 * 1024
MAX_BOUNDARY_CANDIDATES: Final = 20
MAX_PARAMS: Final = 64
MAX_PARAM_SECTIONS: Final = 64
# A header field name: printable ASCII but ":" (RFC 5322 ftext); "Subject :" is accepted too.
_FIELD_NAME: Final = re.compile(rb"[!-9;-~]+[ \t]*:")
_BCHARS: Final = re.compile(rb"[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]")
_B64_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOT_B64: Final = bytes(b for b in range(256) if b not in _B64_ALPHABET)
# Text up to and with its padding: "=" cannot start a chunk, so each match ends where one must.
_PADDED_CHUNK: Final = re.compile(rb"[^=]+=*|=+")


@dataclass(slots=True)
class Entity:
    """One MIME entity: its header fields (unfolded, raw 8-bit read as UTF-8 or windows-1252) and
    its body, ``data[start:end]`` (still transfer-encoded)."""

    headers: list[tuple[str, str]]
    data: bytes
    start: int
    end: int
    content_type: str = "text/plain"
    params: dict[str, str] = field(default_factory=dict)
    children: list[Entity] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.headers if key.lower() == name]

    @property
    def body(self) -> bytes:
        return self.data[self.start : self.end]


class _Budget:
    __slots__ = ("parts", "warnings")

    def __init__(self, warnings: list[str]) -> None:
        self.parts = 0
        self.warnings = warnings

    def warn(self, warning: str) -> None:
        if warning not in self.warnings:
            self.warnings.append(warning)


def _parse_headers(data: bytes, start: int, end: int, budget: _Budget) -> tuple[list[tuple[str, str]], int]:
    """The header fields at ``start`` and where the body starts."""
    fields: list[tuple[str, list[bytes]]] = []
    pos = start
    first = True
    while pos < end:
        nl = data.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl
        next_pos = end if nl < 0 else nl + 1
        line = data[pos:line_end]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            pos = next_pos
            break
        if line[0] in b" \t":
            if fields:
                fields[-1][1].append(line)
        elif (name := _FIELD_NAME.match(line)) is not None:
            if len(fields) < MAX_HEADERS:
                fields.append((name[0][:-1].rstrip().decode("ascii"), [line[name.end() :]]))
            else:
                budget.warn("too_many_headers")
        elif first and line.startswith(b"From "):
            pass  # an mbox separator line
        else:
            budget.warn("missing_header_separator")  # the body starts here, as RFC 5322 readers do
            break
        first = False
        pos = next_pos
    headers = [(name, decode_header_bytes(b" ".join(p.strip() for p in parts))) for name, parts in fields]
    return headers, pos


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
        if "\\" in value:
            value = re.sub(r"\\(.)", r"\1", value)
    return value


def parse_params(value: str) -> tuple[str, dict[str, str]]:
    """The value before the first ``;`` and the parameters after it (names lowercased), with
    RFC 2231 continuations joined and percent-encoded values decoded in their charset."""
    head, _, rest = value.partition(";")
    raw: list[tuple[str, str]] = []
    pos, end = 0, len(rest)
    eq = semi = -1
    while pos < end and len(raw) < MAX_PARAMS:
        # Each search starts where the last one ended: "a;a;a;...;a=" stays linear.
        if eq < pos:
            eq = rest.find("=", pos)
        if semi < pos:
            semi = rest.find(";", pos)
            semi = end if semi < 0 else semi
        if eq < 0:
            break
        if semi < eq:  # "; junk ;" without a value
            pos = semi + 1
            continue
        name = rest[pos:eq].strip().lower()
        pos = eq + 1
        while pos < end and rest[pos] in " \t":
            pos += 1
        if pos < end and rest[pos] == '"':
            close = pos + 1
            while close < end and rest[close] != '"':
                close += 2 if rest[close] == "\\" else 1
            val = _unquote(rest[pos : close + 1])
            after = rest.find(";", close)
            pos = end if after < 0 else after + 1
        else:
            after = rest.find(";", pos)
            val = rest[pos : end if after < 0 else after].strip()  # Outlook's unquoted "my file.pdf"
            pos = end if after < 0 else after + 1
        if name:
            raw.append((name, val))
    return head.strip(), _join_rfc2231(raw)


def _join_rfc2231(raw: list[tuple[str, str]]) -> dict[str, str]:
    plain: dict[str, str] = {}
    sections: dict[str, dict[int, tuple[bool, str]]] = {}
    for name, value in raw:
        star = name.find("*")
        if star < 0:
            plain.setdefault(name, value)
            continue
        base, _, rest = name.partition("*")
        encoded = rest.endswith("*") or rest == ""
        number = rest.rstrip("*")
        index = int(number) if number.isdigit() and len(number) < 4 else 0
        if len(sections.setdefault(base, {})) < MAX_PARAM_SECTIONS:
            sections[base].setdefault(index, (encoded, value))
    for base, parts in sections.items():
        charset = None
        chunks: list[bytes] = []
        for i, (_, (encoded, value)) in enumerate(sorted(parts.items())):
            if encoded and i == 0 and value.count("'") >= 2:
                charset, _lang, value = value.split("'", 2)  # charset'language'value
            chunks.append(_percent_decode(value) if encoded else value.encode("utf-8", "surrogateescape"))
        plain[base] = decode_bytes(b"".join(chunks), charset or "utf-8")  # RFC 2231 wins over name=
    return plain


def _percent_decode(value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")
    if b"%" not in data:
        return data
    out = bytearray()
    pos = 0
    while True:
        pct = data.find(b"%", pos)
        if pct < 0:
            out += data[pos:]
            return bytes(out)
        out += data[pos:pct]
        try:
            out.append(int(data[pct + 1 : pct + 3], 16))
            pos = pct + 3
        except ValueError:
            out.append(0x25)
            pos = pct + 1


def parse_content_type(value: str | None, default: str = "text/plain") -> tuple[str, dict[str, str]]:
    if value is None:
        return default, {}
    ctype, params = parse_params(value)
    ctype = "".join(ctype.split()).lower()
    maintype, slash, subtype = ctype.partition("/")
    if not slash or not maintype or not subtype:
        return "text/plain", params  # RFC 2045: a syntax error means text/plain
    return ctype, params


def _delimiters(data: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int, bool]]:
    """Each delimiter line of ``boundary``: (where the CRLF before it starts, where the next part
    starts, whether it closes)."""
    delim = b"--" + boundary
    out: list[tuple[int, int, bool]] = []
    pos = start
    while pos < end:
        at = data.find(delim, pos, end)
        if at < 0:
            break
        pos = at + 1
        if at != start and data[at - 1] != 0x0A:
            continue
        after = at + len(delim)
        closing = data.startswith(b"--", after)
        tail = after + 2 if closing else after
        nl = data.find(b"\n", tail, end)
        line_end = end if nl < 0 else nl
        if data[tail:line_end].strip():
            continue  # "--boundaryX": another boundary that starts with this one
        before = at
        if before > start and data[before - 1] == 0x0A:
            before -= 1
            if before > start and data[before - 1] == 0x0D:
                before -= 1
        out.append((before, end if nl < 0 else nl + 1, closing))
        if closing:
            break
        pos = line_end
    return out


def _recover_boundary(data: bytes, start: int, end: int) -> bytes | None:
    """A delimiter-looking line of the body that occurs again (see the module docstring)."""
    scan_end = min(end, start + MAX_BOUNDARY_SCAN_BYTES)
    pos = start
    tried = 0
    while pos < scan_end and tried < MAX_BOUNDARY_CANDIDATES:
        at = data.find(b"--", pos, scan_end)
        if at < 0:
            return None
        nl = data.find(b"\n", at, end)
        line_end = end if nl < 0 else nl
        pos = line_end + 1
        if at != start and data[at - 1] != 0x0A:
            continue
        line = data[at + 2 : line_end].rstrip()
        if line.endswith(b"--"):
            line = line[:-2]
        if _BCHARS.fullmatch(line) is None:
            continue
        tried += 1
        if len(_delimiters(data, start, end, line)) >= 2:
            return line
    return None


def _b64(data: bytes, warnings: list[str]) -> bytes:
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        warnings.append("bad_transfer_encoding")
        clean = data.translate(None, _NOT_B64)
        clean = clean[: len(clean) - len(clean) % 4] if len(clean) % 4 == 1 else clean
        return binascii.a2b_base64(clean + b"=" * (-len(clean) % 4))


def decode_transfer(entity: Entity, warnings: list[str]) -> bytes:
    """The body of ``entity`` with its Content-Transfer-Encoding undone (leniently)."""
    cte = (entity.get("Content-Transfer-Encoding") or "").strip().lower()
    body = entity.body
    if cte == "base64":
        pad = body.find(b"=")
        if pad >= 0 and body[pad:].strip(b"= \t\r\n"):
            # Padding before the end: chunks encoded one by one (some mailers pad every line),
            # which a single decode would stop at the first of.
            return b"".join(_b64(chunk, warnings) for chunk in _PADDED_CHUNK.findall(body))
        return _b64(body, warnings)
    if cte == "quoted-printable":
        return binascii.a2b_qp(body)
    return body


def parse_entity(
    data: bytes,
    start: int = 0,
    end: int | None = None,
    *,
    warnings: list[str],
    default_type: str = "text/plain",
    depth: int = 0,
    budget: _Budget | None = None,
) -> Entity:
    """The MIME tree of ``data[start:end]`` (see the module docstring)."""
    end = len(data) if end is None else end
    budget = budget or _Budget(warnings)
    budget.parts += 1
    headers, body_start = _parse_headers(data, start, end, budget)
    entity = Entity(headers, data, body_start, end)
    entity.content_type, entity.params = parse_content_type(entity.get("Content-Type"), default_type)
    maintype = entity.content_type.partition("/")[0]
    if maintype == "multipart":
        if depth >= MAX_DEPTH or budget.parts >= MAX_PARTS:
            budget.warn("too_deep")
            return entity
        _split(entity, depth, budget)
    elif entity.content_type in ("message/rfc822", "message/global") and depth < MAX_DEPTH:
        inner = decode_transfer(entity, warnings)
        entity.children.append(parse_entity(inner, warnings=warnings, depth=depth + 1, budget=budget))
    return entity


def _split(entity: Entity, depth: int, budget: _Budget) -> None:
    data, start, end = entity.data, entity.start, entity.end
    boundary = entity.params.get("boundary", "").encode("utf-8", "surrogateescape")
    delimiters = _delimiters(data, start, end, boundary) if boundary else []
    if not delimiters:
        recovered = _recover_boundary(data, start, end)
        if recovered is None:
            budget.warn("bad_multipart")
            entity.content_type = "text/plain"  # its text is kept as text rather than lost
            return
        budget.warn("boundary_recovered")
        delimiters = _delimiters(data, start, end, recovered)
    elif not delimiters[-1][2]:
        budget.warn("bad_multipart")  # no close delimiter: cut short, the last part runs to the end
    child_type = "message/rfc822" if entity.content_type == "multipart/digest" else "text/plain"
    following = [*delimiters[1:], (end, end, True)]
    for (_, part_start, closing), (part_end, _, _) in zip(delimiters, following, strict=True):
        if closing:
            break
        if budget.parts >= MAX_PARTS:
            budget.warn("too_many_parts")
            break
        entity.children.append(
            parse_entity(
                data, part_start, part_end, warnings=budget.warnings,
                default_type=child_type, depth=depth + 1, budget=budget,
            )
        )  # fmt: skip
