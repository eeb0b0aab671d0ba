"""Address lists (RFC 5322 section 3.4 with the obsolete forms real mail has) as
``(display name, address)`` pairs, without ever inventing an address.

One left-to-right scan over at most :data:`MAX_ADDRESS_HEADER_CHARS`: quoted strings, nested
comments and domain literals are skipped by index, never by a backtracking regex. An address is
reported only when the text holds a whole ``local@domain`` with nothing but dots between the
words of each side; source routes (``<@relay:user@host>``) are dropped, groups are opened and
closed, a quoted local part is kept quoted only when it needs to be, and encoded words are
decoded after the list is split, so a comma inside one (``=?utf-8?q?Doe=2C_John?=``) stays in the
name. Entries without an address (``Doe, John <j@x>`` unquoted gives "Doe" alone) are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from libs.mime.headers import decode_words

__all__ = ["MAX_ADDRESSES", "MAX_ADDRESS_CHARS", "MAX_ADDRESS_HEADER_CHARS", "Participant", "parse_addresses"]

MAX_ADDRESSES: Final = 100
MAX_ADDRESS_HEADER_CHARS: Final = 64 * 1024
MAX_ADDRESS_CHARS: Final = 320
MAX_NAME_CHARS: Final = 256
_ATOM: Final = re.compile(r'[^\s()<>@,;:\\".\[\]]+')
# A domain literal as mail carries them ([192.0.2.1], [IPv6:2001:db8::1]): closed, and without
# the characters that would make "a@[@b" or "a@[x y" look like an address.
_DOMAIN_LITERAL: Final = re.compile(r"\[[^\[\]\\@\s]*\]")
_ATEXT: Final = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+"
# Each repetition starts with a "." that atext excludes: no two ways to match, no backtracking.
_DOT_ATOM: Final = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")


@dataclass(frozen=True, slots=True)
class Participant:
    """One mailbox: its display name (None when it has none) and its address."""

    name: str | None
    email: str

    def as_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "email": self.email}


# Token kinds: "atom", "quoted" (its content, unescaped), "comment" (its content), "literal"
# (a domain literal with its brackets), or the special character itself.
_Token = tuple[str, str, bool]  # kind, text, white space (or a comment) before it


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    pos, end = 0, len(text)
    space = False
    while pos < end:
        ch = text[pos]
        if ch.isspace():  # what the atom class's \s excludes
            space = True
            pos += 1
        elif ch == '"':
            chars: list[str] = []
            pos += 1
            while pos < end and text[pos] != '"':
                if text[pos] == "\\" and pos + 1 < end:
                    pos += 1
                chars.append(text[pos])
                pos += 1
            out.append(("quoted", "".join(chars), space))
            space = False
            pos += 1
        elif ch == "(":
            depth, start = 1, pos + 1
            pos += 1
            while pos < end and depth:
                c = text[pos]
                if c == "\\":
                    pos += 1
                elif c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                pos += 1
            out.append(("comment", text[start : pos - 1 if not depth else pos], space))
            space = True
        elif ch == "[":
            close = text.find("]", pos)
            close = end - 1 if close < 0 else close
            out.append(("literal", text[pos : close + 1], space))
            space = False
            pos = close + 1
        elif ch in "<>@,;:.\\)]":  # a stray ")" or "]" is a special too, never part of an atom
            out.append((ch, ch, space))
            space = False
            pos += 1
        else:
            match = _ATOM.match(text, pos)
            assert match is not None  # ch is none of the characters the class excludes
            out.append(("atom", match[0], space))
            space = False
            pos = match.end()
    return out


def _local(token: _Token) -> str:
    kind, text, _ = token
    if kind == "quoted" and _DOT_ATOM.fullmatch(text) is None:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _addr_spec(tokens: list[_Token]) -> tuple[str | None, int]:
    """The address in ``tokens`` (comments already removed) and where it starts: the last run of
    words joined by dots, an ``@``, then a domain, with no white space inside the local part."""
    at = next((i for i in range(len(tokens) - 1, -1, -1) if tokens[i][0] == "@"), -1)
    if at <= 0 or at == len(tokens) - 1:
        return None, len(tokens)
    domain = tokens[at + 1 :]
    if domain[0][0] == "literal" and len(domain) == 1:
        domain_text = domain[0][1]
        if not _DOMAIN_LITERAL.fullmatch(domain_text):
            return None, len(tokens)
    else:
        parts = [t for t in domain if t[0] != "."]
        if not parts or any(t[0] != "atom" for t in parts) or any(t[2] for t in domain[1:]):
            return None, len(tokens)
        if [t[0] for t in domain] != ["atom", *(k for _ in parts[1:] for k in (".", "atom"))]:
            return None, len(tokens)
        domain_text = ".".join(t[1] for t in parts)
    start = at - 1
    if tokens[start][0] not in ("atom", "quoted"):
        return None, len(tokens)
    # Back over "word . word . " without white space (obsolete "john..doe" kept as written).
    # Words alternate with dots: 'a"b"@c' is the word "b" after a stray one, not an address "ab".
    while start > 0 and not tokens[start][2]:
        before = tokens[start - 1][0]
        if before != "." and not (before in ("atom", "quoted") and tokens[start][0] == "."):
            break
        start -= 1
    while tokens[start][0] == ".":
        start += 1
    if not any(t[1] for t in tokens[start:at] if t[0] != "."):
        return None, len(tokens)  # an empty local part ('""@example.com') addresses nobody
    local = "".join(_local(t) for t in tokens[start:at])
    address = f"{local}@{domain_text}"
    if len(address) > MAX_ADDRESS_CHARS:
        return None, len(tokens)
    return address, start


def _phrase(tokens: list[_Token], warnings: list[str] | None) -> str | None:
    words: list[str] = []
    for kind, text, space in tokens:
        if kind == "comment":
            continue
        if words and space:
            words.append(" ")
        words.append(text)
    name = decode_words("".join(words), warnings)[:MAX_NAME_CHARS]
    return name or None


def _mailbox(entry: list[_Token], warnings: list[str] | None) -> Participant | None:
    opener = next((i for i, t in enumerate(entry) if t[0] == "<"), -1)
    if opener >= 0:
        closer = next((i for i in range(opener + 1, len(entry)) if entry[i][0] == ">"), len(entry))
        inside = [t for t in entry[opener + 1 : closer] if t[0] != "comment"]
        route_end = max((i for i, t in enumerate(inside) if t[0] == ":"), default=-1)
        inside = inside[route_end + 1 :]  # "@relay1,@relay2:" source route
        if inside:
            inside = [(inside[0][0], inside[0][1], False), *inside[1:]]
        address, start = _addr_spec(inside)
        if address is None or start != 0:
            return None
        name = _phrase(entry[:opener], warnings)
        if name is None:
            name = _comment_name(entry[closer + 1 :], warnings)
        return Participant(name, address)
    words = [t for t in entry if t[0] != "comment"]
    if words:
        words = [(words[0][0], words[0][1], False), *words[1:]]
    address, start = _addr_spec(words)
    if address is None or any(t[0] == "@" for t in words[:start]):
        return None  # "a@b@c": which one is the address is a guess
    name = _phrase(words[:start], warnings) or _comment_name(entry, warnings)
    return Participant(name, address)


def _comment_name(tokens: list[_Token], warnings: list[str] | None) -> str | None:
    comments = [t[1] for t in tokens if t[0] == "comment" and t[1].strip()]
    if not comments:
        return None
    return decode_words(comments[-1], warnings)[:MAX_NAME_CHARS] or None


def parse_addresses(values: list[str], warnings: list[str] | None = None) -> list[Participant]:
    """The mailboxes of address header ``values`` (each a whole field value), at most
    :data:`MAX_ADDRESSES`."""
    out: list[Participant] = []
    for value in values:
        tokens = _tokens(value[:MAX_ADDRESS_HEADER_CHARS])
        entry: list[_Token] = []
        in_angle = False
        addressed = False  # the entry has an "@" or a "<": a ":" in it is no group's
        for token in [*tokens, (",", ",", False)]:
            kind = token[0]
            if kind == "<":
                in_angle = addressed = True
            elif kind == ">":
                in_angle = False
            elif kind == "@":
                addressed = True
            elif not in_angle and kind == ":" and not addressed:
                entry = []  # "Group name:" opens a group; its members follow
                continue
            if not in_angle and kind in (",", ";"):
                addressed = False
                if entry:
                    mailbox = _mailbox(entry, warnings)
                    if mailbox is not None:
                        out.append(mailbox)
                        if len(out) >= MAX_ADDRESSES:
                            return out
                entry = []
                continue
            entry.append(token)
    return out
