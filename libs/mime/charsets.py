"""Bytes to text the way mail clients decode them: charset labels mapped to the codecs that real
senders use (supersets, not the names they declare), and a declared charset that lies replaced
by what the bytes are.

- Supersets, as browsers and mail clients decode (the WHATWG Encoding Standard): gb2312 and gbk
  are gb18030, shift_jis is cp932, ks_c_5601-1987 and euc-kr are cp949, big5 is big5hkscs,
  iso-8859-1 and us-ascii are windows-1252 (whose 0x80-0x9F are the curly quotes and dashes
  Windows senders put in "Latin-1" mail), iso-8859-9 is windows-1254, tis-620 is windows-874.
- iso-2022-jp is tried as itself, then with its extensions (-2, -ext for half-width katakana,
  -2004), then with JIS X 0208 read as JIS X 0213, its superset, for the NEC row-13 symbols
  (①, ㈱) Outlook sends under the JIS X 0208 escape.
- Valid UTF-8 with non-ASCII in it wins over a declared single-byte charset (senders that
  declare Latin-1 or windows-1251 and write UTF-8 are far commoner than such text that is valid
  UTF-8: its letters are lead bytes that the punctuation of 0x80-0xBF rarely follows).
- Bytes that are not valid in the declared charset: mostly-UTF-8 text with stray 8-bit bytes (a
  mailing list's Latin-1 footer under a UTF-8 body) keeps its UTF-8 and reads the strays as
  windows-1252; anything else is detected (charset-normalizer, on at most
  :data:`MAX_DETECT_BYTES`), and decoded with replacement characters only as the last resort.
"""

from __future__ import annotations

import codecs
from typing import Final

import charset_normalizer

__all__ = [
    "MAX_DETECT_BYTES",
    "MAX_DETECT_BYTES_PER_MESSAGE",
    "DetectionBudget",
    "codec_for",
    "decode_bytes",
    "decode_header_bytes",
]

# Detection reads a prefix: enough for any language's statistics, bounded for hostile input.
MAX_DETECT_BYTES: Final = 16 * 1024
# Detection costs about a millisecond per KiB: a message of a thousand lying parts gets two.
MAX_DETECT_BYTES_PER_MESSAGE: Final = 2 * MAX_DETECT_BYTES
MAX_LABEL_CHARS: Final = 64

