"""The stack's Postfix: authenticated submission over TLS, delivery into Dovecot over LMTP, and a
DSN back to the sender for an unknown local user."""

from __future__ import annotations

import email
import email.policy
import mailbox
import ssl
import uuid
from email.message import EmailMessage

import aiosmtplib
import pytest

from cli.mailbox_gen import DOMAIN
from cli.stack import HOST, IMAP_TEST_PASSWORD, Stack
from tests.polling import eventually
from tests.scratch import dovecot_user

pytestmark = pytest.mark.timeout(120)

ARRIVES_WITHIN_S = 30.0


def _tls(stack: Stack) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(stack.dovecot.tls_cert))


def _inbox(stack: Stack, address: str) -> list[EmailMessage]:
    local = address.split("@", 1)[0]
    path = stack.dovecot.dir / "mail" / DOMAIN / local / "Maildir"
    if not path.is_dir():
        return []
    box = mailbox.Maildir(path, create=False)
    return [email.message_from_bytes(box.get_bytes(key), policy=email.policy.default) for key in box.keys()]


def _message(sender: str, recipient: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = "through the stack's MTA"
    message["Message-ID"] = f"<{uuid.uuid4().hex}@{DOMAIN}>"
    message.set_content("hello")
    return message


def _users(stack: Stack, count: int) -> list[str]:
    addresses = [f"{dovecot_user('mta')}@{DOMAIN}" for _ in range(count)]
    stack.dovecot.add_users(addresses)
    return addresses


async def test_submission_delivers_into_the_recipients_mailbox(stack: Stack) -> None:
    sender, recipient = _users(stack, 2)
    message = _message(sender, recipient)
    errors, reply = await aiosmtplib.send(
        message,
        hostname=HOST,
        port=stack.settings.submission_port,
        start_tls=True,
        tls_context=_tls(stack),
        username=sender,
        password=IMAP_TEST_PASSWORD,
    )
    assert errors == {}
    assert "queued as" in reply

    def arrived() -> bool:
        return [m["Message-ID"] for m in _inbox(stack, recipient)] == [message["Message-ID"]]

    await eventually(arrived, ARRIVES_WITHIN_S, "the message in the recipient's INBOX")


async def test_implicit_tls_submission_and_refusals(stack: Stack) -> None:
    (sender,) = _users(stack, 1)
    port = stack.settings.smtps_port
    errors, _ = await aiosmtplib.send(
        _message(sender, sender),
        hostname=HOST,
        port=port,
        use_tls=True,
        tls_context=_tls(stack),
        username=sender,
        password=IMAP_TEST_PASSWORD,
    )
    assert errors == {}
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        await aiosmtplib.send(
            _message(sender, sender),
            hostname=HOST,
            port=port,
            use_tls=True,
            tls_context=_tls(stack),
            username=sender,
            password="wrong",
        )
    # Without AUTH nothing is relayed, not even to a local user.
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await aiosmtplib.send(
            _message(sender, sender), hostname=HOST, port=port, use_tls=True, tls_context=_tls(stack)
        )
    # A client that verifies against the system's CAs refuses the stack's self-signed certificate.
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await aiosmtplib.send(
            _message(sender, sender), hostname=HOST, port=port, use_tls=True, validate_certs=True
        )


async def test_unknown_local_user_bounces_with_a_dsn_to_the_sender(stack: Stack) -> None:
    (sender,) = _users(stack, 1)
    unknown = f"{dovecot_user('nobody')}@{DOMAIN}"
    message = _message(sender, unknown)
    envid = uuid.uuid4().hex
    async with aiosmtplib.SMTP(
        hostname=HOST, port=stack.settings.submission_port, start_tls=True, tls_context=_tls(stack)
    ) as smtp:
        await smtp.login(sender, IMAP_TEST_PASSWORD)
        errors, _ = await smtp.send_message(
            message, mail_options=[f"ENVID={envid}"], rcpt_options=["NOTIFY=FAILURE"]
        )
    assert errors == {}  # accepted: the recipient is refused only at delivery

    def bounced() -> bool:
        return any(m.get_content_type() == "multipart/report" for m in _inbox(stack, sender))

    await eventually(bounced, ARRIVES_WITHIN_S, "a DSN in the sender's INBOX")
    (dsn,) = _inbox(stack, sender)
    assert dsn.get_param("report-type") == "delivery-status"
    status = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    per_message, per_recipient = (block for block in blocks if not isinstance(block, str))
    assert per_message["Original-Envelope-Id"] == envid
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert unknown in per_recipient["Final-Recipient"]
