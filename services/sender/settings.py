"""The sender's own settings (``FLIGHTLOG_SENDER_*``), read once at start-up."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["SenderSettings"]


class SenderSettings(BaseSettings):
    """How often the outbox is read, how much is worked on at once, and how retries go."""

    model_config = SettingsConfigDict(env_prefix="FLIGHTLOG_", extra="ignore", frozen=True)

    # How often each shard's outbox is read when the last read found nothing due.
    sender_poll_interval_s: float = Field(default=0.5, gt=0)
    # How long a claimed message is this sender's alone; longer than one SMTP conversation
    # (sender_smtp_timeout_s per command), or another sender could take it over mid-send.
    sender_lease_s: float = Field(default=300.0, gt=0)
    sender_claim_batch: int = Field(default=20, ge=1, le=1000)  # rows claimed per shard and read
    sender_concurrency: int = Field(default=8, ge=1, le=256)  # SMTP conversations at once
    sender_smtp_timeout_s: float = Field(default=60.0, gt=0)  # per SMTP command
    # Retries of a 4xx answer or a connection that failed before the end of DATA: the delays
    # double from the first up to the most, and after this many attempts the message fails.
    sender_max_attempts: int = Field(default=8, ge=1)
    sender_retry_initial_s: float = Field(default=5.0, gt=0)
    sender_retry_max_s: float = Field(default=600.0, gt=0)
    sender_produce_timeout_s: float = Field(default=10.0, gt=0)
    # Append each sent message to the account's Sent folder over IMAP when the server has not
    # filed it there itself (searched for by Message-ID).
    sender_file_sent_copy: bool = True
