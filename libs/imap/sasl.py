"""The SASL initial responses of the OAuth2 mechanisms, the only way a token reaches the wire:
XOAUTH2 (Google's and Microsoft's, `developers.google.com/gmail/imap/xoauth2-protocol`) and
OAUTHBEARER (RFC 7628). Both are key-value pairs separated by ``\\x01``, so a username or token
with a control character would add pairs of its own: such credentials are refused here, as the
API refuses them.

After a refused token the server sends an error challenge (a base64 JSON object) and waits for
the client's answer before its tagged NO: :data:`ABORT` holds that answer per mechanism.
"""

from __future__ import annotations

import base64
from typing import Final

from libs.outbound import has_control_characters

__all__ = ["ABORT", "MAX_CHALLENGE_BYTES", "initial_response"]

# XOAUTH2: an empty response; OAUTHBEARER: %x01 (RFC 7628 3.2.3), base64 in IMAP
ABORT: Final = {"xoauth2": "", "oauthbearer": base64.b64encode(b"\x01").decode()}
# The most of a server's error challenge kept for the log (it is a short JSON object).
MAX_CHALLENGE_BYTES: Final = 1024


def _saslname(user: str) -> str:
    # RFC 5801 (gs2-header): "," and "=" are escaped in the authorization identity
    return user.replace("=", "=3D").replace(",", "=2C")


def initial_response(mechanism: str, user: str, token: str, host: str, port: int) -> str:
    """The base64 initial client response of ``mechanism`` (``xoauth2`` or ``oauthbearer``)."""
    if has_control_characters(user) or has_control_characters(token):
        raise ValueError("the username or access token contains control characters")
    if mechanism == "xoauth2":
        raw = f"user={user}\x01auth=Bearer {token}\x01\x01"
    elif mechanism == "oauthbearer":
        raw = f"n,a={_saslname(user)},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    else:
        raise ValueError(f"unknown SASL mechanism {mechanism!r}")
    return base64.b64encode(raw.encode()).decode()