_ALIASES: Final = {
    "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "cp936": "gb18030", "ms936": "gb18030",
    "euc-cn": "gb18030", "csgb2312": "gb18030", "chinese": "gb18030", "gb_2312-80": "gb18030",
    "iso-ir-58": "gb18030", "windows-936": "gb18030",
    "shift_jis": "cp932", "shift-jis": "cp932", "sjis": "cp932", "x-sjis": "cp932", "ms_kanji": "cp932",
    "csshiftjis": "cp932", "windows-31j": "cp932", "ms932": "cp932", "x-ms-cp932": "cp932",
    "ks_c_5601-1987": "cp949", "ks_c_5601": "cp949", "ks_c_5601-1989": "cp949", "ksc5601": "cp949",
    "ksc_5601": "cp949", "euc-kr": "cp949", "korean": "cp949", "iso-ir-149": "cp949", "windows-949": "cp949",
    "big5": "big5hkscs", "x-x-big5": "big5hkscs", "cn-big5": "big5hkscs", "csbig5": "big5hkscs",
    "us-ascii": "cp1252", "ascii": "cp1252", "ansi_x3.4-1968": "cp1252", "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252", "iso_8859-1": "cp1252", "latin1": "cp1252", "latin-1": "cp1252", "l1": "cp1252",
    "iso-ir-100": "cp1252", "cp819": "cp1252", "ibm819": "cp1252", "windows-1252": "cp1252",
    "x-cp1252": "cp1252", "cp-1252": "cp1252", "win-1252": "cp1252", "iso-8859-15": "iso8859-15",
    "iso-8859-9": "cp1254", "latin5": "cp1254", "iso-8859-11": "cp874", "tis-620": "cp874",
    "windows-874": "cp874", "iso-8859-8-i": "iso8859-8", "x-mac-roman": "mac-roman",
    "utf8": "utf-8", "unicode-1-1-utf-8": "utf-8", "x-unicode20utf8": "utf-8", "unicode": "utf-16",
    "x-user-defined": "cp1252", "unknown-8bit": "", "x-unknown": "", "unknown": "", "default": "",
    "iso-2022-jp": "iso2022_jp", "csiso2022jp": "iso2022_jp", "iso-2022-jp-2": "iso2022_jp_2",
    "iso-2022-jp-ext": "iso2022_jp_ext", "iso-2022-jp-3": "iso2022_jp_3",
}  # fmt: skip
# What iso-2022-jp mail turns out to use, tried in this order (the first strict decode wins).
_ISO2022JP_FAMILY: Final = ("iso2022_jp", "iso2022_jp_2", "iso2022_jp_ext", "iso2022_jp_2004")
# Single-byte codecs: (almost) every byte string decodes, so a mismatch cannot show as an error.
_SINGLE_BYTE_PREFIXES: Final = (
    "cp125",
    "iso8859-",
    "koi8",
    "mac-",
    "cp437",
    "cp85",
    "cp86",
    "cp874",
    "latin",
)
_SEVEN_BIT: Final = frozenset({"utf-7", "hz", "iso2022_kr", "iso2022_jp_1", "iso2022_jp_3"})
_NOT_CHARSETS: Final = frozenset({"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined"})
_DETECTABLE_MULTIBYTE: Final = frozenset(
    {"cp932", "shift_jis", "euc_jp", "gb18030", "gb2312", "gbk", "big5", "big5hkscs", "cp949", "euc_kr"}
)
_STRAY: Final = "flightlog-cp1252-stray"


