"""Opaque, tamper-evident tokens: delta cursors and page tokens. Pure: no I/O, no clock.

A token is URL-safe base64 (no padding) of ``kind (1 byte) | fields (big-endian) | mac (8 bytes)``
where the MAC is a keyed BLAKE2b over everything before it. The key is the gateway's secret, so a
client can hand a token back but cannot forge or edit one; a token that does not verify is
malformed, whatever the cause.

* A :class:`DeltaCursor` names an account and the last change id the client has seen.
* A :class:`PageToken` names an account, a fingerprint of the query it continues (so a token is
  refused by any other query) and the keyset position (time in microseconds, message id).

Exceptions::

    CursorError            root (a ValueError): the token is not usable
    ├── MalformedCursor    not a token of this kind, or it does not verify
    └── ForeignCursor      a valid token, but for another account or another query
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_TOKEN_LENGTH",
    "CursorError",
    "DeltaCursor",
    "ForeignCursor",
    "MalformedCursor",
    "PageToken",
    "decode_delta_cursor",
    "decode_page_token",
    "encode_delta_cursor",
    "encode_page_token",
    "query_fingerprint",
]

MAC_BYTES: Final = 8
MAX_TOKEN_LENGTH: Final = 128  # characters; both kinds are far shorter

_DELTA_KIND: Final = b"D"
_PAGE_KIND: Final = b"P"
_DELTA_LAYOUT: Final = struct.Struct(">QQ")  # account id, change id
_PAGE_LAYOUT: Final = struct.Struct(">QQqQ")  # account id, query fingerprint, time (us), message id
_U64: Final = (1 << 64) - 1


class CursorError(ValueError):
    retriable = False


class MalformedCursor(CursorError):
    pass


class ForeignCursor(CursorError):
    pass


@dataclass(frozen=True, slots=True)
class DeltaCursor:
    account_id: int
    change_id: int  # the last change the holder has seen; 0 means "before the first"


@dataclass(frozen=True, slots=True)
class PageToken:
    account_id: int
    fingerprint: int
    occurred_at_us: int  # microseconds since the epoch, UTC
    message_id: int


def _mac(key: bytes, payload: bytes) -> bytes:
    return hashlib.blake2b(payload, key=key[:64], digest_size=MAC_BYTES).digest()


def _seal(key: bytes, payload: bytes) -> str:
    return base64.urlsafe_b64encode(payload + _mac(key, payload)).rstrip(b"=").decode("ascii")


def _open(key: bytes, token: str, kind: bytes, size: int, what: str) -> bytes:
    if not token or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        raise MalformedCursor(f"{what} is malformed")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise MalformedCursor(f"{what} is malformed: not URL-safe base64") from None
    if len(raw) != 1 + size + MAC_BYTES or raw[:1] != kind:
        raise MalformedCursor(f"{what} is malformed")
    payload, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    if not hmac.compare_digest(mac, _mac(key, payload)):
        raise MalformedCursor(f"{what} is malformed or was altered")
    return payload[1:]


def _check_u64(name: str, value: int) -> None:
    if not 0 <= value <= _U64:
        raise ValueError(f"{name} {value} does not fit 64 bits")


def encode_delta_cursor(key: bytes, cursor: DeltaCursor) -> str:
    _check_u64("account id", cursor.account_id)
    _check_u64("change id", cursor.change_id)
    return _seal(key, _DELTA_KIND + _DELTA_LAYOUT.pack(cursor.account_id, cursor.change_id))


def decode_delta_cursor(key: bytes, token: str, account_id: int) -> DeltaCursor:
    """The cursor in ``token``; raises :class:`ForeignCursor` when it is another account's."""
    payload = _open(key, token, _DELTA_KIND, _DELTA_LAYOUT.size, "cursor")
    owner, change_id = _DELTA_LAYOUT.unpack(payload)
    if owner != account_id:
        raise ForeignCursor("cursor belongs to another account")
    return DeltaCursor(owner, change_id)


def encode_page_token(key: bytes, token: PageToken) -> str:
    _check_u64("account id", token.account_id)
    _check_u64("fingerprint", token.fingerprint)
    _check_u64("message id", token.message_id)
    if not -(1 << 63) <= token.occurred_at_us < 1 << 63:
        raise ValueError("time out of range")
    return _seal(
        key,
        _PAGE_KIND
        + _PAGE_LAYOUT.pack(token.account_id, token.fingerprint, token.occurred_at_us, token.message_id),
    )


def decode_page_token(key: bytes, token: str, account_id: int, fingerprint: int) -> PageToken:
    """The position in ``token``; :class:`ForeignCursor` when it continues another account or query."""
    payload = _open(key, token, _PAGE_KIND, _PAGE_LAYOUT.size, "page_token")
    owner, fp, occurred_at_us, message_id = _PAGE_LAYOUT.unpack(payload)
    if owner != account_id:
        raise ForeignCursor("page_token belongs to another account")
    if fp != fingerprint:
        raise ForeignCursor("page_token belongs to another query: keep every parameter but limit the same")
    return PageToken(owner, fp, occurred_at_us, message_id)


def query_fingerprint(params: Mapping[str, str]) -> int:
    """A 64-bit digest of the query parameters that define a result set (order-independent)."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(params):
        h.update(name.encode() + b"\x00" + params[name].encode() + b"\x01")
    return int.from_bytes(h.digest(), "big")
