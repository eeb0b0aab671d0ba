"""The sent copy: a submitted message appended to the account's Sent folder over IMAP, unless the
server filed one itself (as Gmail does), so the mailbox shows what was sent.

Best effort, after the submission is recorded: the message went out whatever happens here. It is
idempotent (the folder is searched for the Message-ID first), so doing it again never files two
copies; a sender that stops between the submission and this step leaves the copy out (logged).
"""

from __future__ import annotations

import logging

from libs.imap.client import ImapConnection, ImapError
from libs.imap_accounts import ImapAccountsSettings, SyncStore

__all__ = ["file_sent_copy"]

logger = logging.getLogger(__name__)


async def file_sent_copy(
    store: SyncStore, settings: ImapAccountsSettings, account_id: int, raw: bytes, message_id: str,
    *, timeout_s: float,
) -> str:  # fmt: skip
    """Append ``raw`` to the Sent folder; what was done ("appended", "present", or why not)."""
    account = await store.account(account_id)
    if account is None or not account.password:
        return "no IMAP login"
    conn = ImapConnection(
        account.host, account.port, account.tls_mode, timeout_s,
        ca_file=settings.imap_tls_ca_file, allow_private=settings.imap_allow_private_hosts,
    )  # fmt: skip
    try:
        await conn.connect(account.username, account.password, use_condstore=False)
        sent = next((f for f in await conn.list_folders() if f.role == "sent" and f.selectable), None)
        if sent is None:
            return "no Sent folder"
        await conn.examine(sent.name)
        if await conn.has_message_id(f"<{message_id}>"):
            return "present"
        await conn.append(raw, sent.name)
        return "appended"
    except (ImapError, OSError, TimeoutError) as exc:
        logger.warning("the sent copy of %s was not filed: %s", message_id, exc)
        return f"failed: {type(exc).__name__}"
    finally:
        await conn.close()
