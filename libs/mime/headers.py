"""Header values as text: RFC 2047 encoded words in any charset (through
:func:`libs.mime.charsets.decode_bytes`, so a gb2312 word with GBK characters reads right), adjacent
words of one charset joined before decoding (senders split a UTF-8 character across two words),
the white space between encoded words dropped, encoded words inside quoted strings or glued to
text decoded as mail clients do."""

from __future__ import annotations

import binascii
import re
from typing import Final

from libs.mime.charsets import decode_bytes

__all__ = ["MAX_HEADER_CHARS", "decode_words"]

MAX_HEADER_CHARS: Final = 16 * 1024
# Every class stops at a character the next token needs ("?" or white space): no backtracking.
_WORD: Final = re.compile(r"=\?([^?\s]{1,64})\?([bBqQ])\?([^?\s]*)\?=")
_B64_CLEAN: Final = re.compile(r"[^A-Za-z0-9+/]")


def _b64(text: str) -> bytes:
    clean = _B64_CLEAN.sub("", text)
    if len(clean) % 4 == 1:
        clean = clean[:-1]
    return binascii.a2b_base64(clean + "=" * (-len(clean) % 4))


def decode_words(value: str, warnings: list[str] | None = None) -> str:
    """``value`` with its encoded words decoded and its white space collapsed."""
    value = value[:MAX_HEADER_CHARS]
    if "=?" not in value:
        return " ".join(value.split())
    out: list[str] = []
    pending: list[bytes] = []
    pending_charset: str | None = None
    pos = 0
    last_was_word = False

    def flush() -> None:
        nonlocal pending_charset
        if pending:
            out.append(decode_bytes(b"".join(pending), pending_charset, warnings))
            pending.clear()
        pending_charset = None

    for match in _WORD.finditer(value):
        gap = value[pos : match.start()]
        charset, encoding, text = match.groups()
        charset = charset.lower()
        if gap and (gap.strip() or not last_was_word):  # white space between two words goes
            flush()
            out.append(gap)
        if pending and charset != pending_charset:
            flush()
        try:
            if encoding in "bB":
                data = _b64(text)
            else:
                data = binascii.a2b_qp(text.encode("ascii", "replace"), header=True)
        except (binascii.Error, ValueError):
            if warnings is not None:
                warnings.append("bad_encoded_word")
            flush()
            out.append(match[0])
            last_was_word = False
        else:
            pending.append(data)
            pending_charset = charset
            last_was_word = True
        pos = match.end()
    flush()
    out.append(value[pos:])
    return " ".join("".join(out).split())