def _stray_as_cp1252(exc: UnicodeError) -> tuple[str, int]:
    """A decode error handler: each undecodable byte read as windows-1252 (C1 where it has none)."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    bad = exc.object[exc.start : exc.end]
    return bad.decode("latin-1").translate(_CP1252_HIGH), exc.end


_CP1252_HIGH: Final = {
    b: bytes([b]).decode("cp1252") for b in range(0x80, 0xA0) if b not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)
}
codecs.register_error(_STRAY, _stray_as_cp1252)


def codec_for(label: str | None) -> str | None:
    """The Python codec to decode a charset ``label`` with; ``""`` for labels that say "unknown",
    None for labels nothing knows."""
    if label is None:
        return ""
    name = label.strip().strip("\"'").strip().lower()[:MAX_LABEL_CHARS]
    name = name.split(";", 1)[0].split("*", 1)[0].strip()  # "utf-8;" and RFC 2231 "utf-8*en"
    if not name:
        return ""
    if name in _ALIASES:
        return _ALIASES[name]
    try:
        info = codecs.lookup(name)
    except LookupError:
        return None
    if not info._is_text_encoding or info.name in _NOT_CHARSETS:  # base64, zlib, unicode_escape...
        return None
    codec = info.name
    return _ALIASES.get(codec, "cp1252" if codec in ("ascii", "latin-1", "iso8859-1") else codec)


def _utf8_with_strays(data: bytes) -> str | None:
    """``data`` as UTF-8 if it is UTF-8 with a few stray 8-bit bytes, else None."""
    valid = data.decode("utf-8", "ignore")
    strays = len(data) - len(valid.encode())
    multibyte = len(valid) - len(valid.encode("ascii", "ignore"))
    # Real UTF-8 text with a foreign footer has more good sequences than strays; text in another
    # multi-byte charset has almost none (its bytes rarely form valid UTF-8 by chance).
    return data.decode("utf-8", _STRAY) if multibyte > strays else None


class DetectionBudget:
    """How many bytes charset detection may still read (one per message: see
    :data:`MAX_DETECT_BYTES_PER_MESSAGE`)."""

    __slots__ = ("bytes_left",)

    def __init__(self, max_bytes: int = MAX_DETECT_BYTES_PER_MESSAGE) -> None:
        self.bytes_left = max_bytes

    def detect(self, data: bytes) -> str | None:
        """The charset of ``data`` by its statistics; None when unsure or out of budget."""
        sample = data[: min(MAX_DETECT_BYTES, self.bytes_left)]
        if not sample:
            return None
        self.bytes_left -= len(sample)
        try:
            result = charset_normalizer.from_bytes(sample).best()
        except Exception:  # a library's bug on hostile bytes must not cost the message its text
            return None
        return None if result is None else str(result.encoding)


_NO_DETECTION: Final = DetectionBudget(0)


def _undeclared(data: bytes, budget: DetectionBudget) -> str:
    """8-bit text without a charset that is not UTF-8: windows-1252 (MIME's us-ascii default as
    clients read it), unless the bytes are clearly one of the East Asian charsets old mailers sent
    undeclared."""
    mixed = _utf8_with_strays(data)
    if mixed is not None:
        return mixed
    detected = budget.detect(data)
    if detected in _DETECTABLE_MULTIBYTE:
        return data.decode(detected, "replace")
    return data.decode("cp1252", _STRAY)


def decode_bytes(
    data: bytes,
    label: str | None,
    warnings: list[str] | None = None,
    *,
    budget: DetectionBudget | None = None,
) -> str:
    """``data`` decoded as a mail client would, given the declared charset ``label``; never raises.

    :param budget: what charset detection may read; without one nothing is detected (header
        words and parameters are too short for statistics).
    Appends ``unknown_charset``, ``charset_mismatch``, ``charset_detected`` or
    ``bad_body_charset`` to ``warnings``.
    """
    budget = _NO_DETECTION if budget is None else budget
    codec = codec_for(label)
    if codec is None:
        if warnings is not None:
            warnings.append("unknown_charset")
        codec = ""
    if data.isascii():
        # 7-bit charsets: iso-2022-jp declared, or undeclared (old Japanese mailers), and UTF-7.
        if codec.startswith("iso2022_jp") or (not codec and (b"\x1b$B" in data or b"\x1b$@" in data)):
            codec = "iso2022_jp"
        elif codec not in _SEVEN_BIT:
            return data.decode("ascii")
    single_byte = codec.startswith(_SINGLE_BYTE_PREFIXES)
    if not codec or single_byte or codec == "utf-8":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            if codec and codec != "utf-8" and warnings is not None:
                warnings.append("charset_mismatch")
            return text
        if single_byte:
            return data.decode(codec, _STRAY)
        if not codec:
            return _undeclared(data, budget)
    elif codec == "iso2022_jp":
        for family in _ISO2022JP_FAMILY:
            try:
                return data.decode(family)
            except UnicodeDecodeError:
                continue
        try:  # Outlook's CP50221: NEC row 13 (①, ㈱) under the JIS X 0208 escape
            return (
                data.replace(b"\x1b$B", b"\x1b$(Q").replace(b"\x1b$@", b"\x1b$(Q").decode("iso2022_jp_2004")
            )
        except UnicodeDecodeError:
            pass
    else:
        try:
            return data.decode(codec)
        except UnicodeDecodeError:
            pass
    mixed = _utf8_with_strays(data)
    if mixed is not None:
        if warnings is not None:
            warnings.append("bad_body_charset")
        return mixed
    if warnings is not None:
        warnings.append("charset_mismatch" if codec else "charset_detected")
    detected = budget.detect(data)
    if detected is not None:
        try:
            return data.decode(detected, "replace")
        except LookupError:
            pass
    return data.decode("cp1252", _STRAY)


def decode_header_bytes(data: bytes) -> str:
    """Raw 8-bit header bytes (RFC 6532 UTF-8, or a legacy sender's 8-bit text) as text: UTF-8
    where it is valid, each other byte as windows-1252; raw iso-2022-jp (old Japanese mailers
    wrote it unencoded) as Japanese."""
    if data.isascii():
        if b"\x1b$" in data:
            return decode_bytes(data, "iso-2022-jp")
        return data.decode("ascii")
    return data.decode("utf-8", _STRAY)
