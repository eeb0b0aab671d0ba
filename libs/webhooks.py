"""Standard Webhooks signatures: building them (the dispatcher) and checking them (receivers).

Scheme (https://www.standardwebhooks.com): three headers, ``webhook-id`` (the same on every retry
of one event), ``webhook-timestamp`` (integer Unix seconds of this attempt) and
``webhook-signature``, a space-separated list of ``v1,<base64 HMAC-SHA256>`` computed over
``"{id}.{timestamp}.{body}"`` with the secret's raw bytes. A secret is written
``whsec_<base64 of its bytes>``. While a rotated secret is in its grace period the dispatcher signs
with both, so a receiver holding either one verifies.

A receiver verifies like this::

    from libs.webhooks import WebhookVerificationError, verify

    try:
        verify(secret, request.headers, await request.read())
    except WebhookVerificationError:
        return web.Response(status=400)

All of this is pure: no I/O, clocks only through the ``now_s`` arguments.

Exceptions::

    WebhookVerificationError   root: the request is not a valid signed delivery
    └── InvalidSecret          the secret is not ``whsec_`` + base64
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "HEADER_ID",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "SECRET_PREFIX",
    "InvalidSecret",
    "WebhookVerificationError",
    "generate_secret",
    "secret_bytes",
    "sign",
    "sign_headers",
    "signature_header",
    "verify",
]

SECRET_PREFIX: Final = "whsec_"
SECRET_BYTES: Final = 32
HEADER_ID: Final = "webhook-id"
HEADER_TIMESTAMP: Final = "webhook-timestamp"
HEADER_SIGNATURE: Final = "webhook-signature"
# Both ways: a timestamp too old is a replay, one too far ahead a wrong clock.
DEFAULT_TOLERANCE_S: Final = 5 * 60


class WebhookVerificationError(Exception):
    pass


class InvalidSecret(WebhookVerificationError):
    pass


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_bytes(secret: str) -> bytes:
    """The HMAC key inside ``whsec_<base64>``; the prefix is optional, as receivers paste it."""
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSecret("a webhook secret is 'whsec_' followed by base64") from None
    if not key:
        raise InvalidSecret("the webhook secret is empty")
    return key


def sign(secret: str, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of ``{msg_id}.{timestamp_s}.{body}``."""
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp_s, body)
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets_: Iterable[str], msg_id: str, timestamp_s: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per secret, space-separated."""
    sigs = [sign(s, msg_id, timestamp_s, body) for s in secrets_]
    if not sigs:
        raise InvalidSecret("at least one secret is needed to sign")
    return " ".join(sigs)


def sign_headers(secrets_: Iterable[str], msg_id: str, timestamp_s: int, body: bytes) -> dict[str, str]:
    return {
        HEADER_ID: msg_id,
        HEADER_TIMESTAMP: str(timestamp_s),
        HEADER_SIGNATURE: signature_header(secrets_, msg_id, timestamp_s, body),
    }


def verify(
    secret: str | Iterable[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now_s: float | None = None,
) -> str:
    """Check a delivery's signature and timestamp; returns its ``webhook-id``.

    ``secret`` may be several secrets (a receiver rotating its own copy): any one verifying is
    enough. ``headers`` is any mapping; names are matched case-insensitively.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get(HEADER_ID)
    stamp = lowered.get(HEADER_TIMESTAMP)
    header = lowered.get(HEADER_SIGNATURE)
    if not (msg_id and stamp and header):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp_s = int(stamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    now = time.time() if now_s is None else now_s
    if abs(now - timestamp_s) > tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance")
    candidates = [secret] if isinstance(secret, str) else list(secret)
    expected = {sign(s, msg_id, timestamp_s, body).encode() for s in candidates}
    for presented in header.split():
        version, _, _ = presented.partition(",")
        if version != "v1":
            continue
        # compare every candidate without stopping early, so timing says nothing about which
        if any([hmac.compare_digest(presented.encode(), e) for e in expected]):
            return msg_id
    raise WebhookVerificationError("no signature matches")
