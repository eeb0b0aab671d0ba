"""One SMTP submission with aiosmtplib, and what its failure means for the message.

The conversation: connect (implicit TLS, or STARTTLS that must succeed: no plaintext fallback),
certificates verified against the system's CAs and ``FLIGHTLOG_SMTP_TLS_CA_FILE``, AUTH, MAIL
FROM with ENVID and RET=HDRS (RFC 3461, when the server offers DSN), RCPT TO with
NOTIFY=SUCCESS,FAILURE,DELAY, then DATA. ``before_data`` runs after the recipients were
accepted and before the DATA command: the caller records there that the message may now reach
the server (the exactly-once record, see :mod:`services.sender.worker`).

Exceptions::

    SubmitError               the server never took the message; ``permanent`` says whether to retry
    SubmitInDoubt             the conversation broke after DATA began: the server may hold it
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage

import aiosmtplib

from libs.outbound import AddressRefused, resolve_public
from libs.outbox import SmtpAccount
from libs.sending import SendRequest, envelope_id

__all__ = ["SubmitError", "SubmitInDoubt", "Submitted", "submit", "tls_context"]

# Postfix, Exim, Sendmail and most others name their queue id in the 250 after DATA:
# "2.0.0 Ok: queued as 4F2A1B", "OK id=1abc-00", "Message accepted for delivery ... <id>".
_QUEUE_ID = re.compile(r"(?:queued as|id=)\s*([A-Za-z0-9._-]{1,64})")


class SubmitError(Exception):
    def __init__(self, reason: str, *, permanent: bool, code: int | None = None) -> None:
        super().__init__(reason)
        self.permanent = permanent
        self.code = code

    @property
    def error_code(self) -> str:
        return f"smtp_{self.code}" if self.code else "smtp_connection"


class SubmitInDoubt(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Submitted:
    reply: str
    queue_id: str | None
    refused: dict[str, str]  # recipients the server refused, with its answer


async def _connected(address: str, port: int, timeout_s: float) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def _failure(exc: aiosmtplib.SMTPResponseException) -> SubmitError:
    return SubmitError(f"{exc.code} {exc.message}"[:1000], permanent=exc.code >= 500, code=exc.code)


async def submit(
    account: SmtpAccount,
    request: SendRequest,
    mime: EmailMessage,
    *,
    context: ssl.SSLContext,
    timeout_s: float,
    allow_private: bool,
    before_data: Callable[[], Awaitable[bool]],
) -> Submitted:
    """Submit ``mime`` to ``account``'s server. ``before_data`` returns False when the message
    must not go (the caller lost its claim on it): then nothing is sent."""
    try:
        (address, *_) = await resolve_public(account.host, account.port, allow_private=allow_private)
    except AddressRefused as exc:
        raise SubmitError(str(exc), permanent=True) from None
    implicit = account.tls_mode == "implicit"
    try:
        # Connected here, to the address that was checked (libs.outbound: no second resolution);
        # the certificate is verified against the account's host name.
        sock = await _connected(address, account.port, timeout_s)
    except OSError as exc:
        raise SubmitError(
            f"cannot connect to {account.host}:{account.port}: {exc}", permanent=False
        ) from None
    smtp = aiosmtplib.SMTP(
        hostname=account.host,
        sock=sock,
        use_tls=implicit,
        start_tls=not implicit,  # True: STARTTLS or fail, never plaintext
        tls_context=context,
        timeout=timeout_s,
    )
    try:
        await smtp.connect()
        await smtp.login(account.username, account.password)
        recipients = request.message.recipients()
        dsn = smtp.supports_extension("dsn")
        mail_options = [f"ENVID={envelope_id(request.message_key)}", "RET=HDRS"] if dsn else []
        rcpt_options = ["NOTIFY=SUCCESS,FAILURE,DELAY"] if dsn else []
        await smtp.mail(request.sender.email, options=mail_options)
        refused: dict[str, str] = {}
        last_refusal: aiosmtplib.SMTPRecipientRefused | None = None
        for rcpt in recipients:
            try:
                await smtp.rcpt(rcpt, options=rcpt_options)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused[rcpt] = f"{exc.code} {exc.message}"[:500]
                last_refusal = exc
        if last_refusal is not None and len(refused) == len(recipients):
            raise _failure(last_refusal)
        if not await before_data():
            raise SubmitError("the claim on the message was lost", permanent=False)
        try:
            response = await smtp.data(mime.as_bytes())
        except aiosmtplib.SMTPDataError as exc:
            raise _failure(exc) from None  # an answer to the end of DATA: the server did not keep it
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SubmitInDoubt(f"{type(exc).__name__}: {exc}") from None
        match = _QUEUE_ID.search(response.message)
        return Submitted(response.message[:1000], match[1] if match else None, refused)
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise SubmitError(
            f"authentication failed: {exc.code} {exc.message}"[:1000], permanent=True, code=exc.code
        ) from None
    except aiosmtplib.SMTPResponseException as exc:
        raise _failure(exc) from None
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        # ssl.SSLCertVerificationError is an OSError: a certificate that does not verify is
        # retried like a connection failure, since a server's certificate gets fixed.
        raise SubmitError(f"{type(exc).__name__}: {exc}"[:1000], permanent=False) from None
    finally:
        if smtp.is_connected:
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                smtp.close()
