"""Settings of the IMAP sync workers (``FLIGHTLOG_IMAP_*``)."""

from __future__ import annotations

from pydantic import Field

from libs.imap.client import DEFAULT_MAX_RESPONSE_BYTES
from libs.imap_accounts import ImapAccountsSettings
from libs.mime import MAX_RAW_BYTES

__all__ = ["ImapSettings"]


class ImapSettings(ImapAccountsSettings):
    """IMAP sync in ingest, beside the accounts topic it shares with the gateway.

    ``imap_sync_enabled`` false leaves the accounts to other ingest instances (this one serves
    ``POST /v1/events`` only); ``imap_consumer_group`` is the group that splits
    flightlog.imap-accounts between instances; ``imap_command_timeout_s`` bounds one IMAP command;
    a failed connection is retried after ``imap_backoff_base_s``, doubled up to
    ``imap_backoff_max_s``.
    """

    imap_sync_enabled: bool = True
    imap_consumer_group: str = "flightlog-ingest-imap"
    # A UID FETCH of bodies holds at most imap_batch_size messages and imap_fetch_batch_bytes of
    # them as planned from RFC822.SIZE (each counted up to libs.mime.MAX_RAW_BYTES, the most
    # fetched of one message); a server that sends more than planned plus one message is cut off.
    imap_batch_size: int = Field(default=250, gt=0)
    imap_fetch_batch_bytes: int = Field(default=4 * 1024 * 1024, ge=MAX_RAW_BYTES)
    # Any other response (a FLAGS fetch of a whole folder, a SEARCH, a QRESYNC SELECT) may hold
    # this much before the connection is dropped (a FLAGS fetch of 500,000 messages: ~40 MiB).
    imap_max_response_bytes: int = Field(default=DEFAULT_MAX_RESPONSE_BYTES, ge=1024 * 1024)
    # UIDs one UID SEARCH may return (a Python set of ints costs ~30 times their digits)
    imap_max_folder_uids: int = Field(default=1_000_000, gt=0)
    imap_poll_interval_s: float = Field(default=30.0, gt=0)  # folders other than INBOX
    imap_idle_renew_s: float = Field(default=25 * 60.0, gt=0)  # RFC 9051: servers may drop at 30 min
    imap_command_timeout_s: float = Field(default=60.0, gt=0)
    # Logins running at once to one server host, per ingest instance: after a restart every
    # account logs in again, and a provider must not see thousands of logins at once.
    imap_max_concurrent_logins_per_host: int = Field(default=50, gt=0)
    imap_backoff_base_s: float = Field(default=1.0, gt=0)
    imap_backoff_max_s: float = Field(default=300.0, gt=0)
    imap_use_condstore: bool = True  # False forces the UID-list fallback even if offered
